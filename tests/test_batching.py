"""Continuous batching on the tiny model (CPU, steps run eagerly): the questions of one request and of
concurrent callers decode in the same steps, over shared prefixes, and give exactly what one-at-a-time
decoding gives; a cancelled caller leaves at once and spoils nothing."""

from __future__ import annotations

import threading

import pytest

from moments.workers.model.engine import Engine
from moments.workers.model.scheduler import Cancelled
from tests.plans import QUERIES, make_frames, make_plan

MANY = [f"{q} number {i}" for i in range(4) for q in QUERIES]  # 16 different questions


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    eager = Engine.load(str(tiny_model_dir), device="cpu", fast_decode=False)
    batched = Engine.load(str(tiny_model_dir), device="cpu", fast_decode=True, decode_slots=2, decode_lanes=8,
                          decode_bucket=64, decode_grow=128)
    return eager, batched


@pytest.fixture(scope="module")
def videos(engines):
    eager, _ = engines
    out = []
    for seed, (frames, fps) in enumerate([(16, 0.5), (8, 0.2), (12, 1.0)]):
        plan = make_plan(frames, fps, 84, 112)
        out.append(eager.encode(make_frames(plan, 40 + seed), plan))
    return out


def texts(generations):
    return [g.text for g in generations]


def test_the_questions_of_a_request_decode_together_and_match_one_at_a_time(engines, videos):
    eager, batched = engines
    want = eager.generate(videos[0], MANY, max_new_tokens=10)
    sched = batched._scheduler
    steps_before, rows_before = sched.steps, sched.rows_stepped
    got = batched.generate(videos[0], MANY, max_new_tokens=10)
    assert texts(got) == texts(want) and len(set(texts(want))) > 4
    for g, w in zip(got, want):
        assert g.absent_logprob == pytest.approx(w.absent_logprob, abs=1e-3)
    steps, rows = sched.steps - steps_before, sched.rows_stepped - rows_before
    # 16 questions in lanes of 8 (and one prefix slot free for the next 8): far fewer steps than rows.
    assert rows >= 16 and steps <= rows / 4


def test_concurrent_callers_on_different_videos_share_steps(engines, videos):
    eager, batched = engines
    want = {i: texts(eager.generate(videos[i], QUERIES, max_new_tokens=12)) for i in (1, 2)}
    got: dict[int, list[str]] = {}
    barrier = threading.Barrier(2)
    sched = batched._scheduler
    seen_slots: set[int] = set()
    step = sched._step

    def spy():
        seen_slots.add(len({r.slot for r in sched._active()}))
        step()

    sched._step = spy  # count how many prefixes each step served (instance attribute of this test's engine)
    try:
        def ask(i):
            prefix = batched.prefill(videos[i])
            barrier.wait()
            got[i] = texts(batched.generate(videos[i], QUERIES, max_new_tokens=12, prefix=prefix))

        threads = [threading.Thread(target=ask, args=(i,)) for i in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        del sched._step
    assert got == want
    assert 2 in seen_slots  # some steps decoded questions about both videos at once


def test_a_cancelled_caller_leaves_and_the_others_finish_right(engines, videos):
    eager, batched = engines
    want = texts(eager.generate(videos[2], QUERIES, max_new_tokens=16))
    cancel = threading.Event()
    box = {}

    def doomed():
        try:
            batched.generate(videos[1], MANY[:4], max_new_tokens=16, cancel=cancel)
        except Cancelled as exc:
            box["cancelled"] = exc

    t = threading.Thread(target=doomed)
    t.start()
    cancel.set()
    survivor = texts(batched.generate(videos[2], QUERIES, max_new_tokens=16))
    t.join(60)
    assert "cancelled" in box and not t.is_alive()
    assert survivor == want
    assert batched._scheduler._active() == [] and not batched._scheduler.waiting  # every lane freed


def test_a_lone_question_decodes_in_the_lowest_slot(engines, videos):
    """Prefixes that stay resident after their questions end do not widen later steps: each new
    question takes the lowest idle slot (its prefix moved there), so one question = one slot."""
    eager, batched = engines
    sched = batched._scheduler
    prefixes = [batched.prefill(v) for v in videos]
    widths: list[int] = []
    step = sched.decoder.step

    def recording(used_slots, used_lanes):
        widths.append(used_slots)
        return step(used_slots, used_lanes)

    sched.decoder.step = recording
    try:
        for v, p in [(videos[0], prefixes[0]), (videos[1], prefixes[1]), (videos[2], prefixes[2]),
                     (videos[0], prefixes[0])]:
            got = batched.generate(v, [QUERIES[1]], max_new_tokens=6, prefix=p)
            assert texts(got) == texts(eager.generate(v, [QUERIES[1]], max_new_tokens=6))
    finally:
        sched.decoder.step = step
    assert widths and set(widths) == {1}
    held = [ident for ident in sched.decoder.slot_identity if ident is not None]
    assert sched.decoder.slot_identity[0] == (id(prefixes[0].cache), prefixes[0].length, prefixes[0].key)
    assert len(held) == len(set(held))  # a prefix moved down is not also kept higher up

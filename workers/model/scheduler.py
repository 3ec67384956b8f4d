"""Continuous batching: every question in flight on a worker decodes in the same steps.

Callers (jobs, from their own threads) hand :meth:`DecodeScheduler.generate` a prefilled prefix and
their questions, and wait. One thread owns the :class:`.kernels.batch_decode.BatchDecoder`: between
steps it admits waiting questions into free lanes (their prefix into a free slot when it is not
loaded yet; the question's own tokens prefilled then, with the "not in the video" answer scored in
the same forward), then advances every active lane by one token. A question leaves its lane the step
it finishes, hits its token limit, or is cancelled (``should_stop``), so a cancelled job frees its
lanes at once and the others go on; questions wait in arrival order, so none starves. A device
error fails every question in flight (the worker leaves the job group; their jobs run elsewhere).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moments.workers.model.kernels.batch_decode import BatchDecoder

log = logging.getLogger(__name__)

ADMIT_BATCH = 16
"""Questions prefilled in one forward at most (their tokens padded to the longest)."""


class Cancelled(Exception):
    """The caller asked to stop (its job was cancelled or its deadline passed)."""


@dataclass
class Row:
    """One question decoding in a lane."""

    prefix: object
    """The engine's Prefix (cache, length, next_position, key)."""
    q_ids: list[int]
    scored: list[int]
    max_new_tokens: int
    done: threading.Event
    should_stop: Callable[[], bool] | None = None
    tokens: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    absent_logprob: float = 0.0
    error: BaseException | None = None
    slot: int = -1
    lane: int = -1
    rope: int = 0
    pos: int = 0
    started_s: float = 0.0
    prefill_ms: float = 0.0


class DecodeScheduler:
    """See the module docstring. ``lock`` is the engine's (held per admission and per step)."""

    def __init__(self, engine, *, max_slots: int, max_lanes: int, suffix: int, bucket_tokens: int,
                 grow_tokens: int, graphs: bool | None = None) -> None:
        self.engine = engine
        self.decoder = BatchDecoder(engine.model, max_slots=max_slots, max_lanes=max_lanes, suffix=suffix,
                                    graphs=graphs, bucket_tokens=bucket_tokens, grow_tokens=grow_tokens)
        self.lock = engine._lock
        self.waiting: deque[Row] = deque()
        self.lanes: list[list[Row | None]] = [[None] * max_lanes for _ in range(max_slots)]
        self.cond = threading.Condition()
        self.steps = 0
        self.rows_stepped = 0
        self._closed = False
        self.thread = threading.Thread(target=self._loop, name="decode-scheduler", daemon=True)
        self.thread.start()

    # --- callers -------------------------------------------------------------------------------------

    def generate(self, prefix, questions: list[list[int]], scored: list[int], max_new_tokens: int,
                 should_stop: Callable[[], bool] | None = None) -> list[Row]:
        """Decode ``questions`` (token ids after the prefix) greedily; blocks until all are done."""
        rows = [Row(prefix, q, scored, max_new_tokens, threading.Event(), should_stop) for q in questions]
        with self.cond:
            self.waiting.extend(rows)
            self.cond.notify_all()
        for row in rows:
            row.done.wait()
        for row in rows:
            if row.error is not None:
                raise row.error
        return rows

    def close(self) -> None:
        """Stop the decoding thread (after the questions in flight) and drop the buffers."""
        with self.cond:
            self._closed = True
            self.cond.notify_all()
        self.thread.join(timeout=60)
        self.decoder = None

    # --- the decoding thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self._active() and not self._closed:
                    self.cond.wait()
                if self._closed and not self.waiting and not self._active():
                    return
            try:
                with self.lock, torch.inference_mode():
                    self._admit()
                    if self._active():
                        self._step()
            except BaseException as exc:  # noqa: BLE001 - every row in flight learns it
                log.exception("decode step failed")
                self._fail_all(exc)

    def _active(self) -> list[Row]:
        return [r for lanes in self.lanes for r in lanes if r is not None]

    def _admit(self) -> None:
        """Move waiting rows into free lanes, in arrival order (a row whose prefix has no slot waits
        for one, and rows behind it wait too: first come, first served); the rows admitted into one
        slot are prefilled together."""
        admitted: dict[int, list[Row]] = {}
        while self.waiting:
            row = self.waiting[0]
            if row.should_stop is not None and row.should_stop():
                self.waiting.popleft()
                self._finish(row, Cancelled("cancelled before it started"))
                continue
            place = self._place(row)
            if place is None:
                break
            self.waiting.popleft()
            row.slot, row.lane = place
            self.lanes[row.slot][row.lane] = row
            admitted.setdefault(row.slot, []).append(row)
        for slot, rows in admitted.items():
            n_tokens = max(len(r.q_ids) + len(r.scored) for r in rows)
            size = min(ADMIT_BATCH, self.decoder.prefill_rows(slot, n_tokens))
            for start in range(0, len(rows), size):
                group = rows[start:start + size]
                try:
                    self._prefill(group)
                except BaseException as exc:  # noqa: BLE001
                    for row in group:
                        self._release(row)
                        self._finish(row, exc)
                    if not isinstance(exc, (ValueError, Cancelled)):
                        raise

    def _place(self, row: Row) -> tuple[int, int] | None:
        """(slot, lane) for ``row``: a free lane of the slot already decoding its prefix; else the
        lowest slot with nothing decoding, its prefix loaded there (moved down if it sits higher):
        a step spans slots [0, highest in use], so keeping them low keeps steps narrow."""
        d = self.decoder
        identity = (id(row.prefix.cache), row.prefix.length, row.prefix.key)
        slot = d.slot_of(identity)
        if slot is not None and any(r is not None for r in self.lanes[slot]):
            return (slot, self.lanes[slot].index(None)) if None in self.lanes[slot] else None
        idle = next((s for s in range(d.max_slots) if all(r is None for r in self.lanes[s])), None)
        if idle is None:
            return None
        d.load(idle, row.prefix.cache, row.prefix.length, identity)
        return idle, 0

    def _prefill(self, rows: list[Row]) -> None:
        """The questions of ``rows`` (one slot) in one forward, each followed by the teacher-forced
        "not in the video" answer, whose log-probability it keeps; then each row's first token."""
        e, d = self.engine, self.decoder
        started = time.perf_counter()
        embed = e.model.get_input_embeddings()
        embeds = [embed(torch.tensor(r.q_ids + r.scored[:-1], device=e.device)) for r in rows]
        picks = [list(range(len(r.q_ids) - 1, len(r.q_ids) - 1 + len(r.scored))) for r in rows]
        all_logits = d.prefill(rows[0].slot, [r.lane for r in rows], embeds, rows[0].prefix.next_position, picks)
        now = time.perf_counter()
        for row, logits in zip(rows, all_logits):
            row.absent_logprob = float(torch.log_softmax(logits, -1).gather(
                1, torch.tensor(row.scored, device=logits.device)[:, None]).sum())
            first = logits[0]
            token = int(first.argmax())
            row.rope = row.prefix.next_position + len(row.q_ids)
            row.pos = len(row.q_ids)
            row.started_s = now
            row.prefill_ms = (now - started) * 1e3
            self._advance(row, token, float(torch.softmax(first, -1)[token]))

    def _advance(self, row: Row, token: int, prob: float) -> None:
        """Take ``token`` as the row's next; finish the row or leave it ready for the next step."""
        if token in self.engine.stop_ids:
            self._release(row)
            self._finish(row)
            return
        row.tokens.append(token)
        row.probs.append(prob)
        if len(row.tokens) >= row.max_new_tokens or row.pos >= self.decoder.suffix - 1:
            self._release(row)
            self._finish(row)
            return
        d = self.decoder
        d.token_in[row.slot, row.lane] = token
        d.rope_in[row.slot, row.lane] = row.rope
        d.pos_in[row.slot, row.lane] = row.pos

    def _step(self) -> None:
        d = self.decoder
        active = self._active()
        for row in active:
            if row.should_stop is not None and row.should_stop():
                self._release(row)
                self._finish(row, Cancelled("cancelled"))
        active = self._active()
        if not active:
            return
        used_slots = max(r.slot for r in active) + 1
        used_lanes = max(r.lane for r in active) + 1
        tokens, probs = d.step(used_slots, used_lanes)
        self.steps += 1
        self.rows_stepped += len(active)
        for row in active:
            row.rope += 1
            row.pos += 1
            self._advance(row, int(tokens[row.slot, row.lane]), float(probs[row.slot, row.lane]))

    def _release(self, row: Row) -> None:
        if row.slot >= 0 and self.lanes[row.slot][row.lane] is row:
            self.lanes[row.slot][row.lane] = None
            d = self.decoder
            d.token_in[row.slot, row.lane] = 0
            d.rope_in[row.slot, row.lane] = 0
            d.pos_in[row.slot, row.lane] = 0

    @staticmethod
    def _finish(row: Row, error: BaseException | None = None) -> None:
        row.error = error
        row.done.set()

    def _fail_all(self, exc: BaseException) -> None:
        for row in self._active():
            self._release(row)
            self._finish(row, exc)
        with self.cond:
            while self.waiting:
                self._finish(self.waiting.popleft(), exc)

"""The answer parser: the model's forms, clamping and merging, confidences, and properties."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moments.workers.model.answer_parser import format_segment, parse_answer, parse_time


def spans(segments):
    return [(round(s.start_s, 3), round(s.end_s, 3)) for s in segments]


@pytest.mark.parametrize("text, expected", [
    ("The given query happens in 64.0 - 72.0 seconds.", [(64.0, 72.0)]),
    ("It happens from 1:04 to 1:12.", [(64.0, 72.0)]),
    ("00:01:04.5 to 00:01:10", [(64.5, 70.0)]),
    ("between 3 and 7.5 s", [(3.0, 7.5)]),
    ("From 64 seconds to 72 seconds", [(64.0, 72.0)]),
    ("2 - 3 minutes", [(120.0, 180.0)]),
    ("64.0-72.0s", [(64.0, 72.0)]),
    ('[{"start_time": 3.5, "end_time": 9}, {"start_time": "01:04.50", "end_time": "01:10.00"}]',
     [(3.5, 9.0), (64.5, 70.0)]),
    ('{"start_time": "00:12.25", "end_time": "00:20.75", "description": "a dog runs"}', [(12.25, 20.75)]),
    ("The event occurs in 10.0 - 20.0 seconds and again in 30.0 - 40.0 seconds.", [(10.0, 20.0), (30.0, 40.0)]),
])
def test_forms(text, expected):
    assert spans(parse_answer(text, 1000.0)) == expected


def test_clamp_drop_merge_sort():
    text = "50 - 60 s, 5 - 2 s, 10 - 20 s, 15 - 25 s, 90 - 200 s, 300 - 400 s, 0 - 1 s, 7 - 7 s"
    assert spans(parse_answer(text, 100.0)) == [(0.0, 1.0), (10.0, 25.0), (50.0, 60.0), (90.0, 100.0)]


@pytest.mark.parametrize("text", ["", "I cannot tell.", "The video shows 3 dogs.", "{not json", "[{}]", "::::",
                                  "1e999 - 1e999 seconds", "nan - inf s", "9" * 5000])
def test_no_time_gives_nothing(text):
    assert parse_answer(text, 100.0) == ()


def test_none_duration_means_no_upper_bound():
    assert spans(parse_answer("5000 - 6000 seconds", None)) == [(5000.0, 6000.0)]


def test_confidence_from_the_digit_tokens():
    pieces = [("The given query happens in ", 0.9), ("6", 0.5), ("4", 0.8), (".0 - ", 0.9), ("7", 0.2),
              ("2", 1.0), (".0", 0.7), (" seconds.", 0.99)]
    text = "".join(p for p, _ in pieces)
    (seg,) = parse_answer(text, 100.0, pieces)
    # Tokens holding digits of "64.0" and "72.0": 6, 4, ".0 - ", 7, 2, ".0".
    expected = math.exp(sum(math.log(p) for p in (0.5, 0.8, 0.9, 0.2, 1.0, 0.7)) / 6)
    assert seg.confidence == pytest.approx(expected)
    assert parse_answer(text, 100.0)[0].confidence == 0.0
    assert parse_answer(text, 100.0, pieces[:-1])[0].confidence == 0.0  # pieces that do not add up: unknown


def test_parse_time():
    assert parse_time("01:04.50") == 64.5
    assert parse_time("1:02:03") == 3723.0
    assert parse_time("12.5s") == 12.5
    assert parse_time(7) == 7.0
    assert parse_time(True) is None and parse_time("soon") is None and parse_time(float("nan")) is None


@settings(max_examples=300, deadline=None)
@given(st.text(), st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
def test_never_raises_and_output_is_well_formed(text, duration):
    segments = parse_answer(text, duration)
    bound = duration if duration is not None and math.isfinite(duration) else math.inf
    for s in segments:
        assert 0.0 <= s.start_s < s.end_s <= max(bound, 0.0)
        assert 0.0 <= s.confidence <= 1.0
    for a, b in zip(segments, segments[1:]):
        assert a.end_s < b.start_s


_times = st.floats(min_value=0, max_value=5000, allow_nan=False).map(lambda x: round(x, 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_times, _times), min_size=1, max_size=4), st.sampled_from(["model", "json", "clock"]),
       st.text(alphabet="abc ,.;\n", max_size=20))
def test_formatted_segments_round_trip(pairs, form, noise):
    pairs = [(min(a, b), max(a, b)) for a, b in pairs if abs(a - b) >= 0.1]
    if form == "model":
        text = noise.join(format_segment(a, b) for a, b in pairs)
    elif form == "json":
        text = json.dumps([{"start_time": a, "end_time": b} for a, b in pairs])
    else:
        def clock(x):
            m, s = divmod(x, 60)
            return f"{int(m // 60):02d}:{int(m % 60):02d}:{s:04.1f}"
        text = noise.join(f"from {clock(a)} to {clock(b)}." for a, b in pairs)
    expected = []
    for a, b in sorted(pairs):
        if expected and a <= expected[-1][1]:
            expected[-1] = (expected[-1][0], max(expected[-1][1], b))
        else:
            expected.append((a, b))
    got = parse_answer(text, 6000.0)
    assert len(got) == len(expected)
    for seg, (a, b) in zip(got, expected):
        assert seg.start_s == pytest.approx(a, abs=0.051) and seg.end_s == pytest.approx(b, abs=0.051)

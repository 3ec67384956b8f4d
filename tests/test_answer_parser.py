"""The answer parser: a table of what real grounding models write, the documented rules, precision
(numbers that are not times never become segments), absence, and properties."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moments.workers.model.answer_parser import (
    POINT_HALF_WIDTH_S,
    format_segment,
    format_segments,
    parse_segments,
    parse_time,
)

D = 5000.0

# (answer text, segments) as models write them. Sources: Qwen2.5-VL cookbook and model card, Qwen3-VL
# (clock and JSON forms), TimeChat / VTimeLLM / VTG-LLM style prose, Moment-DETR / QVHighlights
# relevant_windows, Momentor / UniVTG lists, Time-R1 / TimeZero <answer> tags, SRT subtitles.
REAL_FORMATS = [
    ("The given query happens in 64.0 - 72.0 seconds.", [(64.0, 72.0)]),
    ("The given query happens in 5.0 - 9.5 seconds and 20.0 - 24.0 seconds.", [(5.0, 9.5), (20.0, 24.0)]),
    ("The event happens from 00:12 to 00:17.", [(12.0, 17.0)]),
    ("It happens from 1:04 to 1:12.", [(64.0, 72.0)]),
    ("00:01:04.5 to 00:01:10", [(64.5, 70.0)]),
    ("between 3 and 7.5 s", [(3.0, 7.5)]),
    ("From 64 seconds to 72 seconds", [(64.0, 72.0)]),
    ("2 - 3 minutes", [(120.0, 180.0)]),
    ("64.0-72.0s", [(64.0, 72.0)]),
    ("The described content occurs between 12.5s and 18.0s.", [(12.5, 18.0)]),
    ("From 12.5 to 18.0 seconds.", [(12.5, 18.0)]),
    ("The moment happens at around 30.2 - 35.9 seconds in the video.", [(30.2, 35.9)]),
    ('[{"start_time": 3.5, "end_time": 9}, {"start_time": "01:04.50", "end_time": "01:10.00"}]',
     [(3.5, 9.0), (64.5, 70.0)]),
    ('{"start_time": "00:12.25", "end_time": "00:20.75", "description": "a dog runs"}', [(12.25, 20.75)]),
    ('```json\n[{"start": 12.5, "end": 18.0, "caption": "the man opens the door"}]\n```', [(12.5, 18.0)]),
    ('{"relevant_windows": [[2, 8], [10, 14]]}', [(2.0, 8.0), (10.0, 14.0)]),
    ('{"timestamps": [[30.0, 36.5]]}', [(30.0, 36.5)]),
    ('{"timestamp": [4, 9], "query": "a dog barks"}', [(4.0, 9.0)]),
    ('{"begin": "0:05", "end": "0:11"}', [(5.0, 11.0)]),
    ('{"start_s": 1.5, "end_s": 4}', [(1.5, 4.0)]),
    ("[12.5, 18.0]", [(12.5, 18.0)]),
    ("[[12.5, 18.0], [30, 35]]", [(12.5, 18.0), (30.0, 35.0)]),
    ("The timestamps are [12.5, 18.0].", [(12.5, 18.0)]),
    ("<answer>12.50 to 18.00</answer>", [(12.5, 18.0)]),
    ("The event starts at 12.5 seconds and ends at 18 seconds.", [(12.5, 18.0)]),
    ("It begins at 0:05 and finishes at 0:09.", [(5.0, 9.0)]),
    ("start: 00:01:05, end: 00:01:10", [(65.0, 70.0)]),
    ("Start time: 12.5s; End time: 20.0s", [(12.5, 20.0)]),
    ("00:00:05,000 --> 00:00:10,500", [(5.0, 10.5)]),
    ("1\n00:00:05,000 --> 00:00:10,500\nthe goalkeeper dives", [(5.0, 10.5)]),
    ("12.5s -> 18s", [(12.5, 18.0)]),
    ("from 1m05s to 1m12s", [(65.0, 72.0)]),
    ("from 1 min 5 s to 1 min 10 s", [(65.0, 70.0)]),
    ("from 1 minute 5 seconds to 1 minute 10 seconds", [(65.0, 70.0)]),
    ("between 1h02m03s and 1h02m10s", [(3723.0, 3730.0)]),
    ("It happens at 12 seconds.", [(12.0 - POINT_HALF_WIDTH_S, 12.0 + POINT_HALF_WIDTH_S)]),
    ("The goal is scored at 1:05.", [(64.0, 66.0)]),
    ("from 20 to 10 seconds", [(10.0, 20.0)]),
    ("in the first 10 seconds", [(0.0, 10.0)]),
    ("It happens in the last 30 seconds.", [(D - 30.0, D)]),
    ("It is visible throughout the video.", [(0.0, D)]),
    ("12,5 - 18,0 seconds", [(12.5, 18.0)]),
    ("The event happens 5 − 10 seconds in.", [(5.0, 10.0)]),
    ("Between 00:12 and 00:17", [(12.0, 17.0)]),
    ("It starts at 3 seconds and ends at 7 seconds when 2 dogs bark", [(3.0, 7.0)]),
    ("The event occurs in 10.0 - 20.0 seconds and again in 30.0 - 40.0 seconds.", [(10.0, 20.0), (30.0, 40.0)]),
]

# Texts with numbers that are not times, or no time at all: never a segment.
NOT_TIMES = [
    "The score was 2-1.",
    "50% - 60% of the frame is red.",
    "It happens in 2023-2024.",
    "There are 3 people and 5 dogs.",
    "It starts with 3 dogs and ends with 5 cats.",
    "[120, 340, 560, 780]",
    '[{"bbox_2d": [120, 340, 560, 780], "label": "dog"}]',
    "The video is 1920x1080.",
    "The video shows 3 dogs.",
    "I cannot tell.",
    "",
    "{not json",
    "[{}]",
    "::::",
    "1e999 - 1e999 seconds",
    "nan - inf s",
    "9" * 5000,
    "Frames 30-60 show the dog.",
]

ABSENT = [
    "The given query does not occur in the video.",
    "The event does not happen in this video.",
    "There is no such moment in the video.",
    "Not found.",
    "The described content is not present in the video.",
    "None",
    "I am unable to find this event.",
    "The red triangle never appears.",
    "It doesn't appear in the video.",
]


def spans(parsed):
    return [(round(a, 3), round(b, 3)) for a, b in parsed.segments]


@pytest.mark.parametrize("text, expected", REAL_FORMATS)
def test_real_formats(text, expected):
    parsed = parse_segments(text, D)
    assert spans(parsed) == expected
    assert not parsed.absent


@pytest.mark.parametrize("text", NOT_TIMES)
def test_numbers_that_are_not_times_are_never_segments(text):
    assert parse_segments(text, 100.0).segments == ()


@pytest.mark.parametrize("text", ABSENT)
def test_absence_is_recognised(text):
    parsed = parse_segments(text, 100.0)
    assert parsed.absent and parsed.said_absent


def test_a_time_wins_over_absence_words():
    parsed = parse_segments("The dog does not stop running from 3 to 7 seconds.", 100.0)
    assert spans(parsed) == [(3.0, 7.0)] and not parsed.said_absent


def test_clamp_drop_merge_sort():
    text = "50 - 60 s, 5 - 2 s, 10 - 20 s, 15 - 25 s, 90 - 200 s, 300 - 400 s, 0 - 1 s, 7 - 7 s"
    # 5 - 2 s is reversed: read as 2 - 5 s. 300 - 400 s lies past the end: clamped to nothing.
    assert spans(parse_segments(text, 100.0)) == [(0.0, 1.0), (2.0, 5.0), (10.0, 25.0), (50.0, 60.0), (90.0, 100.0)]


def test_none_duration_means_no_upper_bound():
    assert spans(parse_segments("5000 - 6000 seconds", None)) == [(5000.0, 6000.0)]
    assert parse_segments("in the last 30 seconds", None).segments == ()  # needs the duration


def test_parse_time():
    assert parse_time("01:04.50") == 64.5
    assert parse_time("1:02:03") == 3723.0
    assert parse_time("12.5s") == 12.5
    assert parse_time("1m05s") == 65.0
    assert parse_time("00:00:05,250") == 5.25
    assert parse_time(7) == 7.0
    assert parse_time(True) is None and parse_time("soon") is None and parse_time(float("nan")) is None
    assert parse_time("1:75") is None  # seconds past 59: not a clock


@settings(max_examples=300, deadline=None)
@given(st.text(), st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)))
def test_never_raises_and_output_is_well_formed(text, duration):
    parsed = parse_segments(text, duration)
    bound = duration if duration is not None and math.isfinite(duration) else math.inf
    for a, b in parsed.segments:
        assert 0.0 <= a < b <= max(bound, 0.0)
    for x, y in zip(parsed.segments, parsed.segments[1:]):
        assert x[1] < y[0]
    assert parsed.absent == (not parsed.segments)


_times = st.floats(min_value=0, max_value=5000, allow_nan=False).map(lambda x: round(x, 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_times, _times), min_size=1, max_size=4), st.sampled_from(["model", "json", "clock", "srt"]),
       st.text(alphabet="abc ,;\n", max_size=20))
def test_formatted_segments_round_trip(pairs, form, noise):
    pairs = [(min(a, b), max(a, b)) for a, b in pairs if abs(a - b) >= 0.1]

    def clock(x, sep="."):
        m, s = divmod(x, 60)
        return f"{int(m // 60):02d}:{int(m % 60):02d}:{s:04.1f}".replace(".", sep)

    if form == "model":
        text = format_segments(pairs) if pairs else ""
    elif form == "json":
        text = json.dumps([{"start_time": a, "end_time": b} for a, b in pairs])
    elif form == "clock":
        text = noise.join(f"from {clock(a)} to {clock(b)}." for a, b in pairs)
    else:
        text = "\n\n".join(f"{i + 1}\n{clock(a, ',')} --> {clock(b, ',')}\nline" for i, (a, b) in enumerate(pairs))
    expected = []
    for a, b in sorted(pairs):
        if expected and a <= expected[-1][1]:
            expected[-1] = (expected[-1][0], max(expected[-1][1], b))
        else:
            expected.append((a, b))
    got = parse_segments(text, 6000.0).segments
    assert len(got) == len(expected), text
    for (ga, gb), (a, b) in zip(got, expected):
        assert ga == pytest.approx(a, abs=0.051) and gb == pytest.approx(b, abs=0.051)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 99), st.integers(0, 99), st.sampled_from(["%", " people", " goals", " times", "x1080", " px"]),
       st.sampled_from(["", "The count was ", "There were ", "Score: "]))
def test_number_pairs_with_other_units_are_never_segments(a, b, unit, lead):
    assert parse_segments(f"{lead}{a}{unit} - {b}{unit}", 1000.0).segments == ()
    assert parse_segments(f"{lead}{a}-{b}{unit}", 1000.0).segments == ()


def test_format_segment_is_the_model_form():
    assert format_segment(64.0, 72.0) == "The given query happens in 64.0 - 72.0 seconds."

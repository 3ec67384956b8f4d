"""Turn a model's free-text answer into time segments, or into "not in this video".

Precision first: numbers become a segment only when the text says they are times, by a unit
(``12 s``, ``1.5 minutes``, ``1m05s``), a clock form (``1:04``, ``00:01:04.5``, SRT ``00:01:04,500``),
JSON keys (``start_time``/``end_time``, ``timestamp``, ``relevant_windows``...), or a temporal phrase
around bare numbers (``from 3 to 7``, ``between 3 and 7``, ``happens in 3 - 7``, ``starts at 3 and
ends at 7``). A pair of numbers with no such sign (a score ``2-1``, ``50%``, ``3 people``, a year
range, a bounding box) is never a segment.

Documented rules:

* a reversed range (``from 20 to 10 seconds``) is read as the range between its two times;
* a point in time (``at 12 seconds``, ``around 1:05``) is the segment ``POINT_HALF_WIDTH_S`` either
  side of it;
* ``in the first N seconds`` is ``[0, N]``; ``in the last N seconds`` and ``the whole video`` need the
  duration;
* segments are clamped to ``[0, duration]``, empty ones dropped, overlapping ones merged;
* an answer with no segment is *absent* (``ParsedAnswer.absent``) whether or not it says so in words;
  ``said_absent`` tells the explicit "it does not happen" answers apart.

Understands what Qwen2.5-VL, Qwen3-VL and grounding fine-tunes write (see tests/test_answer_parser.py).
Never raises on any text.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

POINT_HALF_WIDTH_S = 1.0
"""A point in time becomes [t - 1 s, t + 1 s]."""
MAX_TEXT_CHARS = 100_000

_NUM = r"\d+(?:\.\d+)?"
_BARE = r"\d+(?:\.\d+|,\d{1,2}(?!\d))?"
"""A bare number; a comma with one or two digits after it is a decimal comma ("12,5"), a comma with
three is a thousands separator and ends the number."""
_UNIT_S = r"(?:seconds?|secs?|s)"
_UNIT_M = r"(?:minutes?|mins?|m)"
_UNIT_H = r"(?:hours?|hrs?|h)"
_CLOCK = r"(?:\d{1,2}:)?\d{1,3}:\d{2}(?:[.,]\d+)?"
# "1h2m3.5s", "1 min 5 s", "1 minute 5 seconds", "2h 30m", "90 s", "1.5 minutes" (decimal comma too).
_END_UNIT = r"(?![a-z])\.?"
_COMPOUND = (
    rf"(?=\d)(?:(?P<h>{_BARE})\s*{_UNIT_H}{_END_UNIT}\s*)?"
    rf"(?:(?P<m>{_BARE})\s*{_UNIT_M}{_END_UNIT}\s*)?"
    rf"(?:(?P<s>{_BARE})\s*{_UNIT_S}{_END_UNIT})?"
)
_TIME_RE = re.compile(
    rf"(?<![\w.:,])(?:(?P<clock>{_CLOCK})|(?P<compound>{_COMPOUND})|(?P<bare>{_BARE}))(?![\w:])",
    re.IGNORECASE,
)
_SEP_RE = re.compile(r"^\s*(?:-{1,2}>|->|→|⟶|–|—|−|-|~|to|until|till|through|thru|and)\s*", re.IGNORECASE)
_CONTEXT_BEFORE_RE = re.compile(
    r"(?:from|between|during|in|within|at|around|about|approximately|roughly|occurs?|occurring|happens?|happening|"
    r"appears?|appearing|seen|visible|shown|starts?|starting|begins?|beginning|ends?|ending|time(?:stamps?)?|"
    r"window|interval|segment|moment|clip|span|range)\s*[:=]?\s*(?:the\s+)?(?:time\s+)?(?:period\s+)?(?:of\s+)?$",
    re.IGNORECASE,
)
_NOT_TIME_AFTER_RE = re.compile(
    r"^\s*(?:%|percent|px|pixels?|frames?|fps|times|people|persons?|objects?|items?|goals?|points?|votes?|years?|"
    r"kg|km|cm|mm|meters?|metres?|x\d|\*\d|/\d)", re.IGNORECASE)
_LABELLED_RE = re.compile(
    r"(?:start(?:s|ing)?|begin(?:s|ning)?|from)(?:\s+time)?(?:\s+(?:at|is))?\s*[:=]?\s*(?P<a>[^,;\n]{1,40}?)\s*"
    r"(?:,|;|\band\b|\n|\s)\s*(?:it\s+)?(?:end(?:s|ing)?|finish(?:es|ing)?|stop(?:s|ping)?|to|until)(?:\s+time)?"
    r"(?:\s+(?:at|is))?\s*[:=]?\s*(?P<b>(?:[^,;.\n]|\.\d){1,40})", re.IGNORECASE)
_POINT_RE = re.compile(r"\b(?:at|around|about|approximately|roughly|near)\s+(?:the\s+)?(?:time\s+)?(?:of\s+)?",
                       re.IGNORECASE)
_FIRST_LAST_RE = re.compile(
    r"\b(?:in|during|within|over)\s+the\s+(?P<which>first|last|final|opening|closing)\s+", re.IGNORECASE)
_WHOLE_RE = re.compile(r"\b(?:the\s+(?:whole|entire|full)\s+(?:video|clip)|throughout\s+the\s+(?:video|clip)|"
                       r"from\s+(?:the\s+)?(?:beginning|start)\s+to\s+(?:the\s+)?end)\b", re.IGNORECASE)
_ABSENT_RE = re.compile(
    r"\b(?:(?:does|do|did|is|are|was|were|can|could)\s*(?:not|n't)|doesn't|don't|didn't|isn't|aren't|wasn't|"
    r"weren't|cannot|can't|never|no\s+(?:such|relevant|matching|occurrence|moment|segment|instance|evidence|sign)|"
    r"there\s+is\s+no|not\s+(?:found|present|shown|visible|seen|in\s+the\s+video|included|depicted|applicable)|"
    r"absent|none|n/a|unable\s+to\s+(?:find|locate|identify))\b", re.IGNORECASE)
_JSON_START = re.compile(r"[\[{]")
_START_KEYS = ("start_time", "start", "begin", "start_s", "start_sec", "start_seconds", "starttime",
               "start_timestamp", "t_start", "from", "begin_time", "onset")
_END_KEYS = ("end_time", "end", "stop", "end_s", "end_sec", "end_seconds", "endtime", "end_timestamp",
             "t_end", "to", "end_time_s", "offset", "finish")
_LIST_KEYS = ("timestamp", "timestamps", "time", "times", "relevant_windows", "windows", "window", "segments",
              "segment", "intervals", "interval", "spans", "span", "moments", "events", "answer", "result",
              "results", "predictions", "clips")


@dataclass(frozen=True)
class ParsedAnswer:
    """What an answer says: segments in seconds (sorted, merged, clamped), or nothing."""

    segments: tuple[tuple[float, float], ...]
    said_absent: bool
    """The text says in words that the event does not happen (and names no time)."""

    @property
    def absent(self) -> bool:
        return not self.segments


def _float(text: str) -> float | None:
    try:
        v = float(text.replace(",", "."))
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _clock_s(text: str) -> float | None:
    parts = text.replace(",", ".").split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        return None
    if len(values) > 1 and values[-1] >= 60:
        return None
    if len(values) == 3 and values[1] >= 60:
        return None
    total = 0.0
    for v in values:
        total = total * 60 + v
    return total if math.isfinite(total) else None


@dataclass(frozen=True)
class _Time:
    start: int
    end: int
    value_s: float
    has_unit: bool
    """Written as a time (a unit or a clock form), not a bare number."""
    bare: str = ""
    scale: float | None = None
    """Seconds per unit when written as one number and one unit ("3 minutes": 60), else None."""


def _times(text: str) -> list[_Time]:
    out = []
    for m in _TIME_RE.finditer(text):
        if m.group("clock"):
            v = _clock_s(m.group("clock"))
            if v is not None:
                out.append(_Time(m.start(), m.end(), v, True))
        elif m.group("compound") and any(m.group(k) for k in ("h", "m", "s")):
            h, mi, s = (_float(m.group(k)) if m.group(k) else 0.0 for k in ("h", "m", "s"))
            parts = [k for k in ("h", "m", "s") if m.group(k)]
            scale = {"h": 3600.0, "m": 60.0, "s": 1.0}[parts[0]] if len(parts) == 1 else None
            if None not in (h, mi, s):
                out.append(_Time(m.start(), m.end(), h * 3600 + mi * 60 + s, True, scale=scale))
        elif m.group("bare"):
            v = _float(m.group("bare"))
            if v is not None:
                out.append(_Time(m.start(), m.end(), v, False, m.group("bare")))
    return out


_TRAILING_UNIT_RE = re.compile(rf"^\s*(?:(?P<s>{_UNIT_S})|(?P<m>{_UNIT_M})|(?P<h>{_UNIT_H}))\b", re.IGNORECASE)


def _trailing_unit(text: str, pos: int) -> float | None:
    """Seconds per unit of a unit word right after ``pos`` ("... 3 - 7 seconds"), else None."""
    m = _TRAILING_UNIT_RE.match(text, pos)
    if not m:
        return None
    return 1.0 if m.group("s") else 60.0 if m.group("m") else 3600.0


def _has_context(text: str, start: int) -> bool:
    before = text[max(0, start - 40):start]
    return bool(_CONTEXT_BEFORE_RE.search(before))


def _plausible_bare(t: _Time) -> bool:
    v = t.value_s
    if "." not in t.bare and len(t.bare) == 4 and 1900 <= v <= 2100:
        return False  # a year
    return True


def _pair_segments(text: str, times: list[_Time]) -> tuple[list[tuple[float, float]], set[int]]:
    """Ranges ``A <sep> B``; returns segments and the indices of the times they used."""
    segs, used = [], set()
    i = 0
    while i < len(times) - 1:
        a, b = times[i], times[i + 1]
        sep = _SEP_RE.match(text[a.end:b.start]) if b.start >= a.end else None
        if sep is None or sep.end() != b.start - a.end:
            i += 1
            continue
        if _NOT_TIME_AFTER_RE.match(text, b.end):
            i += 2
            continue
        unit = _trailing_unit(text, b.end)
        va, vb = a.value_s, b.value_s
        if not b.has_unit and unit is not None:
            vb *= unit
        if not a.has_unit:
            # "2 - 3 minutes": the unit written after the second number is the first one's too.
            scale = unit if unit is not None else b.scale
            va *= scale if scale is not None else 1.0
        sep_word = sep.group(0).strip().lower()
        timed = a.has_unit or b.has_unit or unit is not None
        if not timed:
            # Bare numbers: only with a temporal phrase before them, or as the whole answer.
            alone = text[:a.start].strip() == "" and text[b.end:].strip(" .") == ""
            if not ((_has_context(text, a.start) or alone) and _plausible_bare(a) and _plausible_bare(b)):
                i += 1
                continue
        if sep_word == "and" and not (_has_context(text, a.start) or timed):
            i += 1
            continue
        segs.append((min(va, vb), max(va, vb)))
        used.update((i, i + 1))
        i += 2
    return segs, used


def _labelled_segments(text: str) -> list[tuple[float, float]]:
    """``starts at X and ends at Y``, ``start: X, end: Y``, ``start time 00:01, end time 00:05``."""
    segs = []
    for m in _LABELLED_RE.finditer(text):
        ta, tb = _times(m.group("a")), _times(m.group("b"))
        # Each label must be followed by its time ("starts with 3 dogs" is no time).
        if len(ta) != 1 or not tb or ta[0].start != 0 or tb[0].start != 0:
            continue
        a, b = ta[0], tb[0]
        unit_b = _trailing_unit(m.group("b"), tb[0].end)
        va = a.value_s if a.has_unit or unit_b is None else a.value_s * unit_b
        vb = b.value_s if b.has_unit or unit_b is None else b.value_s * unit_b
        segs.append((min(va, vb), max(va, vb)))
    return segs


def _point_segments(text: str, times: list[_Time], used: set[int]) -> list[tuple[float, float]]:
    segs = []
    for k, t in enumerate(times):
        if k in used:
            continue
        unit = _trailing_unit(text, t.end)
        if not (t.has_unit or unit is not None):
            continue
        before = text[max(0, t.start - 30):t.start]
        if not _POINT_RE.search(before) or _FIRST_LAST_RE.search(before):
            continue
        v = t.value_s * (unit if not t.has_unit and unit else 1.0)
        segs.append((v - POINT_HALF_WIDTH_S, v + POINT_HALF_WIDTH_S))
    return segs


def _first_last_segments(text: str, duration_s: float | None) -> list[tuple[float, float]]:
    segs = []
    for m in _FIRST_LAST_RE.finditer(text):
        ts = _times(text[m.end():m.end() + 30])
        if not ts or ts[0].start != 0:
            continue
        t = ts[0]
        unit = _trailing_unit(text, m.end() + t.end)
        if not (t.has_unit or unit is not None):
            continue
        n = t.value_s * (unit if not t.has_unit and unit else 1.0)
        if m.group("which").lower() in ("first", "opening"):
            segs.append((0.0, n))
        elif duration_s is not None and math.isfinite(duration_s):
            segs.append((duration_s - n, duration_s))
    if duration_s is not None and math.isfinite(duration_s) and _WHOLE_RE.search(text):
        segs.append((0.0, duration_s))
    return segs


# ------------------------------------------------------------------------------------- JSON

def parse_time(value: object) -> float | None:
    """Seconds from a number or a time string (``[hh:]mm:ss[.ff]``, ``12.5s``, ``1m05s``); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if not isinstance(value, str):
        return None
    s = value.strip()
    ts = _times(s)
    if len(ts) != 1 or ts[0].start != 0 or ts[0].end != len(s.rstrip(".")):
        return None
    t = ts[0]
    return t.value_s


def _json_blocks(text: str) -> Iterable[object]:
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        m = _JSON_START.search(text, pos)
        if not m:
            return
        try:
            obj, end = decoder.raw_decode(text, m.start())
        except ValueError:
            pos = m.start() + 1
            continue
        yield obj
        pos = end


def _pair_of(value: object) -> tuple[float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        a, b = parse_time(value[0]), parse_time(value[1])
        if a is not None and b is not None:
            return (min(a, b), max(a, b))
    return None


def _from_json(obj: object, depth: int = 0) -> list[tuple[float, float]]:
    if depth > 6:
        return []
    if isinstance(obj, dict):
        keys = {str(k).lower().replace(" ", "_"): v for k, v in obj.items()}
        start = next((parse_time(keys[k]) for k in _START_KEYS if k in keys), None)
        end = next((parse_time(keys[k]) for k in _END_KEYS if k in keys), None)
        if start is not None and end is not None:
            return [(min(start, end), max(start, end))]
        out = []
        for k in _LIST_KEYS:
            if k in keys:
                pair = _pair_of(keys[k])
                out += [pair] if pair else _from_json(keys[k], depth + 1)
        return out
    if isinstance(obj, list):
        pair = _pair_of(obj)
        if pair is not None:
            return [pair]
        out = []
        for item in obj:
            out += _from_json(item, depth + 1)
        return out
    return []


def _list_in_text(text: str) -> list[tuple[float, float]]:
    """``[a, b]`` / ``[[a, b], [c, d]]`` written in prose: times when the prose is about time (or the
    answer is just the list). Four numbers (a bounding box) never are."""
    segs = []
    temporal = bool(re.search(r"\b(?:seconds?|secs?|time|timestamps?|windows?|moments?|occurs?|happens?|"
                              r"appears?|during|interval|segment|clip)\b", text, re.IGNORECASE))
    for obj in _json_blocks(text):
        if not isinstance(obj, list):
            continue
        found = _from_json(obj)
        if found and (temporal or len(json.dumps(obj)) >= 0.6 * len(text.strip())):
            segs += found
    return segs


# ------------------------------------------------------------------------------------- entry

def parse_segments(text: str, duration_s: float | None = None) -> ParsedAnswer:
    """What ``text`` says (see the module docstring); never raises."""
    try:
        return _parse(str(text)[:MAX_TEXT_CHARS], duration_s)
    except Exception:  # noqa: BLE001 - a model's prose must never fail a job
        return ParsedAnswer((), False)


_TAG_RE = re.compile(r"</?[a-zA-Z_][\w-]{0,20}>")
"""Markup some models wrap answers in (``<answer>...</answer>``, ``<think>``)."""


def _parse(text: str, duration_s: float | None) -> ParsedAnswer:
    text = _TAG_RE.sub(" ", text)
    limit = float(duration_s) if duration_s is not None and math.isfinite(duration_s) else math.inf
    raw: list[tuple[float, float]] = []
    objects = [o for o in _json_blocks(text) if isinstance(o, dict)] if "{" in text else []
    for obj in objects:
        raw += _from_json(obj)
    if not raw and "[" in text:
        raw += _list_in_text(text)
    if not raw:
        times = _times(text)
        pairs, used = _pair_segments(text, times)
        raw += pairs or _labelled_segments(text)
        if not raw:
            raw += _first_last_segments(text, duration_s)
        if not raw:
            raw += _point_segments(text, times, used)
    clamped = []
    for a, b in raw:
        a, b = max(0.0, min(a, limit)), max(0.0, min(b, limit))
        if math.isfinite(a) and math.isfinite(b) and b > a:
            clamped.append((a, b))
    segments = _merge(clamped)
    return ParsedAnswer(segments, not segments and bool(_ABSENT_RE.search(text)))


def _merge(segments: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(segments):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return tuple(merged)


def format_segments(segments: Iterable[tuple[float, float]]) -> str:
    """The answer form the grounder is trained to write: Qwen2.5-VL's ``The given query happens in 64.0 -
    72.0 seconds.``, with ``and`` between several occurrences."""
    parts = [f"{a:.1f} - {b:.1f} seconds" for a, b in segments]
    return f"The given query happens in {' and '.join(parts)}."


def format_segment(start_s: float, end_s: float) -> str:
    return format_segments([(start_s, end_s)])

"""Turn the model's free-text answer into time segments.

Understands the forms Qwen2.5-VL writes and a few more: ``64.0 - 72.0 seconds``, ``from 1:04 to
1:12``, ``00:01:04.5 to 00:01:10``, ``between 3 and 7.5 s``, JSON objects or lists with
``start_time``/``end_time`` (seconds or ``mm:ss.ff`` strings), several segments in one answer.
Segments are clamped to ``[0, duration]``; empty or inverted ones are dropped; overlaps merged.
Never raises on any text.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

from moments.core.records import Segment

TokenProbs = Sequence[tuple[str, float]]
"""Generated tokens as ``(decoded piece, probability)``; the pieces concatenate to the answer text."""

_TIME = r"(?:\d{1,3}:)?\d{1,3}:\d{1,2}(?:\.\d+)?|\d{1,7}(?:\.\d+)?|\.\d+"
_UNIT = r"(?:seconds?|secs?|s|minutes?|mins?|hours?|hrs?)\b\.?"
_SEP = r"(?:-{1,2}|–|—|~|to|and|until|till|through)"
_PAIR = re.compile(
    rf"(?<![\w.:])(?P<a>{_TIME})\s*(?P<ua>{_UNIT})?\s*{_SEP}\s*(?P<b>{_TIME})\s*(?P<ub>{_UNIT})?",
    re.IGNORECASE,
)
_OBJECT = re.compile(r"\{[^{}]*\}")
_START_KEYS = ("start_time", "start", "begin", "start_s", "from")
_END_KEYS = ("end_time", "end", "stop", "end_s", "to")
_MAX_TEXT = 100_000


def parse_time(value: object) -> float | None:
    """Seconds from a number or a ``[hh:]mm:ss[.ff]`` / ``ss[.ff]`` string; None when not a time."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if not isinstance(value, str):
        return None
    s = value.strip().lower().rstrip("s").strip()
    if not re.fullmatch(r"(?:\d+:){0,2}\d*\.?\d+", s):
        return None
    total = 0.0
    for part in s.split(":"):
        total = total * 60 + float(part)
    return total if math.isfinite(total) else None


def _unit_factor(unit: str | None) -> float:
    u = (unit or "").lower()
    if u.startswith(("min",)):
        return 60.0
    if u.startswith(("hour", "hr")):
        return 3600.0
    return 1.0


def _confidence(spans: list[tuple[int, int]], text: str, token_probs: TokenProbs | None) -> float:
    """Geometric mean of the probabilities of the tokens that wrote the digits inside ``spans``."""
    if not token_probs or "".join(p for p, _ in token_probs) != text:
        return 0.0
    digit_chars = {i for a, b in spans for i in range(a, b) if text[i].isdigit()}
    logs: list[float] = []
    pos = 0
    for piece, prob in token_probs:
        end = pos + len(piece)
        if any(i in digit_chars for i in range(pos, end)):
            logs.append(math.log(max(float(prob), 1e-12)))
        pos = end
    return float(math.exp(sum(logs) / len(logs))) if logs else 0.0


def _json_segments(text: str) -> list[tuple[float, float, list[tuple[int, int]]]]:
    found = []
    for m in _OBJECT.finditer(text):
        try:
            obj = json.loads(m.group(0))
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        keys = {str(k).lower(): v for k, v in obj.items()}
        start = next((parse_time(keys[k]) for k in _START_KEYS if k in keys), None)
        end = next((parse_time(keys[k]) for k in _END_KEYS if k in keys), None)
        if start is None and isinstance(keys.get("timestamp"), list) and len(keys["timestamp"]) == 2:
            start, end = parse_time(keys["timestamp"][0]), parse_time(keys["timestamp"][1])
        if start is not None and end is not None:
            found.append((start, end, [m.span()]))
    return found


def _text_segments(text: str) -> list[tuple[float, float, list[tuple[int, int]]]]:
    found = []
    for m in _PAIR.finditer(text):
        a, b = parse_time(m.group("a")), parse_time(m.group("b"))
        if a is None or b is None:
            continue
        unit_b = m.group("ub")
        unit_a = m.group("ua") or unit_b
        if ":" not in m.group("a"):
            a *= _unit_factor(unit_a)
        if ":" not in m.group("b"):
            b *= _unit_factor(unit_b or unit_a)
        found.append((a, b, [m.span("a"), m.span("b")]))
    return found


def parse_answer(text: str, duration_s: float | None, token_probs: TokenProbs | None = None) -> tuple[Segment, ...]:
    """Segments the answer names, sorted, merged, clamped to ``[0, duration_s]`` (no upper bound if None).

    ``confidence`` is the geometric mean probability of the generated tokens that wrote the
    segment's numbers (0 when ``token_probs`` is not given).
    """
    try:
        text = str(text)[:_MAX_TEXT]
        limit = float(duration_s) if duration_s is not None and math.isfinite(duration_s) else math.inf
        raw = _json_segments(text) or _text_segments(text)
        clamped: list[Segment] = []
        for start, end, spans in raw:
            start, end = max(0.0, min(start, limit)), max(0.0, min(end, limit))
            if not (math.isfinite(start) and math.isfinite(end)) or end <= start:
                continue
            clamped.append(Segment(start, end, _confidence(spans, text, token_probs)))
        return _merge(clamped)
    except Exception:  # noqa: BLE001 - a model's prose must never fail a job
        return ()


def _merge(segments: list[Segment]) -> tuple[Segment, ...]:
    merged: list[Segment] = []
    for seg in sorted(segments, key=lambda s: (s.start_s, s.end_s)):
        if merged and seg.start_s <= merged[-1].end_s:
            last = merged[-1]
            merged[-1] = Segment(last.start_s, max(last.end_s, seg.end_s), max(last.confidence, seg.confidence))
        else:
            merged.append(seg)
    return tuple(merged)


def format_segment(start_s: float, end_s: float) -> str:
    """The model's own answer form, e.g. ``The given query happens in 64.0 - 72.0 seconds.``"""
    return f"The given query happens in {start_s:.1f} - {end_s:.1f} seconds."

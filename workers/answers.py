"""From a generation to the API's answer: segments in video time, the calibrated score, found or not.

Kept apart from the pipeline (no Redis here), so training and evaluation use exactly the worker's rules.
"""

from __future__ import annotations

from moments.core.records import QueryResult, Segment
from moments.workers.model.answer_parser import parse_segments
from moments.workers.model.engine import Engine, Generation, VisualTokens


def answer_segments(generation: Generation, tokens: VisualTokens, duration_s: float, *,
                    confidence: float = 0.0) -> tuple[Segment, ...]:
    """Segments of an answer in video time: the model counts from the first sampled frame (rope id 0),
    and says nothing past the end of what it saw."""
    first = tokens.first_frame_s
    end = min(duration_s, max(tokens.span_end_s, first)) if tokens.frame_times_s else duration_s
    parsed = parse_segments(generation.text, max(0.0, end - first))
    return tuple(Segment(a + first, b + first, confidence) for a, b in parsed.segments)


def query_result(engine: Engine, index: int, query: str, generation: Generation, tokens: VisualTokens,
                 duration_s: float, min_confidence: float) -> QueryResult:
    """The API's answer to one query from one pass: segments at the pass's calibrated score, none when
    that score is below ``min_confidence`` (then not found)."""
    score = engine.presence_score(generation)
    segments = answer_segments(generation, tokens, duration_s, confidence=score)
    return QueryResult(index, query, segments if score >= min_confidence else (), generation.text, score,
                       generation.raw_presence)

"""Calibrated scores: a raw presence probability (1 - P(the "not in the video" answer)) mapped through
the checkpoint's Platt parameters, so a score p means about a fraction p of such answers are right.
Fitted by ``moments eval --write-calibration`` (``moments.tools.scoring.fit_platt``)."""

from __future__ import annotations

import math


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p) - math.log1p(-p)


def platt(raw: float, params: dict[str, float]) -> float:
    """sigmoid(a * logit(raw) + b); without parameters (a = 1, b = 0) the raw probability itself."""
    z = float(params.get("a", 1.0)) * logit(raw) + float(params.get("b", 0.0))
    return 1 / (1 + math.exp(-max(-60.0, min(60.0, z))))

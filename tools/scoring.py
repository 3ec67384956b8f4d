"""Scores for grounding answers: temporal IoU, recall per occurrence, AUROC, reliability bins and the
Platt calibration that maps a model's raw presence probability to a calibrated one."""

from __future__ import annotations

import math
from collections.abc import Sequence

from moments.workers.model.calibration import logit, platt  # noqa: F401 - platt: the inverse of fitting


def temporal_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Intersection over union of two [start, end] spans in seconds (0 when either is empty)."""
    if a[1] <= a[0] or b[1] <= b[0]:
        return 0.0
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union


def best_iou(truth: tuple[float, float], predicted: Sequence[tuple[float, float]]) -> float:
    """IoU of ``truth`` with the predicted segment that overlaps it most (0 without one)."""
    return max((temporal_iou(truth, p) for p in predicted), default=0.0)


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative (ties half)."""
    if not positives or not negatives:
        return float("nan")
    ranked = sorted([(s, 1) for s in positives] + [(s, 0) for s in negatives])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mid = (i + j + 1) / 2  # 1-based average rank of the tie group
        rank_sum += mid * sum(label for _, label in ranked[i:j])
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def reliability(scores: Sequence[float], labels: Sequence[int], bins: int = 10) -> list[dict]:
    """Per score bin: how many answers, their mean score and the fraction that were right."""
    rows = []
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        idx = [i for i, s in enumerate(scores) if lo <= s < hi or (k == bins - 1 and s == 1.0)]
        if idx:
            rows.append({"bin": f"{lo:.1f}-{hi:.1f}", "n": len(idx),
                         "mean_score": sum(scores[i] for i in idx) / len(idx),
                         "fraction_present": sum(labels[i] for i in idx) / len(idx)})
    return rows


def fit_platt(raw: Sequence[float], labels: Sequence[int], *, steps: int = 500,
              balanced: bool = False) -> dict[str, float]:
    """Platt scaling: a, b maximizing the likelihood of ``labels`` under sigmoid(a * logit(raw) + b)
    (Newton's method with a small ridge and step halving, so well-separated scores cannot make it
    diverge; Platt's target smoothing for few examples). ``balanced`` weights both classes equally,
    so the fit does not inherit the share of present questions in the set (a 50% prior)."""
    x = [logit(r) for r in raw]
    n_pos, n_neg = sum(labels), len(labels) - sum(labels)
    t = [(n_pos + 1) / (n_pos + 2) if y else 1 / (n_neg + 2) for y in labels]
    n = len(labels)
    wt = [(n / (2 * n_pos) if y else n / (2 * n_neg)) if balanced and n_pos and n_neg else 1.0 for y in labels]
    ridge = 1e-3

    def loss(a: float, b: float) -> float:
        total = ridge * (a * a + b * b) / 2
        for xi, ti, wi in zip(x, t, wt):
            z = a * xi + b  # cross-entropy of sigmoid(z) against ti, stable for any z
            total += wi * (max(z, 0.0) - ti * z + math.log1p(math.exp(-abs(z))))
        return total

    a, b = 1.0, 0.0
    current = loss(a, b)
    for _ in range(steps):
        ga, gb, haa, hab, hbb = ridge * a, ridge * b, ridge, 0.0, ridge
        for xi, ti, wi in zip(x, t, wt):
            z = max(-60.0, min(60.0, a * xi + b))
            p = 1 / (1 + math.exp(-z))
            ga += wi * (p - ti) * xi
            gb += wi * (p - ti)
            w = wi * p * (1 - p)
            haa += w * xi * xi
            hab += w * xi
            hbb += w
        det = haa * hbb - hab * hab
        if det <= 0:
            break
        da = (hbb * ga - hab * gb) / det
        db = (haa * gb - hab * ga) / det
        step, trial = 1.0, current
        while step > 1e-6:  # halve the Newton step until the loss goes down
            trial = loss(a - step * da, b - step * db)
            if trial <= current:
                break
            step /= 2
        else:
            break
        a, b, current = a - step * da, b - step * db, trial
        if abs(step * da) < 1e-9 and abs(step * db) < 1e-9:
            break
    return {"a": a, "b": b}


"""Reward-model metrics (paper Sec. 4.1, 5.3): PLCC, SRCC, HPA (Eq. 17), margin HPA, GSB (Eq. 21).

Pairs for HPA are all same-group (same prompt, same dimension) pairs with non-tied human scores. A pair
counts as correct only when ``(mu_a - mu_b) * (s_a - s_b) > 0``: a tied prediction is wrong.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np
from scipy import stats

# Human scores closer than this are a tie (scores are multiples of 0.5, or trimmed means of them).
TIE_TOLERANCE = 1e-9


def _as_array(name: str, x) -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite")
    return array


def _pair_up(pred, target) -> tuple[np.ndarray, np.ndarray]:
    pred, target = _as_array("pred", pred), _as_array("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same length, got {pred.size} and {target.size}")
    return pred, target


def plcc(pred, target) -> float:
    """Pearson linear correlation (NaN when either side is constant or has fewer than 2 entries)."""
    pred, target = _pair_up(pred, target)
    if pred.size < 2 or np.ptp(pred) == 0 or np.ptp(target) == 0:
        return float("nan")
    return float(stats.pearsonr(pred, target)[0])


def srcc(pred, target) -> float:
    """Spearman rank correlation, ties given average ranks (NaN when either side is constant)."""
    pred, target = _pair_up(pred, target)
    if pred.size < 2 or np.ptp(pred) == 0 or np.ptp(target) == 0:
        return float("nan")
    return float(stats.spearmanr(pred, target)[0])


def non_tied_pairs(groups: Sequence[Hashable], target, min_gap: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays ``(a, b)``, ``a < b``, of same-group pairs whose scores differ by more than ``min_gap``."""
    target = _as_array("target", target)
    if len(groups) != target.size:
        raise ValueError(f"groups and target must have the same length, got {len(groups)} and {target.size}")
    members = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    first, second = [], []
    for indices in members.values():
        for i, a in enumerate(indices):
            for b in indices[i + 1:]:
                if abs(target[a] - target[b]) > min_gap + TIE_TOLERANCE:
                    first.append(a)
                    second.append(b)
    return np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)


def hpa(pred, target, groups: Sequence[Hashable], min_gap: float = 0.0) -> float:
    """Eq. 17: fraction of same-group pairs with non-tied human scores whose predicted order agrees.

    ``min_gap`` keeps only pairs with ``|s_a - s_b| > min_gap``. NaN when there is no such pair.
    """
    pred, target = _pair_up(pred, target)
    a, b = non_tied_pairs(groups, target, min_gap)
    if a.size == 0:
        return float("nan")
    return float(np.mean((pred[a] - pred[b]) * (target[a] - target[b]) > 0))


def margin_hpa(pred, target, groups: Sequence[Hashable], margin: float = 0.5) -> float:
    """HPA on the pairs whose human score gap exceeds ``margin`` (0.5 in the paper)."""
    return hpa(pred, target, groups, min_gap=margin)


def gsb(good: int, same: int, bad: int) -> float:
    """Eq. 21: ``(G - B) / (G + S + B)`` from the counts of Good / Same / Bad judgements."""
    counts = (good, same, bad)
    if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in counts):
        raise ValueError(f"good, same and bad must be non-negative integer counts, got {counts}")
    total = good + same + bad
    if total == 0:
        raise ValueError("gsb needs at least one judgement")
    return (good - bad) / total


def gsb_counts(candidate, baseline, tolerance: float = 0.0) -> tuple[int, int, int]:
    """Good / Same / Bad counts of paired scores: ``candidate`` beats, ties (within ``tolerance``) or loses."""
    candidate, baseline = _as_array("candidate", candidate), _as_array("baseline", baseline)
    if candidate.shape != baseline.shape:
        raise ValueError(f"candidate and baseline must have the same length, got {candidate.size} and {baseline.size}")
    diff = candidate - baseline
    return int((diff > tolerance).sum()), int((np.abs(diff) <= tolerance).sum()), int((diff < -tolerance).sum())


def reward_metrics(pred, target, groups: Sequence[Hashable]) -> dict[str, float | int]:
    """All calibration and ranking metrics of one set of predictions, with the sample and pair counts."""
    pred, target = _pair_up(pred, target)
    return {
        "n": int(pred.size),
        "pairs": int(non_tied_pairs(groups, target)[0].size),
        "margin_pairs": int(non_tied_pairs(groups, target, 0.5)[0].size),
        "plcc": plcc(pred, target),
        "srcc": srcc(pred, target),
        "hpa": hpa(pred, target, groups),
        "margin_hpa": margin_hpa(pred, target, groups),
    }

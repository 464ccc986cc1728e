"""Ranking quality per user (NDCG@k, recall@k) and its statistics over users.

Pure functions for `benchmarks.quality`: a ranked list is scored against a user's held-out
truth, best first; the scores of many users are summed up as a mean with a 95% confidence
interval, and two systems scored on the same users are compared as a paired difference.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["mean_ci", "ndcg_at", "paired_difference", "recall_at"]


def ndcg_at(ranked: Sequence[str], truth: Sequence[str], k: int = 10) -> float:
    """NDCG@k of `ranked` against the graded `truth` (best first: gains T, T-1, ..., 1)."""
    if not truth:
        return 0.0
    size = len(truth)
    gain = {item: size - rank for rank, item in enumerate(truth)}
    dcg = sum(gain.get(item, 0) / math.log2(pos + 2) for pos, item in enumerate(ranked[:k]))
    ideal = sum((size - rank) / math.log2(rank + 2) for rank in range(min(k, size)))
    return dcg / ideal


def recall_at(ranked: Sequence[str], truth: Sequence[str], k: int = 10) -> float:
    """The share of `truth` found in the first `k` of `ranked`."""
    return len(set(ranked[:k]) & set(truth)) / len(truth) if truth else 0.0


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the half-width of its 95% confidence interval (normal approximation)."""
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, 1.96 * spread / math.sqrt(len(values))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """`a` - `b` over the same users: the mean difference, its 95% interval, win and loss shares."""
    diff, ci = mean_ci([x - y for x, y in zip(a, b, strict=True)])
    wins = sum(x > y for x, y in zip(a, b, strict=True)) / len(a)
    losses = sum(x < y for x, y in zip(a, b, strict=True)) / len(a)
    return {
        "difference": round(diff, 4),
        "ci95": round(ci, 4),
        "wins": round(wins, 3),
        "losses": round(losses, 3),
    }

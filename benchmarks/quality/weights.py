"""Fitting RRF weights for `benchmarks.quality`: coordinate ascent on mean NDCG@k.

The weights are fitted with the gateway's own RRF (`gateway.core.fusion`) on validation users,
separate from the test users; `benchmarks.quality` then scores a gateway configured with them.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.quality.ranking_metrics import ndcg_at
from benchmarks.quality.scoring import Lists
from gateway.core.fusion import make_fusion, ranked_from

__all__ = ["as_start_weights", "fit_weights"]

# The values tried for each weight in turn while fitting; 0 drops a recommender.
_WEIGHT_STEPS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def _mean_ndcg(
    weights: dict[str, float], users: Sequence[tuple[Lists, list[str]]], k: int, rrf_k: int
) -> float:
    fusion = make_fusion("rrf", rrf_k)
    total = 0.0
    for lists, truth in users:
        ranked = [ranked_from(n, w, lists[n]) for n, w in weights.items() if w > 0 and n in lists]
        fused = fusion.fuse(ranked, k, seed="") if ranked else []
        total += ndcg_at([item.id for item in fused], truth, k)
    return total / len(users)


def fit_weights(
    users: Sequence[tuple[Lists, list[str]]],
    k: int = 10,
    rrf_k: int = 60,
    rounds: int = 3,
    *,
    names: Sequence[str] | None = None,
) -> dict[str, float]:
    """RRF weights that maximise mean NDCG@k over `users`, by coordinate ascent from all 1.

    Weighs the recommenders `names` (by default every one in the users' lists, in their order;
    a shadow left out of `names` stays out of the fusion). Runs the gateway's own RRF; each
    round tries every step for every weight in turn and keeps the best. Weights are scaled so
    the largest is 1 (RRF depends only on their ratios).
    """
    if names is None:
        names = list(dict.fromkeys(name for lists, _ in users for name in lists))
    weights = dict.fromkeys(names, 1.0)
    best = _mean_ndcg(weights, users, k, rrf_k)
    for _ in range(rounds):
        improved = False
        for name in names:
            for step in _WEIGHT_STEPS:
                trial = {**weights, name: step}
                if trial == weights or not any(trial.values()):
                    continue
                score = _mean_ndcg(trial, users, k, rrf_k)
                if score > best + 1e-9:
                    weights, best, improved = trial, score, True
        if not improved:
            break
    top = max(weights.values())
    return {name: round(weight / top, 4) for name, weight in weights.items()}


def as_start_weights(
    fitted: dict[str, float], floor: float = 0.1, most: float = 5.0
) -> dict[str, float]:
    """`fitted` as where the gateway's learner starts (`feedback.learner.start_weights`).

    Scaled (RRF depends on their ratios alone) so that the smallest above 0 is at least the
    learner's `floor`, within its `most` (its default bounds); a 0, left out when fitted, is
    not a weight learning can start from, and starts at the floor.
    """
    positive = [w for w in fitted.values() if w > 0]
    scale = min(max(1.0, floor / min(positive)), most / max(positive)) if positive else 1.0
    return {name: round(max(floor, w * scale), 4) for name, w in fitted.items()}

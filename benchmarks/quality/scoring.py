"""Scoring the gateway's answers against the truth: per user, then per system over users.

The systems scored are the recommenders (the names the run configured: the four mocks, and with
``--model-servers`` the ALS model; each list as the gateway's `result` carries it), every fusion's
`fused` list, RRF with fitted weights (`FITTED`) and the `ORACLE`. Only users every system
answered are scored, so every comparison is paired over the same users.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.quality.ranking_metrics import mean_ci, ndcg_at, paired_difference, recall_at
from mock_recommenders.world import World

__all__ = [
    "FITTED",
    "ORACLE",
    "Lists",
    "comparisons",
    "kind_of",
    "recommender_lists",
    "score",
    "summarise",
]

ORACLE = "oracle"
FITTED = "rrf, fitted weights"

Lists = dict[str, Any]  # a recommender's name -> its prediction, as the gateway returned it


def recommender_lists(answer: dict[str, Any]) -> Lists:
    """Each recommender's prediction in a gateway answer, by name."""
    return {entry["name"]: entry["prediction"] for entry in answer["result"]}


def _ids(prediction: Any) -> list[str]:
    return [str(item["id"]) for item in prediction["items"]]


def score(
    users: list[str],
    answers: dict[tuple[str, str], Any],
    fitted: dict[tuple[str, str], Any],
    world: World,
    fusions: Sequence[str],
    k: int,
    *,
    recommenders: Sequence[str],
) -> tuple[dict[str, dict[str, list[float]]], int, int]:
    """Per-user scores of every system, over the users every system answered (paired).

    `recommenders` names the single recommenders to score, each as the answers' `result`
    carries it.
    """
    systems = [*recommenders, *fusions, *([FITTED] if fitted else []), ORACLE]
    scores: dict[str, dict[str, list[float]]] = {
        system: {"ndcg": [], "recall": []} for system in systems
    }
    scored = inconsistent = 0
    for user in users:
        asked = [answers.get((user, fusion)) for fusion in fusions]
        if fitted:
            asked.append(fitted.get((user, "rrf")))
        got: list[dict[str, Any]] = [answer for answer in asked if answer is not None]
        if len(got) < len(asked):
            continue
        scored += 1
        lists = recommender_lists(got[0])
        ranked: dict[str, list[str]] = {name: _ids(lists[name]) for name in recommenders}
        # The recommenders are deterministic: every answer must carry the same lists.
        inconsistent += any(
            any(_ids(recommender_lists(answer)[name]) != ranked[name] for name in recommenders)
            for answer in got[1:]
        )
        for fusion, answer in zip(fusions, got, strict=False):
            ranked[fusion] = [item["id"] for item in answer["fused"]]
        if fitted:
            ranked[FITTED] = [item["id"] for item in got[-1]["fused"]]
        ranked[ORACLE] = world.oracle(user, k)
        truth = world.truth(user)
        for system in systems:
            scores[system]["ndcg"].append(ndcg_at(ranked[system], truth, k))
            scores[system]["recall"].append(recall_at(ranked[system], truth, k))
    return scores, scored, inconsistent


def comparisons(
    scores: dict[str, dict[str, list[float]]], recommenders: Sequence[str]
) -> dict[str, Any]:
    """Each fusion against the best single recommender, paired over the same users."""
    if not recommenders or not scores[recommenders[0]]["ndcg"]:
        return {}
    # On a tie (a shadow serving the same list), the first in config order.
    best = max(recommenders, key=lambda name: statistics.fmean(scores[name]["ndcg"]))
    found: dict[str, Any] = {"best_single": best, "fusions": {}}
    for system, metrics in scores.items():
        if kind_of(system, recommenders) == "fusion":
            found["fusions"][system] = {
                metric: paired_difference(metrics[metric], scores[best][metric])
                for metric in ("ndcg", "recall")
            }
    return found


def summarise(
    scores: dict[str, dict[str, list[float]]], recommenders: Sequence[str]
) -> list[dict[str, Any]]:
    """Per system: mean NDCG and recall with 95% intervals, from per-user scores."""
    rows = []
    for system, metrics in scores.items():
        ndcg, ndcg_ci = mean_ci(metrics["ndcg"])
        recall, recall_ci = mean_ci(metrics["recall"])
        rows.append(
            {
                "system": system,
                "kind": kind_of(system, recommenders),
                "users": len(metrics["ndcg"]),
                "ndcg": round(ndcg, 4),
                "ndcg_ci95": round(ndcg_ci, 4),
                "recall": round(recall, 4),
                "recall_ci95": round(recall_ci, 4),
            }
        )
    return rows


def kind_of(system: str, recommenders: Sequence[str]) -> str:
    """`single` for one of `recommenders`, `ceiling` for the oracle, else `fusion`."""
    if system == ORACLE:
        return "ceiling"
    return "single" if system in recommenders else "fusion"

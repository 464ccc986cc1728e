"""The online benchmark's results, from what the simulation played and what the gateway said.

`benchmarks.online` plays the users and reads ``GET /experiments`` after every round; this
module turns that into figures and starts nothing:

- `rank_recommenders`: each recommender's NDCG@k against the truth, best first;
- `analyse_sensitivity`: when interleaving and the A/B test were each 95% sure which of the
  best and the runner-up is better (the gateway's pairwise interval; a z-test on its arm
  counts), in impressions;
- `analyse_learning`: the learnt weights over time against the offline-fitted ones, and
  NDCG@k of the learnt arm's fused lists in windows, paired with the best recommender's list
  for the same users; beside them, the rule the gateway shipped before (Hedge over net wins)
  replayed on the same counters and lists.

Both analyses also tally what the simulation itself sent (impressions per arm, clicks
accepted), so the report can show that the gateway counted exactly that.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from benchmarks.online_stats import (
    Z95,
    ab_needs,
    ab_test,
    decided_after,
    hedge_weights,
    interleaving_needs,
    normalised,
    pair_of,
    preference_decided,
    weight_distance,
)
from benchmarks.ranking_metrics import mean_ci, ndcg_at, paired_difference
from gateway.fusion import make_fusion, ranked_from
from mock_recommenders import DEFAULT_NAMES
from mock_recommenders.world import World

if TYPE_CHECKING:
    from benchmarks.online_play import Played, Snapshot

__all__ = ["analyse_learning", "analyse_sensitivity", "fused_ndcg", "rank_recommenders", "tally"]


def rank_recommenders(users: Sequence[tuple[Any, list[str]]], k: int) -> list[dict[str, Any]]:
    """Each recommender's mean NDCG@k (with its 95% interval) over `users`, best first."""
    rows = []
    for name in DEFAULT_NAMES:
        scores = [
            ndcg_at([str(item["id"]) for item in lists[name]["items"]], truth, k)
            for lists, truth in users
        ]
        mean, ci = mean_ci(scores)
        rows.append({"name": name, "ndcg": round(mean, 4), "ci95": round(ci, 4)})
    return sorted(rows, key=lambda row: -row["ndcg"])


def tally(played: Sequence[Played]) -> dict[str, Any]:
    """What the simulation sent: impressions, clicked impressions and clicks accepted, per arm."""
    arms: dict[str, dict[str, int]] = {}
    for shown in played:
        counts = arms.setdefault(
            shown.arm, {"impressions": 0, "clicked_impressions": 0, "clicks": 0}
        )
        counts["impressions"] += 1
        counts["clicked_impressions"] += shown.accepted > 0
        counts["clicks"] += shown.accepted
    return {
        "impressions": len(played),
        "clicks": sum(shown.accepted for shown in played),
        "duplicates": sum(shown.duplicates for shown in played),
        "arms": dict(sorted(arms.items())),
    }


def _agreement(sent: Mapping[str, Any], experiments: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the gateway counted what the simulation sent, arm by arm."""
    counted = {
        name: {key: int(arm[key]) for key in ("impressions", "clicked_impressions", "clicks")}
        for name, arm in sorted(experiments.get("arms", {}).items())
    }
    return {"gateway_arms": counted, "agree": counted == sent["arms"]}


def _best_of_all(experiments: Mapping[str, Any], best: str) -> dict[str, Any]:
    """Whether each method is sure `best` beats every other recommender, and on how much."""
    arms = experiments.get("arms", {})
    others = [name for name in DEFAULT_NAMES if name != best]
    a = arms.get(f"ab-{best}", {})
    ab_impressions = sum(arms.get(f"ab-{name}", {}).get("impressions", 0) for name in DEFAULT_NAMES)
    z = [
        ab_test(
            a.get("clicked_impressions", 0),
            a.get("impressions", 0),
            arms.get(f"ab-{name}", {}).get("clicked_impressions", 0),
            arms.get(f"ab-{name}", {}).get("impressions", 0),
        )["z"]
        for name in others
    ]
    verdicts = [preference_decided(pair_of(experiments, best, name)) for name in others]
    return {
        "interleave": {
            "impressions": arms.get("interleave", {}).get("impressions", 0),
            "verdict": int(all(v == 1 for v in verdicts)),
        },
        "ab": {"impressions": ab_impressions, "verdict": int(all(value > Z95 for value in z))},
    }


def analyse_sensitivity(
    played: Sequence[Played], snapshots: Sequence[Snapshot], best: str, runner_up: str
) -> dict[str, Any]:
    """Interleaving and A/B, `best` against `runner_up` and against all, after every round."""
    series = []
    for snapshot in snapshots:
        experiments = snapshot["experiments"]
        arms = experiments.get("arms", {})
        pair = pair_of(experiments, best, runner_up)
        a, b = arms.get(f"ab-{best}", {}), arms.get(f"ab-{runner_up}", {})
        test = ab_test(
            a.get("clicked_impressions", 0),
            a.get("impressions", 0),
            b.get("clicked_impressions", 0),
            b.get("impressions", 0),
        )
        series.append(
            {
                "after": snapshot["after"],
                "interleave": {
                    "impressions": arms.get("interleave", {}).get("impressions", 0),
                    **{key: pair.get(key) for key in ("wins", "losses", "ties", "low", "high")},
                    "preference": pair.get("preference"),
                    "verdict": preference_decided(pair),
                },
                "ab": {
                    "impressions": a.get("impressions", 0) + b.get("impressions", 0),
                    **test,
                    "verdict": (test["z"] > Z95) - (test["z"] < -Z95),
                },
                "best_of_all": _best_of_all(experiments, best),
            }
        )
    n_interleave = decided_after(
        [row["interleave"]["impressions"] for row in series],
        [row["interleave"]["verdict"] for row in series],
    )
    n_ab = decided_after(
        [row["ab"]["impressions"] for row in series], [row["ab"]["verdict"] for row in series]
    )
    all_interleave = decided_after(
        [row["best_of_all"]["interleave"]["impressions"] for row in series],
        [row["best_of_all"]["interleave"]["verdict"] for row in series],
    )
    all_ab = decided_after(
        [row["best_of_all"]["ab"]["impressions"] for row in series],
        [row["best_of_all"]["ab"]["verdict"] for row in series],
    )
    sent = tally(played)
    final = snapshots[-1]["experiments"] if snapshots else {}
    return {
        "needs": _needs(series[-1]) if series else {},
        "n_interleave": n_interleave,
        "n_ab": n_ab,
        "ratio": _ratio(n_ab, n_interleave),
        "best_of_all": {
            "n_interleave": all_interleave,
            "n_ab": all_ab,
            "ratio": _ratio(all_ab, all_interleave),
        },
        "series": series,
        "sent": sent,
        **_agreement(sent, final),
        "final": final,
    }


def _needs(last: Mapping[str, Any]) -> dict[str, Any]:
    """Impressions each method would need for 95%, by a power calculation on the final rates."""
    pair, ab = last["interleave"], last["ab"]
    interleave = interleaving_needs(pair["wins"] or 0, pair["losses"] or 0, pair["impressions"])
    shown = ab["impressions"] / 2  # the two arms are near even; the rates carry the effect
    ab_total = ab_needs(
        round(ab["ctr_a"] * shown), round(shown), round(ab["ctr_b"] * shown), round(shown)
    )
    return {
        "interleave": round(interleave) if interleave else None,
        "ab": round(ab_total) if ab_total else None,
        "ratio": round(ab_total / interleave, 2) if interleave and ab_total else None,
    }


def _ratio(ab: Mapping[str, int | None], interleave: Mapping[str, int | None]) -> float | None:
    """How many times interleaving's impressions A/B needed, both staying sure; None if never."""
    if ab["stayed"] is None or not interleave["stayed"]:
        return None
    return round(ab["stayed"] / interleave["stayed"], 2)


def fused_ndcg(
    lists: Sequence[tuple[Mapping[str, list[str]], list[str]]],
    weights: Mapping[str, float],
    k: int,
) -> list[float]:
    """NDCG@k per user of the gateway's RRF over each user's lists, with these weights."""
    fusion = make_fusion("rrf")
    scores = []
    for by_name, truth in lists:
        ranked = [
            ranked_from(name, weight, {"items": [{"id": item} for item in by_name[name]]})
            for name, weight in weights.items()
            if weight > 0 and name in by_name
        ]
        fused = fusion.fuse(ranked, k, seed="") if ranked else []
        scores.append(ndcg_at([item.id for item in fused], truth, k))
    return scores


def _summary(scores: Sequence[float], best: Sequence[float]) -> dict[str, Any]:
    mean, ci = mean_ci(scores)
    return {
        "ndcg": round(mean, 4),
        "ci95": round(ci, 4),
        "vs_best": paired_difference(scores, best),
    }


def _weights_over_time(
    snapshots: Sequence[Snapshot], fitted: Mapping[str, float]
) -> list[dict[str, Any]]:
    rows = []
    for snapshot in snapshots:
        experiments = snapshot["experiments"]
        arms, learnt = experiments.get("arms", {}), experiments.get("weights", {})
        in_use = {name: float(w) for name, w in (learnt.get("in_use") or {}).items()}
        rows.append(
            {
                "after": snapshot["after"],
                "learned_impressions": arms.get("learned", {}).get("impressions", 0),
                "interleave_impressions": arms.get("interleave", {}).get("impressions", 0),
                "evidence": learnt.get("evidence"),
                "version": learnt.get("version"),
                "in_use": in_use,
                "normalised": {n: round(w, 4) for n, w in normalised(in_use).items()},
                "distance": round(weight_distance(in_use, fitted), 4) if in_use else None,
            }
        )
    return rows


def _counters_before(snapshots: Sequence[Snapshot], index: int) -> list[dict[str, Any]]:
    """The pairwise counters /experiments gave last before impression `index` was played."""
    known = [s for s in snapshots if s["after"] <= index]
    return list(known[-1]["experiments"].get("pairwise", [])) if known else []


def _windows(
    learned: Sequence[Played],
    fused: Sequence[float],
    single: Sequence[float],
    count: int,
    hedge: Callable[[int, int], Sequence[float]],
) -> list[dict[str, Any]]:
    """The learnt arm's impressions, in order, cut into `count` near-equal windows.

    `hedge(start, stop)`: the window's NDCG@k per user had Hedge, the rule the gateway shipped
    before, set the weights from the counters known at its start (replayed on the same lists).
    """
    count = min(count, len(learned) // 2)  # a window of one user has no interval
    bounds = [round(i * len(learned) / count) for i in range(count + 1)] if count else []
    rows = []
    for start, stop in itertools.pairwise(bounds):
        replay = hedge(start, stop)
        mean, ci = mean_ci(fused[start:stop])
        best_mean, best_ci = mean_ci(single[start:stop])
        rows.append(
            {
                "from": learned[start].index,
                "to": learned[stop - 1].index,
                "impressions": stop - start,
                "fused_ndcg": round(mean, 4),
                "fused_ci95": round(ci, 4),
                "best_ndcg": round(best_mean, 4),
                "best_ci95": round(best_ci, 4),
                "vs_best": paired_difference(fused[start:stop], single[start:stop]),
                "hedge_ndcg": round(mean_ci(replay)[0], 4),
                "hedge_vs_best": paired_difference(replay, single[start:stop]),
            }
        )
    return rows


def analyse_learning(
    played: Sequence[Played],
    snapshots: Sequence[Snapshot],
    world: World,
    best: str,
    fitted: Mapping[str, float],
    k: int,
    windows: int,
    min_evidence: int = 0,
) -> dict[str, Any]:
    """The learnt weights over the run, and the learnt arm's NDCG@k in `windows` windows.

    Also, over all the learnt arm's users, what RRF would score with other weights (equal,
    fitted offline, the last learnt, Hedge's on the final counters) on the very lists the
    gateway got: the reference lines. Hedge's replay holds equal weights, as the gateway did,
    until the counters hold `min_evidence` comparisons.
    """
    weights = _weights_over_time(snapshots, fitted)
    names = list(DEFAULT_NAMES)
    learned = sorted((s for s in played if s.arm == "learned"), key=lambda s: s.index)
    truth = {shown.user: world.truth(shown.user) for shown in learned}
    fused = [ndcg_at(shown.fused, truth[shown.user], k) for shown in learned]
    single = [ndcg_at(shown.lists[best], truth[shown.user], k) for shown in learned]
    final = snapshots[-1]["experiments"] if snapshots else {}
    last = weights[-1]["in_use"] if weights else {}
    lists = [(shown.lists, truth[shown.user]) for shown in learned]
    offline: dict[str, Any] = {}
    if len(learned) > 1:
        offline = {
            f"{best} alone": _summary(single, single),
            "rrf, equal weights": _summary(
                fused_ndcg(lists, dict.fromkeys(DEFAULT_NAMES, 1.0), k), single
            ),
            "rrf, offline-fitted weights": _summary(fused_ndcg(lists, fitted, k), single),
            "served: rrf, learnt weights as they were": _summary(fused, single),
        }
        if last:
            offline["rrf, the last learnt weights"] = _summary(fused_ndcg(lists, last, k), single)
        hedge = hedge_weights(final.get("pairwise", []), names)
        offline["rrf, Hedge on the final counters"] = _summary(fused_ndcg(lists, hedge, k), single)

    def replayed(start: int, stop: int) -> list[float]:
        counters = _counters_before(snapshots, learned[start].index)
        weights = dict.fromkeys(names, 1.0)
        if sum(p["wins"] + p["losses"] + p["ties"] for p in counters) >= min_evidence:
            weights = hedge_weights(counters, names)
        return fused_ndcg(lists[start:stop], weights, k)

    sent = tally(played)
    return {
        "weights": weights,
        "windows": _windows(learned, fused, single, windows, replayed),
        "hedge_weights": hedge_weights(final.get("pairwise", []), names),
        "offline": offline,
        "sent": sent,
        **_agreement(sent, final),
        "final": final,
    }

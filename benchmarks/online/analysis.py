"""The online benchmark's results, from what the simulation played and what the gateway said.

`benchmarks.online` plays the users and reads ``GET /experiments`` after every round; this
module turns that into figures and starts nothing:

- `rank_recommenders`: each recommender's NDCG@k against the truth, best first;
- `analyse_sensitivity`: when interleaving and the A/B test were each 95% sure which of the
  best and the runner-up is better, in impressions, the user as the unit (and, beside it, by
  the gateway's own counts, which treat impressions as independent), and how many
  impressions each needs for 80% power;
- `analyse_learning`: the learnt weights over time against the offline-fitted ones, and
  NDCG@k of the learnt arm's fused lists in windows, paired with the best recommender's list
  for the same users; beside them, the rule the gateway shipped before (Hedge over net wins)
  replayed on the same counters and lists.

Both analyses also tally what the simulation itself sent (impressions per arm, clicks
accepted), so the report can show that the gateway counted exactly that.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from benchmarks.online.stats import (
    Z95,
    ab_test,
    clustered_ratio,
    decided_after,
    hedge_weights,
    normalised,
    pair_of,
    power_needs,
    preference_decided,
    weight_distance,
)
from benchmarks.quality.ranking_metrics import mean_ci, ndcg_at, paired_difference
from gateway.core.fusion import make_fusion, ranked_from
from mock_recommenders import DEFAULT_NAMES
from mock_recommenders.world import World

if TYPE_CHECKING:
    from benchmarks.online.play import Played, Snapshot

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


@dataclass(frozen=True)
class _Outcomes:
    """Each impression of a sensitivity run, in the order played, as arrays."""

    user: npt.NDArray[np.int64]
    arm: npt.NDArray[np.int64]  # 0: interleaved, 1: A/B best alone, 2: A/B runner-up alone
    clicked: npt.NDArray[np.float64]  # 1 when the impression drew a click
    wins: npt.NDArray[np.float64]  # interleaved: best's team clicked more than the other's
    losses: npt.NDArray[np.float64]
    ties: npt.NDArray[np.float64]  # interleaved, clicked, both teams alike
    replayed: int  # interleaved impressions whose teams were drawn again exactly


def _outcomes(played: Sequence[Played], best: str, runner_up: str, k: int) -> _Outcomes:
    """Who won each interleaved impression, from its teams drawn again as the gateway drew them.

    The gateway does not send the teams, but team-draft is seeded by the request id: the same
    two lists (in config order) and id give the same draw, checked against what was shown.
    """
    draft, users = make_fusion("interleave"), dict[str, int]()
    arms = {"interleave": 0, f"ab-{best}": 1, f"ab-{runner_up}": 2}
    rows, replayed = [], 0
    for shown in played:
        won = lost = tied = 0
        if shown.arm == "interleave":
            lists = [
                ranked_from(name, 1.0, {"items": [{"id": item} for item in shown.lists[name]]})
                for name in DEFAULT_NAMES
                if name in (best, runner_up)
            ]
            teams = draft.fuse(lists, k, shown.request_id)
            if [item.id for item in teams] == shown.fused:
                replayed += 1
            clicked = set(shown.clicks)
            mine = sum(item.id in clicked and item.team == best for item in teams)
            theirs = sum(item.id in clicked and item.team == runner_up for item in teams)
            won, lost, tied = mine > theirs, mine < theirs, bool(clicked) and mine == theirs
        user = users.setdefault(shown.user, len(users))
        rows.append((user, arms.get(shown.arm, -1), bool(shown.clicks), won, lost, tied))
    table = np.array(rows, dtype=np.float64).reshape(-1, 6)
    return _Outcomes(
        table[:, 0].astype(np.int64), table[:, 1].astype(np.int64),
        table[:, 2], table[:, 3], table[:, 4], table[:, 5], replayed,
    )  # fmt: skip


def _by_user(values: npt.NDArray[np.float64], users: npt.NDArray[np.int64]) -> list[float]:
    summed: list[float] = np.bincount(users, weights=values).tolist()
    return summed


def _tests(o: _Outcomes, upto: int, per_impression: bool = False) -> dict[str, Any]:
    """Both comparisons on the first `upto` impressions, the user as the unit.

    Interleaving: the best's share of decided comparisons (wins / (wins + losses)) against
    0.5. A/B: the difference of the two arms' CTR (clicked impressions per impression). Each a
    ratio over users with its delta-method error; `per_impression`: every impression its own
    unit, as if impressions were independent (what the gateway's intervals assume).
    """
    users = np.arange(upto) if per_impression else o.user[:upto]
    arm = o.arm[:upto]
    il = arm == 0
    decided = (o.wins[:upto] + o.losses[:upto]) * il
    preference = clustered_ratio(_by_user(o.wins[:upto] * il, users), _by_user(decided, users))
    ctr = []
    for code in (1, 2):
        shown = (arm == code).astype(np.float64)
        ctr.append(
            clustered_ratio(_by_user(o.clicked[:upto] * shown, users), _by_user(shown, users))
        )
    out: dict[str, Any] = {
        "interleave": {
            "impressions": int(il.sum()),
            "wins": int((o.wins[:upto] * il).sum()),
            "losses": int((o.losses[:upto] * il).sum()),
            "ties": int((o.ties[:upto] * il).sum()),
            "verdict": 0,
        },
        "ab": {"impressions": int(((arm == 1) | (arm == 2)).sum()), "verdict": 0},
    }
    if preference is not None and preference[1] > 0:
        p, error = preference
        z = (p - 0.5) / error
        out["interleave"].update(
            preference=round(p, 4), se=round(error, 5), z=round(z, 3),
            low=round(p - Z95 * error, 4), high=round(p + Z95 * error, 4),
            verdict=(z > Z95) - (z < -Z95),
        )  # fmt: skip
    found_a, found_b = ctr
    if found_a is not None and found_b is not None:
        (a, error_a), (b, error_b) = found_a, found_b
        error = math.hypot(error_a, error_b)
        z = (a - b) / error if error > 0 else 0.0
        out["ab"].update(
            ctr_a=round(a, 4), ctr_b=round(b, 4), difference=round(a - b, 4),
            se=round(error, 5), ci95=round(Z95 * error, 4), z=round(z, 3),
            verdict=(z > Z95) - (z < -Z95),
        )  # fmt: skip
    return out


def analyse_sensitivity(
    played: Sequence[Played], snapshots: Sequence[Snapshot], best: str, runner_up: str, k: int
) -> dict[str, Any]:
    """Interleaving and A/B, `best` against `runner_up`, after every round.

    Each method is tested on the impressions played so far with the user as the unit
    (`_tests`); beside it, the gateway's own counts at that point (its pairwise Wilson
    interval, the arms' pooled z), which treat impressions as independent.
    """
    outcomes = _outcomes(played, best, runner_up, k)
    series = []
    for snapshot in snapshots:
        experiments = snapshot["experiments"]
        arms = experiments.get("arms", {})
        pair = pair_of(experiments, best, runner_up)
        a, b = arms.get(f"ab-{best}", {}), arms.get(f"ab-{runner_up}", {})
        pooled = ab_test(
            a.get("clicked_impressions", 0),
            a.get("impressions", 0),
            b.get("clicked_impressions", 0),
            b.get("impressions", 0),
        )
        row = {"after": snapshot["after"], **_tests(outcomes, snapshot["after"])}
        row["gateway"] = {
            "interleave": {
                "impressions": arms.get("interleave", {}).get("impressions", 0),
                **{key: pair.get(key) for key in ("wins", "losses", "ties", "low", "high")},
                "preference": pair.get("preference"),
                "verdict": preference_decided(pair),
            },
            "ab": {
                "impressions": a.get("impressions", 0) + b.get("impressions", 0),
                **pooled,
                "verdict": (pooled["z"] > Z95) - (pooled["z"] < -Z95),
            },
        }
        series.append(row)
    first_passage = {}
    for method in ("interleave", "ab"):
        first_passage[method] = decided_after(
            [row[method]["impressions"] for row in series],
            [row[method]["verdict"] for row in series],
        )
        first_passage[f"gateway_{method}"] = decided_after(
            [row["gateway"][method]["impressions"] for row in series],
            [row["gateway"][method]["verdict"] for row in series],
        )
    sent = tally(played)
    final = snapshots[-1]["experiments"] if snapshots else {}
    last = series[-1] if series else {}
    gateway_pair = last.get("gateway", {}).get("interleave", {})
    return {
        "needs": _needs(last) if last else {},
        "needs_per_impression": _needs(_tests(outcomes, len(played), per_impression=True))
        if last
        else {},
        "n_interleave": first_passage["interleave"],
        "n_ab": first_passage["ab"],
        "ratio": _ratio(first_passage["ab"], first_passage["interleave"]),
        "gateway": {
            "n_interleave": first_passage["gateway_interleave"],
            "n_ab": first_passage["gateway_ab"],
            "ratio": _ratio(first_passage["gateway_ab"], first_passage["gateway_interleave"]),
        },
        "users": {
            "interleave": len(set(outcomes.user[outcomes.arm == 0].tolist())),
            "ab": len(set(outcomes.user[outcomes.arm > 0].tolist())),
        },
        "teams_replayed": {
            "interleaved": int((outcomes.arm == 0).sum()),
            "exact": outcomes.replayed,
            # The outcomes drawn again are the gateway's pairwise counters for the pair.
            "agree": bool(last)
            and [gateway_pair.get(key) for key in ("wins", "losses", "ties")]
            == [last["interleave"][key] for key in ("wins", "losses", "ties")],
        },
        "series": series,
        "sent": sent,
        **_agreement(sent, final),
        "final": final,
    }


def _needs(last: Mapping[str, Any]) -> dict[str, Any]:
    """Impressions each method needs for 80% power at alpha = 0.05, from the final estimates."""
    pair, ab = last["interleave"], last["ab"]
    interleave = ab_total = None
    if "se" in pair:
        interleave = power_needs(pair["preference"] - 0.5, pair["se"], pair["impressions"])
    if "se" in ab:
        ab_total = power_needs(ab["difference"], ab["se"], ab["impressions"])
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


# The first impressions, where a warm start must already hold its own.
_FIRST = 1000


def _served(played: Sequence[Played], world: World, best: str, k: int) -> dict[str, Any]:
    """What every arm served (exploring and learnt) against `best`'s own list for the same
    users, over the run and its first `_FIRST` impressions; and the learnt arm alone there.

    `pairs` keeps each impression's (served, best) NDCG, in order, for `pooled`.
    """
    shown = sorted(played, key=lambda one: one.index)
    if not shown:
        return {}
    truth = {one.user: world.truth(one.user) for one in shown}
    served = [ndcg_at(one.fused, truth[one.user], k) for one in shown]
    single = [ndcg_at(one.lists[best], truth[one.user], k) for one in shown]
    first = sum(1 for one in shown if one.index < _FIRST)
    learnt = [i for i, one in enumerate(shown) if one.arm == "learned" and one.index < _FIRST]
    explored = sum(1 for one in shown if one.arm == "interleave")
    found: dict[str, Any] = {
        "impressions": len(shown),
        "interleaved_share": round(explored / len(shown), 4),
        "all": _summary(served, single),
        "pairs": [served, single],
    }
    if first > 1:
        found[f"first_{_FIRST}"] = _summary(served[:first], single[:first])
    if len(learnt) > 1:
        found[f"learnt_arm_first_{_FIRST}"] = _summary(
            [served[i] for i in learnt], [single[i] for i in learnt]
        )
    return found


def pooled(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every run's served impressions together (other users per seed): the run and its first
    `_FIRST`, each impression paired with `best`'s list; the runs lose their `pairs`."""
    served: list[float] = []
    single: list[float] = []
    first_served: list[float] = []
    first_single: list[float] = []
    for run in runs:
        pairs = run.get("served", {}).pop("pairs", [[], []])
        served += pairs[0]
        single += pairs[1]
        cut = min(_FIRST, len(pairs[0]))
        first_served += pairs[0][:cut]
        first_single += pairs[1][:cut]
    if len(served) < 2:
        return {"runs": len(runs)}
    return {
        "runs": len(runs),
        "all": _summary(served, single),
        f"first_{_FIRST}": _summary(first_served, first_single),
        "per_run": [
            {
                "all": run["served"]["all"]["vs_best"],
                "interleaved_share": run["served"]["interleaved_share"],
                "last_weights": run["offline"]
                .get("rrf, the last learnt weights", {})
                .get("vs_best"),
            }
            for run in runs
            if run.get("served")
        ],
    }


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
        "served": _served(played, world, best, k),
        "weights": weights,
        "windows": _windows(learned, fused, single, windows, replayed),
        "hedge_weights": hedge_weights(final.get("pairwise", []), names),
        "offline": offline,
        "sent": sent,
        **_agreement(sent, final),
        "final": final,
    }

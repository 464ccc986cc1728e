"""Attribution math: interleaving outcomes between recommenders, and intervals around rates.

Team-draft multileaving (Schuth et al., CIKM 2014) compares every pair of teams shown on an
impression that drew at least one credited click: the team with more clicks wins the pair, an
equal count (zero included) is a tie. An impression without clicks decides nothing.

Clicks arrive one by one, long after the answer, so the stores keep running wins/losses/ties
counters and adjust them with `pairwise_delta` as an impression's per-team clicks change:
the counters then always equal what `pair_outcome` says of every impression's current clicks.

Pure functions of their arguments, shared by both feedback stores (the Redis store's Lua
script mirrors `pair_outcome`; the store contract tests hold the two to the same answers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations
from typing import Literal, NamedTuple

__all__ = [
    "PairCounts",
    "PairOutcome",
    "Preference",
    "pair_outcome",
    "pairwise_delta",
    "preference",
    "wilson_interval",
]

# From the first team's side of the pair.
PairOutcome = Literal["win", "loss", "tie"]


class PairCounts(NamedTuple):
    """Comparisons between recommenders a and b (a < b), from a's side: wins, losses, ties."""

    wins: int
    losses: int
    ties: int


def pair_outcome(clicks_by_team: Mapping[str, int], a: str, b: str) -> PairOutcome | None:
    """Team a against team b on one impression; None when the impression has no clicks.

    `clicks_by_team` holds the impression's credited clicks per team; a team shown but not
    clicked may be absent or 0.
    """
    if sum(clicks_by_team.values()) <= 0:
        return None
    return _decided(clicks_by_team, a, b)


def _decided(clicks_by_team: Mapping[str, int], a: str, b: str) -> PairOutcome:
    mine, theirs = clicks_by_team.get(a, 0), clicks_by_team.get(b, 0)
    if mine > theirs:
        return "win"
    if mine < theirs:
        return "loss"
    return "tie"


_CHANGE_INDEX: dict[PairOutcome, int] = {"win": 0, "loss": 1, "tie": 2}


def pairwise_delta(
    before: Mapping[str, int], after: Mapping[str, int]
) -> dict[tuple[str, str], PairCounts]:
    """How the (a, b) counters change, a < b, when one impression's clicks go `before`→`after`.

    Both mappings should name every team of the impression (with 0 for no clicks); a team in
    only one of them counts 0 in the other. Pairs whose outcome did not change are left out.
    """
    teams = sorted(set(before) | set(after))
    # pair_outcome for every pair, with each side's "any clicks at all" summed once.
    clicked_before = sum(before.values()) > 0
    clicked_after = sum(after.values()) > 0
    delta: dict[tuple[str, str], PairCounts] = {}
    for a, b in combinations(teams, 2):
        old = _decided(before, a, b) if clicked_before else None
        new = _decided(after, a, b) if clicked_after else None
        if old == new:
            continue
        change = [0, 0, 0]
        if old is not None:
            change[_CHANGE_INDEX[old]] -= 1
        if new is not None:
            change[_CHANGE_INDEX[new]] += 1
        delta[(a, b)] = PairCounts(*change)
    return delta


def wilson_interval(successes: float, trials: float, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a proportion: (0, 1) with no trials. Counts may be
    fractional: effective sample sizes, a prior's pseudo-counts.

    Wilson rather than the normal approximation: it stays inside [0, 1] and keeps its coverage
    at the small counts and extreme rates a click-through rate starts from.
    """
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return (0.0, 1.0)
    rate = successes / trials
    z2 = z * z
    centre = (rate + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z / (1 + z2 / trials) * math.sqrt(rate * (1 - rate) / trials + z2 / (4 * trials**2))
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True, slots=True)
class Preference:
    """How often a recommender won the comparisons that were decided, with a 95% interval."""

    share: float
    low: float
    high: float
    decided: int
    ties: int


def preference(wins: int, losses: int, ties: int) -> Preference:
    """The share of decided comparisons won (ties left out), 0.5 with nothing decided.

    Ties are reported, not folded in: with many impressions clicked once, most pairs tie, and
    counting them as half a win would pull every share towards 0.5 without saying why.
    """
    if min(wins, losses, ties) < 0:
        raise ValueError(f"counts must be non-negative, got {wins}, {losses}, {ties}")
    decided = wins + losses
    low, high = wilson_interval(wins, decided)
    share = wins / decided if decided else 0.5
    return Preference(share=share, low=low, high=high, decided=decided, ties=ties)

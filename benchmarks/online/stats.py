"""The online benchmark's statistics: when an experiment is decided, and how weights compare.

Pure functions over the snapshots `benchmarks.online` takes of the gateway's ``GET
/experiments`` between rounds of simulated users:

- an interleaving comparison is decided when the Wilson interval of one recommender's
  preference over the other (the gateway's ``low``/``high``) excludes 0.5;
- an A/B test is decided when a two-proportion z-test on the arms' clicked impressions (the
  share of impressions with at least one click) gives |z| > 1.96;
- for each, the impressions it would need by a power calculation from the run's final rates
  (`power_needs`: 80% power at alpha = 0.05), steadier from run to run than the first passage;
- for each, the impressions it took: the first snapshot at which it was decided *and stayed
  decided, in the right direction, to the end of the run* (checking after every round is
  optional stopping, and a lucky early crossing that later reverses would flatter either
  method), and the first snapshot it was decided at all, for reference.

The tests above treat impressions as independent, which they are when each user has one. When
users come back, a user's impressions are not independent (a user who clicks often clicks
often in either arm), and the unit is the user: `clustered_ratio` is a ratio metric (clicked
impressions per impression, wins per decided comparison) with its standard error by the delta
method over users (Deng, Lu & Litz, WSDM 2017, "Trustworthy analysis of online A/B tests"),
and `power_needs` the impressions a test on it needs for 80% power at alpha = 0.05.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "Z80",
    "Z95",
    "ab_test",
    "clustered_ratio",
    "decided_after",
    "hedge_weights",
    "normalised",
    "pair_of",
    "power_needs",
    "preference_decided",
    "weight_distance",
]

Z95 = 1.959964
Z80 = 0.841621  # the one-sided quantile for 80% power


def pair_of(snapshot: Mapping[str, Any], first: str, second: str) -> dict[str, Any]:
    """The gateway's comparison of `first` with `second`, from `first`'s side.

    /experiments lists each pair once, ``a`` < ``b``; this turns it round when needed (a
    preference p becomes 1 - p, the interval flips). Zero counts when the pair is not listed.
    """
    for pair in snapshot.get("pairwise", []):
        if (pair["a"], pair["b"]) == (first, second):
            return dict(pair)
        if (pair["a"], pair["b"]) == (second, first):
            return {
                "a": first,
                "b": second,
                "wins": pair["losses"],
                "losses": pair["wins"],
                "ties": pair["ties"],
                "preference": 1 - pair["preference"],
                "low": 1 - pair["high"],
                "high": 1 - pair["low"],
            }
    return {"a": first, "b": second, "wins": 0, "losses": 0, "ties": 0}


def preference_decided(pair: Mapping[str, Any]) -> int:
    """+1 when the interval says `a` is preferred, -1 when `b` is, 0 while it includes 0.5."""
    if "low" not in pair:
        return 0
    if pair["low"] > 0.5:
        return 1
    if pair["high"] < 0.5:
        return -1
    return 0


def ab_test(clicked_a: int, shown_a: int, clicked_b: int, shown_b: int) -> dict[str, float]:
    """Two-proportion z-test of arm a's CTR against arm b's (pooled standard error).

    Returns both CTRs, the difference, its 95% interval (unpooled) and z; z is 0 while
    either arm is empty or nobody clicked anything.
    """
    ctr_a = clicked_a / shown_a if shown_a else 0.0
    ctr_b = clicked_b / shown_b if shown_b else 0.0
    difference = ctr_a - ctr_b
    z = half = 0.0
    if shown_a and shown_b:
        pooled = (clicked_a + clicked_b) / (shown_a + shown_b)
        error = math.sqrt(pooled * (1 - pooled) * (1 / shown_a + 1 / shown_b))
        z = difference / error if error > 0 else 0.0
        half = Z95 * math.sqrt(ctr_a * (1 - ctr_a) / shown_a + ctr_b * (1 - ctr_b) / shown_b)
    return {
        "ctr_a": round(ctr_a, 4),
        "ctr_b": round(ctr_b, 4),
        "difference": round(difference, 4),
        "ci95": round(half, 4),
        "z": round(z, 3),
    }


def decided_after(
    impressions: Sequence[int], verdicts: Sequence[int], expected: int = 1
) -> dict[str, int | None]:
    """When a sequence of checks first decided, and from when it stayed decided, for `expected`.

    `impressions[i]` is how many impressions the experiment had at check i, `verdicts[i]` its
    verdict then (+1, -1 or 0). ``stayed`` is the impressions at the first check from which
    every later verdict is `expected`; ``first`` at the first check that was `expected` at
    all; ``wrong`` at the first check that decided the other way. Each None when it never was.
    """
    if len(impressions) != len(verdicts):
        raise ValueError("one verdict per check")
    first = next((n for n, v in zip(impressions, verdicts, strict=True) if v == expected), None)
    wrong = next(
        (n for n, v in zip(impressions, verdicts, strict=True) if v not in (0, expected)), None
    )
    stayed: int | None = None
    for n, v in zip(reversed(impressions), reversed(verdicts), strict=True):
        if v != expected:
            break
        stayed = n
    return {"stayed": stayed, "first": first, "wrong": wrong}


def normalised(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights scaled so the largest is 1: RRF depends only on their ratios."""
    top = max(weights.values(), default=0.0)
    return {name: (w / top if top > 0 else 0.0) for name, w in weights.items()}


def weight_distance(weights: Mapping[str, float], target: Mapping[str, float]) -> float:
    """Mean absolute difference between two weightings, each scaled so its largest is 1."""
    a, b = normalised(weights), normalised(target)
    names = sorted(set(a) | set(b))
    return sum(abs(a.get(n, 0.0) - b.get(n, 0.0)) for n in names) / len(names) if names else 0.0


def hedge_weights(
    pairwise: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    rate: float = 0.02,
    floor: float = 0.1,
    max_weight: float = 5.0,
) -> dict[str, float]:
    """The learner rule the gateway shipped before, for comparison: Hedge over net wins.

    ``w_i = exp(rate · net_i)``, net_i being i's wins minus losses against the others, clipped
    to [floor, max_weight]; its defaults were these. The exponent grows with the evidence, so
    every recommender that wins more than it loses runs to `max_weight`, every other to
    `floor`. Initial weights 1, as the benchmark configures them.
    """
    net = dict.fromkeys(names, 0)
    for pair in pairwise:
        a, b = pair["a"], pair["b"]
        if a in net and b in net:
            net[a] += pair["wins"] - pair["losses"]
            net[b] += pair["losses"] - pair["wins"]
    top, bottom = math.log(max_weight), math.log(floor)
    return {name: round(math.exp(min(top, max(bottom, rate * net[name]))), 4) for name in names}


def clustered_ratio(
    numerators: Sequence[float], denominators: Sequence[float]
) -> tuple[float, float] | None:
    """Σy / Σn over units (users), and its standard error by the delta method.

    ``se² = Σ (y_i - R n_i)² / (Σ n)² · U / (U - 1)``: the linearised ratio's variance over
    the U units, so a unit's impressions count as one draw, however many it had. Units with
    n = 0 add nothing. None with fewer than two units or Σn = 0.
    """
    if len(numerators) != len(denominators):
        raise ValueError("one numerator per denominator")
    units, total = len(denominators), math.fsum(denominators)
    if units < 2 or total <= 0:
        return None
    ratio = math.fsum(numerators) / total
    spread = math.fsum((y - ratio * n) ** 2 for y, n in zip(numerators, denominators, strict=True))
    return ratio, math.sqrt(spread * units / (units - 1)) / total


def power_needs(effect: float, error: float, impressions: int) -> float | None:
    """Impressions for 80% power at alpha = 0.05 (two-sided) to detect `effect`.

    `error` is the effect's standard error at `impressions`; it shrinks as 1/√impressions
    (users and their impressions grow together), so the test needs
    ``impressions · ((1.96 + 0.84) · error / effect)²``. None for no effect or no error.
    """
    if effect == 0 or error <= 0 or impressions <= 0:
        return None
    return impressions * ((Z95 + Z80) * error / effect) ** 2

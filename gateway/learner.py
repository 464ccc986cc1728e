"""The online learner: interleaving outcomes turned into RRF weights per recommender.

The rule is Hedge (multiplicative weights; Freund & Schapire 1997) with each recommender's net
pairwise wins as its cumulative gain::

    net_i = Σ_j wins(i, j) - losses(i, j)       over the other learnt recommenders j
    w_i   = initial_i · exp(rate · net_i),       clipped to [floor, max_weight]

Why this rule:

- Team-draft multileaving comparisons are the unbiased signal interleaving gives: each one
  says which of two recommenders the user preferred on the same answer, free of position bias
  and of which recommender happened to be asked more.
- Net wins are a sum over comparisons, so the weights are a function of the counters alone,
  not of when or how often `update` ran: every instance reading the same store computes the
  same weights, and a restart loses nothing.
- Hedge moves weight towards whoever keeps winning and, with `rate` small, needs a run of
  evidence to do it; one comparison multiplies a weight by at most e^rate.
- Net wins sum to zero over the recommenders, so the gain is already relative to the mean:
  one that only ties keeps its configured weight, and no renormalisation is needed (RRF cares
  only about the weights' ratios). The floor keeps a losing recommender in the answers so it
  can still win comparisons back; `max_weight` bounds how far one can dominate.
- Nothing moves before `min_evidence` comparisons between learnt recommenders, and `frozen`
  keeps the current weights whatever the evidence: an operator's brake.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

from gateway.feedback_records import FeedbackStats, LearnedWeights

__all__ = ["WeightLearner"]

# Weights are rounded to this many decimals: readable in /experiments, and equal as JSON.
_DECIMALS = 6


class WeightLearner:
    """RRF weights for `names`, learnt from the pairwise counters; see the module docstring."""

    def __init__(
        self,
        names: Sequence[str],
        initial: Mapping[str, float],
        min_evidence: int,
        floor: float,
        rate: float,
        max_weight: float,
        frozen: bool = False,
        clock: Callable[[], float] = time.time,
    ):
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"names must be distinct and non-empty, got {list(names)}")
        if not 0 < floor <= max_weight:
            raise ValueError(f"need 0 < floor <= max_weight, got {floor} and {max_weight}")
        if not all(0 < initial.get(name, 1.0) < math.inf for name in names):
            raise ValueError(f"initial weights must be positive and finite, got {dict(initial)}")
        if rate < 0 or min_evidence < 0:
            raise ValueError(f"rate and min_evidence must be >= 0, got {rate}, {min_evidence}")
        self.names = tuple(names)
        # A recommender the config gives no weight to starts at RRF's default, 1.
        self.initial = {name: initial.get(name, 1.0) for name in self.names}
        self.min_evidence = min_evidence
        self.floor = floor
        self.rate = rate
        self.max_weight = max_weight
        self.frozen = frozen
        self._clock = clock

    def evidence(self, stats: FeedbackStats) -> int:
        """Comparisons (wins, losses and ties) between two of the learnt recommenders."""
        return sum(
            sum(counts)
            for (a, b), counts in stats.pairwise.items()
            if a in self.initial and b in self.initial
        )

    def net_wins(self, stats: FeedbackStats) -> dict[str, int]:
        """Each learnt recommender's wins minus losses against the others."""
        net = dict.fromkeys(self.names, 0)
        for (a, b), counts in stats.pairwise.items():
            if a in net and b in net:
                net[a] += counts.wins - counts.losses
                net[b] += counts.losses - counts.wins
        return net

    def weights_for(self, stats: FeedbackStats) -> dict[str, float]:
        """The weights the rule gives for these counters, ignoring `min_evidence` and `frozen`."""
        net = self.net_wins(stats)
        top, bottom = math.log(self.max_weight), math.log(self.floor)
        weights = {}
        for name in self.names:
            # Clipped in log space: exp() of a long run's gain would overflow.
            exponent = math.log(self.initial[name]) + self.rate * net[name]
            weights[name] = round(math.exp(min(top, max(bottom, exponent))), _DECIMALS)
        return weights

    def update(self, stats: FeedbackStats, current: LearnedWeights | None) -> LearnedWeights:
        """The weights to use now: `current` when frozen, short of evidence or unchanged.

        With no `current`, the starting point is the initial weights (clipped to the bounds),
        version 0. A change bumps the version, which the stores use to keep the newest.
        """
        evidence = self.evidence(stats)
        if current is None:
            start = {
                n: round(min(self.max_weight, max(self.floor, w)), _DECIMALS)
                for n, w in self.initial.items()
            }
            current = LearnedWeights(start, evidence=0, updated_at=self._clock(), version=0)
        if self.frozen or evidence < self.min_evidence:
            return current
        weights = self.weights_for(stats)
        if weights == dict(current.weights) and evidence == current.evidence:
            return current
        return LearnedWeights(weights, evidence, self._clock(), current.version + 1)

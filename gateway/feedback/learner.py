"""The online learner: interleaving outcomes turned into RRF weights per recommender.

The rule: each recommender's mean pairwise margin, shrunk towards the start by a prior, sets
its weight on a log scale::

    W_i, L_i = Σ_j wins(i, j), Σ_j losses(i, j)       over the other learnt recommenders j
    m_i      = (W_i - L_i + n · p_i) / (W_i + L_i + n)   in (-1, 1); ties do not count
    w_i      = initial_i · exp(beta · (m_i - p_i)),     clipped to [floor, max_weight]

where p_i is the margin the start stands for: 0 for an equal start, and for a prior
(`start_weights`, or configured weights that differ) ln(initial_i / g) / beta, g the
geometric mean of the initial weights (clipped to (-1, 1)); n is `strength`, what the start
is worth in comparisons (below). At no evidence w_i = initial_i;
as evidence grows, w_i → g · exp(beta · true margin_i), whatever the start was.

Why this rule:

- Team-draft multileaving comparisons are the unbiased signal interleaving gives: each one
  says which of two recommenders the user preferred on the same answer, free of position bias
  and of which recommender happened to be asked more.
- It converges. The margin is a mean, not a sum: as evidence grows it settles on the
  recommender's true margin, and the weights stop moving (doubling every counter barely
  changes them). The exponent is bounded by `beta`, so a weight stays within e^±beta of its
  initial one whatever the volume, and the weights keep how much better one recommender is
  than another instead of forgetting it at the bounds.
- `prior` pseudo-comparisons (even) shrink a thin record towards 0: a recommender's first few
  wins move it little, its first hundreds most of the way.
- The weights are a function of the counters alone, not of when or how often `update` ran:
  every instance reading the same store computes the same weights, and a restart loses
  nothing.
- A recommender that only ties keeps its configured weight, and no renormalisation is needed
  (RRF cares only about the weights' ratios). The floor keeps a losing recommender in the
  answers so it can still win comparisons back; `max_weight` bounds how far one can dominate.
- The start is a prior, in the margins' own terms: `initial` (`feedback.learner.start_weights`,
  or configured weights that differ) says what margin each recommender is believed to have,
  worth `start_strength` comparisons (`prior` for an equal start). The evidence moves the
  weights from the first comparison, and a wrong prior is outvoted: the weights converge to
  what the evidence says, not to the prior's ratios times it (the rule before this one,
  ``initial · exp(beta · m)``, kept a wrong start's order for ever). The prior counts to the
  exploration's `uncertainty` too.
- A strong prior holds against noise and is slow to outvote, so it is robust: once the
  comparisons show, 95% sure, more against the start's order than with it (`contradicted`),
  the start is worth `prior` only, and the evidence leads (and exploration, no longer counting the
  start's weight, rises). Measured in the online benchmark: a prior of 50 let the first
  hundred comparisons' noise swing the fitted weights (beta 4) and cost 0.02 NDCG; 500 or
  2,000 held them; and an upside-down prior held that strongly cost 0.15 for as long as it
  was believed.
- With no prior (equal weights) the rule moves nothing before `min_evidence` comparisons
  between learnt recommenders; with `leader_first` (`cold_start: leader`, the gateway's
  default), `before_evidence` serves a `leader` nearly alone once the evidence shows one
  better than the others (its interval above one half, in clicked answers), else the equal
  start holds. `frozen` keeps the current weights whatever the evidence: an operator's brake.
- Intervals count clicked answers, not comparisons: one click on a multileaved answer decides
  k - 1 comparisons for the clicked team at once (k learnt recommenders), which are not
  independent. Counting each would make every interval about sqrt(k - 1) too narrow, and
  exploration stop early; the counts are divided by k - 1 (a design effect, conservative for
  a team that mostly loses). It decided the leader-first start: with intervals as
  comparisons, the first leader was often the worst recommender (clicks favour `trd` early in
  the online benchmark) and the leader served worse than equal weights; in clicked answers it
  was `asc`, the best, or none, and served better than equal weights in both worlds.

It replaced Hedge over cumulative net wins (``w_i = initial_i · exp(rate · net_i)``), which
has no resting point: net wins grow with the evidence, so every recommender that wins more
than it loses runs to `max_weight` and every other to `floor`. In the online benchmark
(docs/online.md; simulated users, 8,000 impressions, half of them interleaved) the fused list
under Hedge's weights beat the best single recommender only for a while, +0.005 ± 0.004
NDCG@10 over the run; this rule, replayed on the same counters and lists, beat it in every
window after the first (+0.008 to +0.022, each 95% interval above 0), and its weights from
the final counters by +0.015 ± 0.003 over all the run's users. Served, it did the same:
+0.009 to +0.022 in every window once `min_evidence` was reached, +0.011 ± 0.003 over the
run with the first ~900 impressions at equal weights, and its weights stayed within a
quarter of where they first moved to.

What it is not: a dueling bandit over whole weightings. It weighs recommenders by whose items
users prefer, not by what each adds to the fusion, so it stops short of weights fitted offline
against the truth: +0.025 ± 0.003 in the same benchmark, the gap left. Closing it needs
multileaving the current weighting against perturbed ones and moving towards the winner
(dueling bandit gradient descent, Yue & Joachims 2009; multileave gradient descent, Schuth et
al. 2016).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

from gateway.feedback.attribution import wilson_interval
from gateway.feedback.records import FeedbackStats, LearnedWeights

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
        max_weight: float,
        beta: float,
        prior: float,
        frozen: bool = False,
        clock: Callable[[], float] = time.time,
        informed: bool = False,
        leader_first: bool = False,
        start_strength: float | None = None,
    ):
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"names must be distinct and non-empty, got {list(names)}")
        if not 0 < floor <= max_weight:
            raise ValueError(f"need 0 < floor <= max_weight, got {floor} and {max_weight}")
        if not all(0 < initial.get(name, 1.0) < math.inf for name in names):
            raise ValueError(f"initial weights must be positive and finite, got {dict(initial)}")
        if beta < 0 or min_evidence < 0:
            raise ValueError(f"beta and min_evidence must be >= 0, got {beta}, {min_evidence}")
        if not 0 < prior < math.inf:
            raise ValueError(f"prior must be positive and finite, got {prior}")
        if start_strength is not None and not 0 < start_strength < math.inf:
            raise ValueError(f"start_strength must be positive and finite, got {start_strength}")
        self.names = tuple(names)
        # A recommender the config gives no weight to starts at RRF's default, 1.
        self.initial = {name: initial.get(name, 1.0) for name in self.names}
        self.min_evidence = min_evidence
        self.floor = floor
        self.max_weight = max_weight
        self.beta = beta
        self.prior = prior
        self.frozen = frozen
        # The start is an informed prior (weights fitted offline): worth `start_strength`
        # comparisons of evidence to exploration as well as to the weights, and the weights
        # move from it from the first comparison.
        self.informed = informed
        # What the start is worth while the evidence agrees with its order: `prior` for an
        # equal one.
        self.start_strength = start_strength if informed and start_strength else prior
        self.start_margins = self._start_margins() if informed else dict.fromkeys(self.names, 0.0)
        # Comparisons one clicked answer decides for its winner: the intervals' unit.
        self._per_answer = max(1, len(self.names) - 1)
        # With no prior: serve a leader the evidence shows alone until min_evidence.
        self.leader_first = leader_first
        self._clock = clock

    def evidence(self, stats: FeedbackStats) -> int:
        """Comparisons (wins, losses and ties) between two of the learnt recommenders."""
        return sum(
            sum(counts)
            for (a, b), counts in stats.pairwise.items()
            if a in self.initial and b in self.initial
        )

    def margins(self, stats: FeedbackStats) -> dict[str, float]:
        """Each learnt recommender's margin: (wins - losses + n · start) / (decided + n), the
        start's margin worth n = `strength` comparisons (the start 0 for an equal start)."""
        strength = self.strength(stats)
        return {
            name: (2 * wins - decided + strength * self.start_margins[name]) / (decided + strength)
            for name, (wins, decided) in self._records(stats).items()
        }

    def agreement(self, stats: FeedbackStats) -> tuple[int, int]:
        """Decided comparisons that agree and that disagree with an informed start's order:
        a win of the recommender the start weighs more, or of the one it weighs less. Pairs
        the start weighs equally say nothing of it; (0, 0) for an equal start."""
        agree = disagree = 0
        if not self.informed:
            return agree, disagree
        for (a, b), counts in stats.pairwise.items():
            if a not in self.initial or b not in self.initial:
                continue
            if self.initial[a] > self.initial[b]:
                agree, disagree = agree + counts.wins, disagree + counts.losses
            elif self.initial[a] < self.initial[b]:
                agree, disagree = agree + counts.losses, disagree + counts.wins
        return agree, disagree

    def contradicted(self, stats: FeedbackStats) -> bool:
        """Whether the evidence contradicts an informed start: more of the comparisons its
        order decides go against it than with it, 95% sure (in clicked answers: one click
        decides up to k - 1 together). All of them, not pair by pair: a pair's own record is
        thin for long, and a test on it fired and lapsed again in the online benchmark."""
        agree, disagree = self.agreement(stats)
        low, _ = wilson_interval(disagree / self._per_answer, (agree + disagree) / self._per_answer)
        return low > 0.5

    def strength(self, stats: FeedbackStats) -> float:
        """The comparisons the start is worth now: `start_strength` for an informed start the
        evidence has not contradicted; else `prior`, a thin record's shrinkage."""
        return self.prior if self.contradicted(stats) else self.start_strength

    def _start_margins(self) -> dict[str, float]:
        """The margins the initial weights stand for under the rule: ln(initial / g) / beta,
        g their geometric mean, clipped to (-1, 1); all 0 when beta is 0 (nothing moves)."""
        if self.beta == 0:
            return dict.fromkeys(self.names, 0.0)
        centre = sum(math.log(w) for w in self.initial.values()) / len(self.initial)
        return {
            name: max(-0.999, min(0.999, (math.log(w) - centre) / self.beta))
            for name, w in self.initial.items()
        }

    def uncertainty(self, stats: FeedbackStats) -> float:
        """How much the evidence still leaves open: the widest half-width of a 95% interval
        (Wilson, `gateway.feedback.attribution`) around a learnt recommender's share of its
        decided comparisons with the others, as its margin counts them, in clicked answers
        (comparisons / (k - 1), see the module docstring). 0.5 before it has one; then about
        1/sqrt(answers that decided some for it).

        Per recommender, not per pair: the weights follow each one's margin over all the
        others, and two weak recommenders that rarely beat each other decide little of the
        fused list. 0 with fewer than two learnt recommenders (nothing to compare). An
        `informed` start counts as `strength` comparisons more, at the share its start margin
        stands for (a Beta prior's pseudo-counts): what was fitted offline is known before
        the first click, until the evidence contradicts it.
        """
        if len(self.names) < 2:
            return 0.0
        widest = 0.0
        strength = self.strength(stats)
        for name, (wins, decided) in self._answers(stats).items():
            if self.informed:
                prior = strength / self._per_answer
                wins += prior * (1 + self.start_margins[name]) / 2
                decided += prior
            low, high = wilson_interval(wins, decided)
            widest = max(widest, (high - low) / 2)
        return widest

    def leader(self, stats: FeedbackStats) -> str | None:
        """The recommender the evidence so far shows better than the others, or None: the one
        whose share of its decided comparisons has a 95% interval above one half (the highest
        low end, if several), in clicked answers. Lucky first wins do not make a leader: in
        the online benchmark, following the highest share from a handful of comparisons, or
        an interval as if each comparison were independent, served the worst recommender
        alone for most of a run."""
        answers = self._answers(stats)
        lows = {n: wilson_interval(w, d)[0] for n, (w, d) in answers.items()}
        best = max(self.names, key=lambda name: lows[name])
        return best if lows[best] > 0.5 else None

    def before_evidence(self, stats: FeedbackStats) -> dict[str, float]:
        """What to fuse with before `min_evidence`: the start (clipped to the bounds); with no
        prior and `leader_first`, once the evidence shows a `leader`, that leader at
        `max_weight` and the others at `floor`, its list nearly alone."""
        start = {
            n: round(min(self.max_weight, max(self.floor, w)), _DECIMALS)
            for n, w in self.initial.items()
        }
        leader = self.leader(stats) if self.leader_first and not self.informed else None
        if leader is None:
            return start
        return {n: self.max_weight if n == leader else self.floor for n in self.names}

    def _records(self, stats: FeedbackStats) -> dict[str, tuple[int, int]]:
        """Each learnt recommender's wins and decided comparisons against the others."""
        wins = dict.fromkeys(self.names, 0)
        decided = dict.fromkeys(self.names, 0)
        for (a, b), counts in stats.pairwise.items():
            if a in wins and b in wins:
                wins[a] += counts.wins
                wins[b] += counts.losses
                decided[a] += counts.wins + counts.losses
                decided[b] += counts.wins + counts.losses
        return {name: (wins[name], decided[name]) for name in self.names}

    def _answers(self, stats: FeedbackStats) -> dict[str, tuple[float, float]]:
        """`_records` in clicked answers: wins and decided divided by k - 1."""
        return {
            name: (wins / self._per_answer, decided / self._per_answer)
            for name, (wins, decided) in self._records(stats).items()
        }

    def weights_for(self, stats: FeedbackStats) -> dict[str, float]:
        """The weights the rule gives for these counters, ignoring `min_evidence` and `frozen`."""
        margins = self.margins(stats)
        top, bottom = math.log(self.max_weight), math.log(self.floor)
        weights = {}
        for name in self.names:
            # Clipped in log space: exp() of a large beta could overflow.
            moved = margins[name] - self.start_margins[name]
            exponent = math.log(self.initial[name]) + self.beta * moved
            weights[name] = round(math.exp(min(top, max(bottom, exponent))), _DECIMALS)
        return weights

    def update(self, stats: FeedbackStats, current: LearnedWeights | None) -> LearnedWeights:
        """The weights to use now: `current` when frozen or unchanged.

        With no `current`, the start is `before_evidence` with no evidence, version 0. An
        uninformed start short of `min_evidence` keeps `before_evidence` (which may follow the
        leader); an informed one, and any after, the rule: its prior is its brake. A change
        bumps the version, which the stores use to keep the newest.
        """
        evidence = self.evidence(stats)
        if current is None:
            start = self.before_evidence(FeedbackStats())
            current = LearnedWeights(start, evidence=0, updated_at=self._clock(), version=0)
        if self.frozen:
            return current
        if evidence < self.min_evidence and not self.informed:
            weights = self.before_evidence(stats)
            if weights == dict(current.weights):
                return current
            return LearnedWeights(weights, evidence, self._clock(), current.version + 1)
        weights = self.weights_for(stats)
        if weights == dict(current.weights) and evidence == current.evidence:
            return current
        return LearnedWeights(weights, evidence, self._clock(), current.version + 1)

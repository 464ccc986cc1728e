"""Tests of gateway/feedback/learner.py: the shrunk mean margin, settling, bounds, freezing."""

from __future__ import annotations

import math

import pytest

from gateway.feedback.attribution import PairCounts, wilson_interval
from gateway.feedback.learner import WeightLearner
from gateway.feedback.records import FeedbackStats, LearnedWeights

NAMES = ("als", "pop", "trd")
NOW = 1_700_000_000.0


def learner(**overrides: object) -> WeightLearner:
    settings: dict[str, object] = {
        "names": NAMES,
        "initial": {"als": 1.0, "pop": 1.0, "trd": 1.0},
        "min_evidence": 30,
        "floor": 0.2,
        "max_weight": 3.0,
        "beta": 4.0,
        "prior": 50.0,
        "clock": lambda: NOW,
        # Started from a prior (the rule's tests); `informed=False` tests the leader-first start.
        "informed": True,
    }
    settings.update(overrides)
    return WeightLearner(**settings)  # type: ignore[arg-type]


def stats(pairs: dict[tuple[str, str], tuple[int, int, int]]) -> FeedbackStats:
    return FeedbackStats(pairwise={pair: PairCounts(*counts) for pair, counts in pairs.items()})


def test_the_recommender_that_keeps_winning_gains_weight() -> None:
    """A scripted stream: als beats trd 3 times in 4 decided comparisons; pop ties both."""
    margin = learner()
    current: LearnedWeights | None = None
    history = []
    for rounds in range(1, 11):
        seen = stats(
            {
                ("als", "trd"): (3 * rounds, rounds, 2 * rounds),
                ("als", "pop"): (0, 0, 4 * rounds),
                ("pop", "trd"): (0, 0, 4 * rounds),
            }
        )
        current = margin.update(seen, current)
        history.append(dict(current.weights))

    als, trd, pop = ([w[n] for w in history] for n in ("als", "trd", "pop"))
    assert als == sorted(als) and als[-1] > 1.0
    assert trd == sorted(trd, reverse=True) and trd[-1] < 1.0
    assert pop == [1.0] * 10
    assert als[-1] > pop[-1] > trd[-1]
    assert current is not None and current.evidence == 140


def test_the_weights_follow_the_documented_rule() -> None:
    """From an equal start, margins +2/8 and -2/8 (3 wins, 1 loss, prior 4) at beta 4: e and 1/e.
    From 1.0 and 2.0, the start's margins -+ln(2)/8 count `prior` comparisons: the weights move
    by the evidence against the share the start stands for."""
    equal = learner(names=("a", "b"), initial={}, floor=0.01, max_weight=5, prior=4)
    informed = learner(names=("a", "b"), initial={"b": 2.0}, floor=0.01, max_weight=5, prior=4)
    seen = stats({("a", "b"): (3, 1, 5)})

    assert equal.margins(seen) == {"a": 0.25, "b": -0.25}
    assert equal.weights_for(seen) == {
        "a": pytest.approx(math.e, abs=1e-6),
        "b": pytest.approx(1 / math.e, abs=1e-6),
    }
    start = math.log(2) / 2 / 4  # ln(2 / sqrt 2) / beta
    assert informed.start_margins == {"a": pytest.approx(-start), "b": pytest.approx(start)}
    assert informed.margins(seen)["a"] == pytest.approx((6 - 4 - 4 * start) / 8)
    moved = (6 - 4 * (1 - start)) / 8  # a: 3 wins of 4 against the start's share (1 - start) / 2
    assert informed.weights_for(seen) == {
        "a": pytest.approx(math.exp(4 * moved), abs=1e-6),
        "b": pytest.approx(2 * math.exp(-4 * moved), abs=1e-6),
    }
    assert informed.weights_for(stats({})) == {"a": 1.0, "b": 2.0}


def test_a_wrong_prior_is_outvoted_by_the_evidence() -> None:
    """Started upside down, the weights converge to where the evidence puts them from an equal
    start (same ratios), and their order follows the evidence long before."""
    upside_down = learner(initial={"als": 0.2, "pop": 1.0, "trd": 3.0}, floor=0.01, max_weight=100)
    equal = learner(informed=False, min_evidence=0, floor=0.01, max_weight=100)

    def ratios(weights: dict[str, float]) -> list[float]:
        return [weights[name] / weights["pop"] for name in NAMES]

    def seen(scale: int) -> FeedbackStats:
        return stats(
            {
                ("als", "trd"): (6 * scale, 2 * scale, 3 * scale),
                ("als", "pop"): (4 * scale, 3 * scale, 5 * scale),
                ("pop", "trd"): (35 * scale // 10, 3 * scale, 4 * scale),
            }
        )

    thin, some, much = (upside_down.weights_for(seen(n)) for n in (1, 100, 10_000))

    assert thin["trd"] > thin["pop"] > thin["als"]  # 20 comparisons against a prior of 50
    assert some["als"] > some["pop"] > some["trd"]  # 2,000: the evidence's order
    target = ratios(equal.weights_for(seen(10_000)))
    assert ratios(much) == pytest.approx(target, rel=0.01)


def test_the_weights_settle_as_the_evidence_grows() -> None:
    """Twice every counter of a long stream barely moves a weight; Hedge's exponent would double."""
    margin = learner(min_evidence=0, floor=0.01, max_weight=100.0)
    long_stream = {
        ("als", "trd"): (600, 200, 300),
        ("als", "pop"): (400, 300, 500),
        ("pop", "trd"): (350, 300, 400),
    }
    twice = {pair: (2 * w, 2 * lo, 2 * t) for pair, (w, lo, t) in long_stream.items()}

    once, doubled = margin.weights_for(stats(long_stream)), margin.weights_for(stats(twice))

    # als: 1,000 wins and 500 losses, margin 500/1,550, then 1,000/3,050: e^1.290, then e^1.311.
    assert once["als"] == pytest.approx(math.exp(4 * 500 / 1550), abs=1e-6)
    assert doubled["als"] == pytest.approx(math.exp(4 * 1000 / 3050), abs=1e-6)
    for name in NAMES:
        moved = abs(math.log(doubled[name]) - math.log(once[name]))
        assert moved <= 0.03 * abs(math.log(once[name])), (name, once, doubled)
    # Hedge's gain, the net wins, doubles with the counters (als +500 -> +1,000), and so would
    # its exponent; the margin moves from 0.323 to 0.328.
    before, after = margin.margins(stats(long_stream)), margin.margins(stats(twice))
    assert after["als"] - before["als"] == pytest.approx(1000 / 3050 - 500 / 1550)
    assert after["als"] - before["als"] < 0.006
    assert once["als"] > once["pop"] > once["trd"]


def test_nothing_moves_before_the_minimum_evidence_from_an_equal_start() -> None:
    margin = learner(min_evidence=30, informed=False)
    start = margin.update(stats({}), None)

    thin = margin.update(stats({("als", "trd"): (20, 0, 9)}), start)
    enough = margin.update(stats({("als", "trd"): (20, 0, 10)}), start)

    assert start == LearnedWeights({"als": 1.0, "pop": 1.0, "trd": 1.0}, 0, NOW, 0)
    assert thin is start
    assert enough.version == 1 and enough.evidence == 30
    assert enough.weights["als"] > 1.0 > enough.weights["trd"]


def test_a_prior_moves_from_the_first_comparison_its_strength_its_brake() -> None:
    seen = stats({("als", "trd"): (5, 0, 0)})

    weak, strong = (learner(min_evidence=30, prior=p).update(seen, None) for p in (5.0, 500.0))

    assert weak.version == strong.version == 1 and weak.evidence == 5
    assert weak.weights["als"] > strong.weights["als"] > 1.0
    assert strong.weights["als"] == pytest.approx(math.exp(4 * 5 / 505), abs=1e-6)


def test_the_floor_and_the_maximum_bound_every_weight() -> None:
    margin = learner(min_evidence=0, floor=0.2, max_weight=1.6)

    # als's margin 5,900/5,950 would give e^3.97, trd's and pop's e^-3.96 and e^-3.79.
    seen = stats({("als", "trd"): (5000, 0, 0), ("als", "pop"): (900, 0, 0)})

    weights = margin.update(seen, None)

    assert weights.weights == {"als": 1.6, "pop": 0.2, "trd": 0.2}


def test_a_frozen_learner_holds_the_current_weights() -> None:
    held = LearnedWeights({"als": 0.7, "pop": 1.1, "trd": 1.2}, 12, NOW - 60, 4)

    answer = learner(frozen=True, min_evidence=0).update(stats({("als", "trd"): (99, 0, 0)}), held)

    assert answer is held


def test_the_weights_depend_on_the_counters_alone_not_on_the_updates_before() -> None:
    counts = {("als", "trd"): (40, 10, 5), ("pop", "trd"): (7, 9, 30)}
    stepwise: LearnedWeights | None = None
    for f in (0.25, 0.5, 1.0):
        partial = {
            pair: (int(w * f), int(lo * f), int(t * f)) for pair, (w, lo, t) in counts.items()
        }
        stepwise = learner().update(stats(partial), stepwise)
    direct = learner().update(stats(counts), None)

    assert stepwise is not None
    assert stepwise.weights == direct.weights
    assert stepwise.version > direct.version == 1


def test_unchanged_counters_keep_the_version() -> None:
    margin = learner(min_evidence=0)
    seen = stats({("als", "trd"): (4, 1, 0)})
    first = margin.update(seen, None)

    assert margin.update(seen, first) is first


def test_pairs_with_a_recommender_not_learnt_are_ignored() -> None:
    margin = learner(min_evidence=1)
    seen = stats({("als", "zzz"): (50, 0, 0), ("ncf", "trd"): (0, 50, 0)})

    assert margin.evidence(seen) == 0
    assert margin.update(seen, None).version == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"names": ()}, "non-empty"),
        ({"names": ("als", "als")}, "distinct"),
        ({"floor": 0.0}, "floor"),
        ({"floor": 4.0}, "floor"),
        ({"initial": {"als": 0.0}}, "positive"),
        ({"beta": -0.1}, "beta"),
        ({"prior": 0.0}, "prior"),
        ({"prior": math.inf}, "prior"),
        ({"start_strength": 0.0}, "start_strength"),
    ],
)
def test_bad_settings_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        learner(**overrides)


def test_a_strong_prior_holds_until_the_evidence_contradicts_its_order() -> None:
    """Worth `start_strength` while the comparisons its order decides agree with it (or are too
    few to say); once more disagree than agree, 95% sure, worth `prior` only."""
    strong = learner(
        initial={"als": 3.0, "pop": 1.0, "trd": 0.5},
        start_strength=1000.0,
        prior=50.0,
        floor=0.01,
        max_weight=100.0,
    )
    agreeing = stats({("als", "pop"): (10, 5, 3), ("pop", "trd"): (8, 2, 0)})
    # 18 of 30 against: 9 of 15 clicked answers (k - 1 = 2), not sure.
    unsure = stats({("als", "pop"): (4, 10, 3), ("als", "trd"): (8, 8, 0)})
    # trd beats pop and als: 60 of 80 against, 30 of 40 answers.
    contrary = stats({("als", "trd"): (10, 30, 0), ("pop", "trd"): (10, 30, 3)})

    assert strong.agreement(agreeing) == (18, 7)
    assert not strong.contradicted(agreeing) and strong.strength(agreeing) == 1000.0
    assert strong.agreement(unsure) == (12, 18) and not strong.contradicted(unsure)
    assert strong.agreement(contrary) == (20, 60) and strong.contradicted(contrary)
    assert strong.strength(contrary) == 50.0
    # Contradicted, the evidence leads: the margins shrink towards the start by 50, not 1,000.
    margins = strong.margins(contrary)
    start = strong.start_margins["trd"]
    assert margins["trd"] == pytest.approx((60 - 20 + 50 * start) / (80 + 50))
    assert strong.weights_for(contrary)["trd"] > strong.weights_for(contrary)["pop"]
    held = strong.weights_for(unsure)
    assert held["als"] > held["pop"] > held["trd"]  # 30 comparisons against 1,000
    # Pairs the start weighs equally say nothing of its order.
    level = learner(initial={"als": 3.0, "pop": 1.0, "trd": 1.0}, start_strength=1000.0)
    assert level.agreement(stats({("pop", "trd"): (0, 40, 0)})) == (0, 0)
    # With no start_strength, or an equal start, the start is worth `prior` whatever happens.
    assert learner(initial={"als": 3.0}).strength(agreeing) == 50.0
    equal = learner(informed=False, start_strength=1000.0)
    assert equal.strength(agreeing) == 50.0 and not equal.contradicted(contrary)
    assert equal.agreement(contrary) == (0, 0)


def test_the_uncertainty_is_the_widest_interval_of_a_recommenders_share_in_clicked_answers() -> (
    None
):
    rule = learner(informed=False)
    half = rule.uncertainty(stats({("als", "pop"): (30, 10, 5)}))
    much = rule.uncertainty(
        stats({pair: (300, 100, 0) for pair in [("als", "pop"), ("als", "trd"), ("pop", "trd")]})
    )

    # A recommender with no decided comparison leaves the whole range open.
    assert rule.uncertainty(stats({})) == 0.5
    assert half == 0.5  # trd never compared
    # pop won 100 of its 400 against als and 300 of 400 against trd: 400 of 800 comparisons,
    # the widest; one click decides two (k - 1) for its team: 200 of 400 clicked answers.
    low, high = wilson_interval(200, 400)
    assert much == pytest.approx((high - low) / 2)
    assert much == pytest.approx(1.96 * math.sqrt(0.25 / 400), rel=0.01)
    assert learner(names=("als",), initial={"als": 1.0}).uncertainty(stats({})) == 0.0


def test_an_informed_start_is_worth_its_prior_in_comparisons_to_exploration_too() -> None:
    informed = learner(informed=True, prior=50.0)

    # 50 comparisons are 25 clicked answers (k - 1 = 2), at the start's share, one half.
    low, high = wilson_interval(12.5, 25)
    assert informed.uncertainty(stats({})) == pytest.approx((high - low) / 2)
    # pop: 10 of 40 decided, with the prior's 25 of 50: 35 of 90 comparisons, 17.5 of 45
    # answers; trd 35 of 70, wider.
    low, high = wilson_interval(17.5, 45)
    found = informed.uncertainty(stats({("als", "pop"): (30, 10, 5), ("als", "trd"): (10, 10, 0)}))
    assert found >= (high - low) / 2 - 1e-9
    assert found < 0.5
    # A start that believes in a recommender is as sure of it: the pseudo-counts sit at the
    # share its margin stands for.
    leaning = learner(informed=True, initial={"als": 3.0, "pop": 1.0, "trd": 1.0}, prior=50.0)
    halves = []
    for margin in leaning.start_margins.values():
        low, high = wilson_interval(25 * (1 + margin) / 2, 25)
        halves.append((high - low) / 2)
    assert leaning.uncertainty(stats({})) == pytest.approx(max(halves))
    assert leaning.uncertainty(stats({})) < informed.uncertainty(stats({}))


def test_with_no_prior_and_leader_first_a_leader_the_evidence_shows_is_served() -> None:
    cold = learner(
        informed=False,
        leader_first=True,
        min_evidence=100,
        initial={"als": 1.0, "pop": 1.0, "trd": 1.0},
    )
    start = cold.update(stats({}), None)
    lucky = {("als", "trd"): (0, 3, 0)}  # trd 3 of 3: a high share, a wide interval
    thin = cold.update(stats(lucky), start)
    # pop wins 30 of 40 against als (15 of 20 clicked answers): an interval above one half.
    shown = {("als", "pop"): (10, 30, 0), ("als", "trd"): (0, 3, 0)}
    early = cold.update(stats(shown), start)
    same = cold.update(stats({("als", "pop"): (10, 31, 0), ("als", "trd"): (0, 3, 0)}), early)
    enough = cold.update(stats({("als", "pop"): (20, 80, 0)}), early)

    # Nothing known, or a lucky few wins: the start, equal.
    assert start.weights == {"als": 1.0, "pop": 1.0, "trd": 1.0} and start.version == 0
    assert cold.leader(stats(lucky)) is None and thin is start
    # A leader shown: alone at the maximum, the others at the floor.
    assert cold.leader(stats(shown)) == "pop"
    assert early.weights == {"als": 0.2, "pop": 3.0, "trd": 0.2} and early.version == 1
    assert same is early  # the same leader: no new version
    # From the minimum evidence on, the rule, from the configured start.
    assert enough.weights == cold.weights_for(stats({("als", "pop"): (20, 80, 0)}))
    assert enough.version == 2
    # An informed start moves by the rule, whatever leads; an equal one holds without
    # leader_first (`cold_start: equal`).
    informed = learner(min_evidence=100)
    assert informed.update(stats(shown), None).weights == informed.weights_for(stats(shown))
    equal = learner(informed=False, min_evidence=100)
    assert equal.update(stats(shown), None).weights == start.weights

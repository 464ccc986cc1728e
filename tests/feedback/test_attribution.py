"""Tests of gateway/feedback/attribution.py: pairwise outcomes, running counters, intervals."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from gateway.feedback.attribution import (
    PairCounts,
    pair_outcome,
    pairwise_delta,
    preference,
    wilson_interval,
)
from gateway.feedback.impressions import ShownItem, credit_for

# A hand-worked team-draft example: three teams, three impressions of six items each.
TEAMS = ("als", "pop", "trd")
ITEMS = tuple(
    ShownItem(f"i{n}", n, team, (team,))
    for n, team in enumerate(("als", "trd", "pop", "trd", "als", "pop"), start=1)
)
# Clicks in arrival order, as (impression, item).
CLICKS = [("imp1", "i1"), ("imp2", "i3"), ("imp1", "i4"), ("imp1", "i5")]
# imp1: als 2, trd 1, pop 0 -> als beats trd and pop, trd beats pop.
# imp2: pop 1 -> pop beats als and trd; als ties trd.  imp3: no clicks, decides nothing.
EXPECTED_PAIRS = {
    ("als", "pop"): PairCounts(wins=1, losses=1, ties=0),
    ("als", "trd"): PairCounts(wins=1, losses=0, ties=1),
    ("pop", "trd"): PairCounts(wins=1, losses=1, ties=0),
}
EXPECTED_CREDIT = {"als": 2.0, "trd": 1.0, "pop": 1.0}


def _add(
    counters: dict[tuple[str, str], PairCounts], delta: Mapping[tuple[str, str], PairCounts]
) -> None:
    for pair, change in delta.items():
        old = counters.get(pair, PairCounts(0, 0, 0))
        counters[pair] = PairCounts(*(x + y for x, y in zip(old, change, strict=True)))


def test_the_running_counters_match_the_hand_worked_example() -> None:
    clicks = {imp: dict.fromkeys(TEAMS, 0) for imp in ("imp1", "imp2", "imp3")}
    counters: dict[tuple[str, str], PairCounts] = {}
    credit: dict[str, float] = {}
    items = {item.item_id: item for item in ITEMS}
    for imp, item_id in CLICKS:
        item = items[item_id]
        for name, share in credit_for(item).items():
            credit[name] = credit.get(name, 0.0) + share
        assert item.team is not None
        before = dict(clicks[imp])
        clicks[imp][item.team] += 1
        _add(counters, pairwise_delta(before, clicks[imp]))

    assert {pair: counts for pair, counts in counters.items() if any(counts)} == EXPECTED_PAIRS
    assert credit == EXPECTED_CREDIT


def test_the_running_counters_equal_the_outcomes_of_the_final_clicks() -> None:
    final = [{"als": 2, "trd": 1, "pop": 0}, {"pop": 1}, dict.fromkeys(TEAMS, 0)]
    direct: dict[tuple[str, str], PairCounts] = {}
    for clicks in final:
        for a, b in [("als", "pop"), ("als", "trd"), ("pop", "trd")]:
            outcome = pair_outcome(clicks, a, b)
            if outcome is not None:
                index = ("win", "loss", "tie").index(outcome)
                _add(direct, {(a, b): PairCounts(*(int(i == index) for i in range(3)))})

    assert direct == EXPECTED_PAIRS


def test_an_impression_without_clicks_decides_nothing() -> None:
    assert pair_outcome({"als": 0, "trd": 0}, "als", "trd") is None
    assert pairwise_delta({"als": 0, "trd": 0}, {"als": 0, "trd": 0}) == {}


def test_after_a_first_click_the_unclicked_teams_tie() -> None:
    assert pair_outcome({"als": 1}, "pop", "trd") == "tie"
    assert pair_outcome({"als": 1}, "als", "trd") == "win"
    assert pair_outcome({"als": 1}, "trd", "als") == "loss"


def test_a_second_click_turns_a_win_into_a_tie() -> None:
    delta = pairwise_delta({"als": 1, "trd": 0, "pop": 0}, {"als": 1, "trd": 1, "pop": 0})

    assert delta == {
        ("als", "trd"): PairCounts(wins=-1, losses=0, ties=1),
        ("pop", "trd"): PairCounts(wins=0, losses=1, ties=-1),
    }


@pytest.mark.parametrize(
    ("successes", "trials", "expected"),
    [
        (5, 10, (0.2366, 0.7634)),
        (0, 10, (0.0, 0.2775)),
        (10, 10, (0.7225, 1.0)),
        (81, 263, (0.2553, 0.3662)),
        (1, 1000, (0.0002, 0.0056)),
    ],
)
def test_the_wilson_interval_matches_known_values(
    successes: int, trials: int, expected: tuple[float, float]
) -> None:
    assert wilson_interval(successes, trials) == pytest.approx(expected, abs=1e-4)


def test_a_wider_z_gives_a_wider_interval_and_no_trials_say_nothing() -> None:
    narrow, wide = wilson_interval(30, 100, z=1.0), wilson_interval(30, 100, z=2.576)

    assert wide[0] < narrow[0] < 0.3 < narrow[1] < wide[1]
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(("successes", "trials"), [(3, 2), (-1, 2), (0, -1)])
def test_impossible_counts_are_refused(successes: int, trials: int) -> None:
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(successes, trials)


def test_preference_is_the_share_of_decided_comparisons_won() -> None:
    result = preference(wins=30, losses=10, ties=60)

    assert result.share == 0.75
    assert (result.decided, result.ties) == (40, 60)
    assert (result.low, result.high) == wilson_interval(30, 40)
    assert result.low > 0.5


def test_preference_with_nothing_decided_is_even_and_uninformative() -> None:
    result = preference(wins=0, losses=0, ties=7)

    assert (result.share, result.low, result.high) == (0.5, 0.0, 1.0)

"""Tests of gateway/feedback/records.py: summaries of the counters, and learnt weights' JSON."""

from __future__ import annotations

import pytest

from gateway.feedback.attribution import PairCounts
from gateway.feedback.records import FeedbackStats, LearnedWeights, RecommenderCounts

STATS = FeedbackStats(
    recommenders={
        "als": RecommenderCounts(10, 4, 3.0),
        "pop": RecommenderCounts(10, 1, 1.0),
        "ncf": RecommenderCounts(10, 0, 0.0),
    },
    pairwise={("als", "pop"): PairCounts(5, 2, 1), ("pop", "trd"): PairCounts(3, 4, 6)},
)


def test_comparisons_are_summed_from_each_side() -> None:
    assert STATS.comparisons("als") == PairCounts(5, 2, 1)
    assert STATS.comparisons("pop") == PairCounts(2 + 3, 5 + 4, 1 + 6)
    assert STATS.comparisons("trd") == PairCounts(4, 3, 6)
    assert STATS.comparisons("ncf") == PairCounts(0, 0, 0)


def test_credit_share_is_of_all_credit_given() -> None:
    assert STATS.credit_share("als") == 0.75
    assert STATS.credit_share("ncf") == 0.0
    assert STATS.credit_share("unknown") == 0.0
    assert FeedbackStats().credit_share("als") == 0.0


def test_learnt_weights_survive_their_json_form() -> None:
    weights = LearnedWeights({"pop": 0.5, "als": 1.25}, evidence=7, updated_at=12.5, version=3)

    text = weights.to_json()

    assert LearnedWeights.from_json(text) == weights
    assert text.startswith('{"weights":{"als":1.25,"pop":0.5}')


@pytest.mark.parametrize(
    "text",
    [
        '{"weights":{"als":1},"evidence":1,"updated_at":1}',
        '{"weights":[1],"evidence":1,"updated_at":1,"version":1}',
        '{"weights":{"als":1e999},"evidence":1,"updated_at":1,"version":1}',
        "[]",
    ],
)
def test_anything_else_is_not_learnt_weights(text: str) -> None:
    with pytest.raises(ValueError, match="weights"):
        LearnedWeights.from_json(text)

"""Fusion strategies against examples computed by hand."""

from __future__ import annotations

import pytest

from gateway.fusion import (
    FUSIONS,
    CombMnz,
    CombSum,
    Concat,
    Provenance,
    Ranked,
    ReciprocalRank,
    TeamDraft,
    coverage,
    ranked_from,
)

A = Ranked("A", 1.0, (("a", 0.9), ("b", 0.8), ("c", 0.1)))
B = Ranked("B", 1.0, (("b", 5.0), ("d", 3.0), ("a", 1.0)))


def ids(fused: list) -> list[str]:  # type: ignore[type-arg]
    return [item.id for item in fused]


def test_rrf_sums_reciprocal_ranks() -> None:
    fused = ReciprocalRank(k=60).fuse([A, B], 10, "r")

    # a: 1/61 + 1/63 = 0.032266; b: 1/62 + 1/61 = 0.032522; d: 1/62; c: 1/63
    assert ids(fused) == ["b", "a", "d", "c"]
    assert [item.score for item in fused] == pytest.approx(
        [1 / 62 + 1 / 61, 1 / 61 + 1 / 63, 1 / 62, 1 / 63], abs=1e-6
    )
    assert fused[0].sources == [Provenance("A", 2, 0.8), Provenance("B", 1, 5.0)]
    assert fused[2].sources == [Provenance("B", 2, 3.0)]


def test_rrf_weights_and_ties() -> None:
    x_first = Ranked("X", 1.0, (("x", None),))
    y_first = Ranked("Y", 1.0, (("y", None),))

    # A tie (1/61 each, both at rank 1) is broken by id, never by which list came first.
    assert ids(ReciprocalRank().fuse([y_first, x_first], 2, "r")) == ["x", "y"]
    heavier_y = Ranked("Y", 2.0, (("y", None),))
    assert ids(ReciprocalRank().fuse([x_first, heavier_y], 2, "r")) == ["y", "x"]


def test_weighted_is_combsum_of_min_max_normalised_scores() -> None:
    fused = CombSum().fuse([A, B], 10, "r")

    # A: a 1, b 0.875, c 0; B: b 1, d 0.5, a 0 -> b 1.875, a 1, d 0.5, c 0
    assert ids(fused) == ["b", "a", "d", "c"]
    assert [item.score for item in fused] == pytest.approx([1.875, 1.0, 0.5, 0.0])


def test_combmnz_rewards_agreement() -> None:
    fused = CombMnz().fuse([A, B], 10, "r")

    assert [(item.id, item.score) for item in fused] == [
        ("b", 3.75),
        ("a", 2.0),
        ("d", 0.5),
        ("c", 0.0),
    ]


def test_lists_without_scores_are_scored_by_rank() -> None:
    unscored = Ranked("U", 1.0, (("p", None), ("q", None), ("r", None)))

    fused = CombSum().fuse([unscored], 3, "r")

    assert [(item.id, item.score) for item in fused] == [("p", 1.0), ("q", 0.5), ("r", 0.0)]


def test_concat_keeps_first_occurrences_in_config_order() -> None:
    fused = Concat().fuse([A, B], 10, "r")

    assert ids(fused) == ["a", "b", "c", "d"]
    assert fused[3].score == 3.0
    assert ids(Concat().fuse([B, A], 2, "r")) == ["b", "d"]


def test_team_draft_takes_turns_and_is_seeded() -> None:
    fused = TeamDraft().fuse([A, B], 4, "request-1")

    assert set(ids(fused)[:2]) == {"a", "b"}  # round 1: each team's best
    assert set(ids(fused)[2:]) == {"c", "d"}  # round 2: the next ones not yet taken
    assert [item.score for item in fused] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    assert ids(TeamDraft().fuse([A, B], 4, "request-1")) == ids(fused)
    orders = {tuple(ids(TeamDraft().fuse([A, B], 4, f"request-{i}"))) for i in range(20)}
    assert len(orders) > 1  # the seed decides who picks first


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_every_strategy_truncates_and_copes_with_empty_lists(name: str) -> None:
    strategy = FUSIONS[name]()
    assert len(strategy.fuse([A, B], 2, "r")) == 2
    assert strategy.fuse([], 5, "r") == []
    assert strategy.fuse([Ranked("E", 1.0, ())], 5, "r") == []


def test_a_failed_source_drops_out_and_lowers_coverage() -> None:
    weights = {"A": 1.0, "B": 1.0, "C": 2.0}

    assert coverage([A, B], weights) == 0.5
    assert coverage([A, B, Ranked("C", 2.0, ())], weights) == 1.0
    assert ids(ReciprocalRank().fuse([A], 10, "r")) == ["a", "b", "c"]


def test_predictions_are_read_leniently() -> None:
    prediction = {
        "items": [
            {"id": "a", "score": 0.5},
            {"id": 7},
            {"id": "a", "score": 0.1},
            {"score": 1.0},
            "junk",
            {"id": "b", "score": True},
        ]
    }

    ranked = ranked_from("R", 2.0, prediction)

    assert ranked.items == (("a", 0.5), ("7", None), ("b", None))
    assert ranked_from("R", 1.0, {"no": "items"}).items == ()
    assert ranked_from("R", 1.0, ["not", "an", "object"]).items == ()

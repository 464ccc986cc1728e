"""The click models: deterministic, position-biased, and drawn to what the truth rewards.

The position-based model first, then the cascade: what sets it apart (one click, the first
attractive item, nothing below it) and what it shares (the draws, the determinism).
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from benchmarks.quality.ranking_metrics import ndcg_at
from mock_recommenders.clicks import CascadeModel, ClickModel, PositionBasedModel
from mock_recommenders.world import KINDS, World, default_world

USERS = [f"click-{n}" for n in range(300)]


@pytest.fixture(scope="module")
def model() -> PositionBasedModel:
    return PositionBasedModel(default_world())


def test_the_same_user_list_and_occasion_click_the_same_in_a_new_world(
    model: PositionBasedModel,
) -> None:
    again = PositionBasedModel(World(model.world.seed))
    shown = model.world.ranking("asc", "click-1", 10)
    items = [str(item["id"]) for item in shown]

    clicked = [model.clicks(user, items) for user in USERS[:50]]

    assert [again.clicks(user, items) for user in USERS[:50]] == clicked
    assert any(clicked), "somebody clicks something"
    # Another occasion (a second showing) draws afresh, and so does another world.
    assert [model.clicks(u, items, occasion=2) for u in USERS[:50]] != clicked
    other = PositionBasedModel(World(model.world.seed + 1))
    assert [other.clicks(u, items) for u in USERS[:50]] != clicked


def test_clicks_are_items_of_the_list_in_its_order(model: PositionBasedModel) -> None:
    for user in USERS[:50]:
        items = [str(item["id"]) for item in model.world.ranking("psn", user, 10)]
        clicked = model.clicks(user, items)
        assert clicked == [item for item in items if item in clicked]


def test_an_item_is_clicked_less_the_lower_it_is_shown(model: PositionBasedModel) -> None:
    user = "click-7"
    best = model.world.truth(user)[0]
    filler = [f"i{n}" for n in range(20) if f"i{n}" != best][:9]
    top = model.click_probabilities(user, [best, *filler])[0]
    bottom = model.click_probabilities(user, [*filler, best])[-1]

    assert top > 0
    assert bottom == pytest.approx(top / 10)  # 1/rank, eta 1
    flat = PositionBasedModel(model.world, eta=0.0)
    assert flat.click_probabilities(user, [*filler, best])[-1] == pytest.approx(top)

    # ...and so it is in the clicks drawn: the same lists, reversed, lose clicks at the top.
    at_rank: list[list[int]] = [[0] * 10, [0] * 10]
    for user in USERS:
        items = [str(item["id"]) for item in model.world.ranking("asc", user, 10)]
        for turn, shown in enumerate((items, items[::-1])):
            for item in model.clicks(user, shown):
                at_rank[turn][shown.index(item)] += 1
    assert sum(at_rank[0][:3]) > 2 * sum(at_rank[0][-3:])
    assert sum(at_rank[1][:3]) > 2 * sum(at_rank[1][-3:])


def test_truth_items_are_likelier_clicks_than_other_items_shown(model: PositionBasedModel) -> None:
    truth: list[float] = []
    other: list[float] = []
    for user in USERS:
        held_out = set(model.world.truth(user))
        for name in KINDS:
            items = [str(item["id"]) for item in model.world.ranking(name, user, 10)]
            for item, p in zip(items, model.attraction(user, items), strict=True):
                (truth if item in held_out else other).append(p)
    assert statistics.fmean(truth) > 2 * statistics.fmean(other)
    assert model.attraction("click-1", ["not-an-item", "i012", "i99999"]) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("name", ["pbm", "cascade"])
def test_better_lists_by_ndcg_draw_more_clicks(name: str) -> None:
    """Expected clicks per recommender follow mean NDCG@10 against the truth; the oracle tops both.

    Expected rather than drawn clicks: over 300 users, draws put `sml` and `psn` level. Under
    either click model: a cascade's clicks are fewer (one at most) but follow the same order.
    """
    model = ClickModel.named(name, default_world())
    ndcg: dict[str, float] = {}
    clicks: dict[str, float] = {}
    for name in [*KINDS, "oracle"]:
        per_user_ndcg, per_user_clicks = [], []
        for user in USERS:
            if name == "oracle":
                items = model.world.oracle(user, 10)
            else:
                items = [str(item["id"]) for item in model.world.ranking(name, user, 10)]
            per_user_ndcg.append(ndcg_at(items, model.world.truth(user), 10))
            per_user_clicks.append(model.expected_clicks(user, items))
        ndcg[name], clicks[name] = (
            statistics.fmean(per_user_ndcg),
            statistics.fmean(per_user_clicks),
        )

    by_ndcg = sorted(ndcg, key=ndcg.__getitem__)
    by_clicks = sorted(clicks, key=clicks.__getitem__)
    assert by_clicks == by_ndcg, (ndcg, clicks)
    assert by_ndcg[-1] == "oracle"


def test_bad_parameters_are_refused() -> None:
    world = default_world()
    with pytest.raises(ValueError, match="eta"):
        PositionBasedModel(world, eta=-1.0)
    with pytest.raises(ValueError, match="ranks start at 1"):
        PositionBasedModel(world).examination(0)
    with pytest.raises(ValueError, match="activity"):
        PositionBasedModel(world, activity=(0.0, 1.0))


def test_with_activity_users_differ_in_how_often_they_click_at_all(
    model: PositionBasedModel,
) -> None:
    active = PositionBasedModel(model.world, activity=(0.5, 4.5))
    items = [f"i{n}" for n in range(10)]
    engagement = [active.engagement(user) for user in USERS]

    # Beta(0.5, 4.5): mean 0.1, most users below it, a few far above; the same in a new model.
    assert statistics.mean(engagement) == pytest.approx(0.1, abs=0.02)
    assert statistics.median(engagement) < 0.07 and max(engagement) > 0.4
    assert (
        PositionBasedModel(World(model.world.seed), activity=(0.5, 4.5)).engagement(USERS[0])
        == (engagement[0])
    )
    assert model.engagement(USERS[0]) == 1.0
    # An engaged impression clicks as the model without activity does; the rest click nothing.
    for user in USERS[:40]:
        shown = [active.clicks(user, items, occasion=n) for n in range(20)]
        alike = [model.clicks(user, items, occasion=n) for n in range(20)]
        assert all(clicks in ([], other) for clicks, other in zip(shown, alike, strict=True))
    # The marginal probabilities carry the engagement.
    user = USERS[0]
    assert active.click_probabilities(user, items) == pytest.approx(
        [engagement[0] * p for p in model.click_probabilities(user, items)]
    )


# The cascade


def test_models_are_chosen_by_name() -> None:
    world = default_world()

    assert isinstance(ClickModel.named("pbm", world, eta=0.5), PositionBasedModel)
    cascade = ClickModel.named("cascade", world, continue_after_click=0.25, activity=(1.0, 1.0))
    assert isinstance(cascade, CascadeModel)
    assert (cascade.continue_after_click, cascade.activity) == (0.25, (1.0, 1.0))
    with pytest.raises(ValueError, match="no click model 'dbn'"):
        ClickModel.named("dbn", world)
    with pytest.raises(ValueError, match="continue_after_click"):
        CascadeModel(world, continue_after_click=1.5)
    with pytest.raises(TypeError):
        ClickModel.named("cascade", world, eta=1.0)  # a cascade has no position bias to set


def test_a_cascade_clicks_the_first_attractive_item_and_nothing_below_it() -> None:
    world = default_world()
    cascade, going_on = CascadeModel(world), CascadeModel(world, continue_after_click=1.0)
    attraction = [0.5] * 5
    # Forced draws: ranks 2 and 4 attract (draw below 0.5); after a click, the second row
    # decides whether the user goes on (a draw below continue_after_click).
    draws = np.array([[0.9, 0.6, 0.1, 0.7, 0.2], [0.0, 0.0, 0.3, 0.0, 0.3]])

    assert cascade.scan(attraction, draws) == [2]
    assert going_on.scan(attraction, draws) == [2, 4]
    assert CascadeModel(world, continue_after_click=0.5).scan(attraction, draws) == [2, 4]
    assert CascadeModel(world, continue_after_click=0.2).scan(attraction, draws) == [2]
    # Nothing attracts: the user reads to the end and clicks nothing; everything does: rank 0.
    assert cascade.scan(attraction, np.ones((2, 5))) == []
    assert cascade.scan(attraction, np.zeros((2, 5))) == [0]

    # With the world's draws: one click at most, the first of those a user examining every
    # item (the position-based model without position bias, the same draws) makes.
    flat = PositionBasedModel(world, eta=0.0)
    clicked = 0
    for user in USERS:
        items = [str(item["id"]) for item in world.ranking("asc", user, 10)]
        every = flat.clicks(user, items)
        assert cascade.clicks(user, items) == every[:1]
        assert going_on.clicks(user, items) == every
        clicked += bool(every)
    assert 0.5 * len(USERS) < clicked < len(USERS), "most users click something, not all"


def test_a_cascade_clicks_fall_with_position_faster_than_examination_alone() -> None:
    """Below the first item, an item is only reached past those above: its clicks fall further."""
    world = default_world()
    cascade, flat = CascadeModel(world), PositionBasedModel(world, eta=0.0)
    per_rank = {"cascade": np.zeros(10), "flat": np.zeros(10), "drawn": np.zeros(10)}
    for user in USERS:
        items = [str(item["id"]) for item in world.ranking("asc", user, 10)]
        per_rank["cascade"] += cascade.click_probabilities(user, items)
        per_rank["flat"] += flat.click_probabilities(user, items)
        for item in cascade.clicks(user, items):
            per_rank["drawn"][items.index(item)] += 1
    relative = {name: clicks / clicks[0] for name, clicks in per_rank.items()}

    # Rank 1 is examined by both; below it the cascade's share falls rank after rank, and by
    # rank 10 to a twentieth of rank 1's (examination alone: about half).
    assert per_rank["cascade"][0] == pytest.approx(per_rank["flat"][0])
    assert all(relative["cascade"][1:] < relative["flat"][1:])
    assert relative["cascade"][-1] < 0.1 < 0.3 < relative["flat"][-1]
    # The clicks drawn agree with the probabilities: the mean number per impression...
    assert per_rank["drawn"].sum() / len(USERS) == pytest.approx(
        per_rank["cascade"].sum() / len(USERS), abs=0.05
    )
    # ...and most land in the top three, few in the bottom three.
    assert per_rank["drawn"][:3].sum() > 5 * per_rank["drawn"][-3:].sum()

    # An item's clicks depend on the items above it: under nine attractive ones it is rarely
    # reached, under nine unattractive ones nearly always. The position-based model cannot tell.
    user, pbm = "click-7", PositionBasedModel(world)
    best = world.truth(user)[0]
    liked = [item for item in world.oracle(user, 11) if item != best][:9]
    disliked = [f"i{n}" for n in range(40) if f"i{n}" != best]
    disliked = sorted(disliked, key=lambda item: cascade.attraction(user, [item])[0])[:9]
    under_liked = cascade.click_probabilities(user, [*liked, best])[-1]
    under_disliked = cascade.click_probabilities(user, [*disliked, best])[-1]
    assert under_liked < 0.1 * under_disliked
    assert under_disliked == pytest.approx(cascade.attraction(user, [best])[0], rel=0.01)
    assert pbm.click_probabilities(user, [*liked, best])[-1] == pytest.approx(
        pbm.click_probabilities(user, [*disliked, best])[-1]
    )


def test_a_cascade_clicks_the_same_for_the_same_seed_user_list_and_occasion() -> None:
    world = default_world()
    cascade = CascadeModel(world, continue_after_click=0.5)
    again = CascadeModel(World(world.seed), continue_after_click=0.5)
    items = [str(item["id"]) for item in world.ranking("psn", "click-1", 10)]

    clicked = [cascade.clicks(user, items, occasion=3) for user in USERS[:50]]

    assert [again.clicks(user, items, occasion=3) for user in USERS[:50]] == clicked
    assert any(len(clicks) > 1 for clicks in clicked), "going on after a click, sometimes"
    # The clicks drawn follow the probabilities, going on after a click included.
    drawn, expected = np.zeros(10), np.zeros(10)
    for user in USERS:
        shown = [str(item["id"]) for item in world.ranking("asc", user, 10)]
        expected += 5 * np.array(cascade.click_probabilities(user, shown))
        for occasion in range(5):
            for item in cascade.clicks(user, shown, occasion=occasion):
                drawn[shown.index(item)] += 1
    assert drawn.sum() == pytest.approx(expected.sum(), rel=0.1)
    assert drawn[:3].sum() == pytest.approx(expected[:3].sum(), rel=0.1)
    assert drawn[3:].sum() == pytest.approx(expected[3:].sum(), rel=0.1)
    assert [cascade.clicks(user, items, occasion=4) for user in USERS[:50]] != clicked
    other = CascadeModel(World(world.seed + 1), continue_after_click=0.5)
    assert [other.clicks(user, items, occasion=3) for user in USERS[:50]] != clicked
    # With activity, an engaged impression scans as without it; the rest click nothing.
    active = CascadeModel(world, continue_after_click=0.5, activity=(0.5, 4.5))
    for user in USERS[:40]:
        for occasion in range(10):
            shown = active.clicks(user, items, occasion=occasion)
            assert shown in ([], cascade.clicks(user, items, occasion=occasion))
    assert active.click_probabilities(USERS[0], items) == pytest.approx(
        [active.engagement(USERS[0]) * p for p in cascade.click_probabilities(USERS[0], items)]
    )

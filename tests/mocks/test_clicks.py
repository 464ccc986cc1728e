"""The click model: deterministic, position-biased, and drawn to what the truth rewards."""

from __future__ import annotations

import statistics

import pytest

from benchmarks.quality.ranking_metrics import ndcg_at
from mock_recommenders.clicks import ClickModel
from mock_recommenders.world import KINDS, World, default_world

USERS = [f"click-{n}" for n in range(300)]


@pytest.fixture(scope="module")
def model() -> ClickModel:
    return ClickModel(default_world())


def test_the_same_user_list_and_occasion_click_the_same_in_a_new_world(model: ClickModel) -> None:
    again = ClickModel(World(model.world.seed))
    shown = model.world.ranking("asc", "click-1", 10)
    items = [str(item["id"]) for item in shown]

    clicked = [model.clicks(user, items) for user in USERS[:50]]

    assert [again.clicks(user, items) for user in USERS[:50]] == clicked
    assert any(clicked), "somebody clicks something"
    # Another occasion (a second showing) draws afresh, and so does another world.
    assert [model.clicks(u, items, occasion=2) for u in USERS[:50]] != clicked
    other = ClickModel(World(model.world.seed + 1))
    assert [other.clicks(u, items) for u in USERS[:50]] != clicked


def test_clicks_are_items_of_the_list_in_its_order(model: ClickModel) -> None:
    for user in USERS[:50]:
        items = [str(item["id"]) for item in model.world.ranking("psn", user, 10)]
        clicked = model.clicks(user, items)
        assert clicked == [item for item in items if item in clicked]


def test_an_item_is_clicked_less_the_lower_it_is_shown(model: ClickModel) -> None:
    user = "click-7"
    best = model.world.truth(user)[0]
    filler = [f"i{n}" for n in range(20) if f"i{n}" != best][:9]
    top = model.click_probabilities(user, [best, *filler])[0]
    bottom = model.click_probabilities(user, [*filler, best])[-1]

    assert top > 0
    assert bottom == pytest.approx(top / 10)  # 1/rank, eta 1
    flat = ClickModel(model.world, eta=0.0)
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


def test_truth_items_are_likelier_clicks_than_other_items_shown(model: ClickModel) -> None:
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


def test_better_lists_by_ndcg_draw_more_clicks(model: ClickModel) -> None:
    """Expected clicks per recommender follow mean NDCG@10 against the truth; the oracle tops both.

    Expected rather than drawn clicks: over 300 users, draws put `sml` and `psn` level.
    """
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
        ClickModel(world, eta=-1.0)
    with pytest.raises(ValueError, match="ranks start at 1"):
        ClickModel(world).examination(0)
    with pytest.raises(ValueError, match="activity"):
        ClickModel(world, activity=(0.0, 1.0))


def test_with_activity_users_differ_in_how_often_they_click_at_all(model: ClickModel) -> None:
    active = ClickModel(model.world, activity=(0.5, 4.5))
    items = [f"i{n}" for n in range(10)]
    engagement = [active.engagement(user) for user in USERS]

    # Beta(0.5, 4.5): mean 0.1, most users below it, a few far above; the same in a new model.
    assert statistics.mean(engagement) == pytest.approx(0.1, abs=0.02)
    assert statistics.median(engagement) < 0.07 and max(engagement) > 0.4
    assert (
        ClickModel(World(model.world.seed), activity=(0.5, 4.5)).engagement(USERS[0])
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

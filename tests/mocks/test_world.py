"""The mocks' synthetic world: seeded, deterministic, and each recommender ranking something real.

Quality is measured by `python -m benchmarks quality`; these tests check behaviour: what each
recommender may and may not rank, what the truth is, and that every recommender carries real
signal (well above chance, below the oracle) in its own way.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from benchmarks.quality.ranking_metrics import ndcg_at
from mock_recommenders.world import CATALOGUE_SIZE, KINDS, MAX_RESULTS, World, default_world

NAMES = tuple(KINDS)


@pytest.fixture(scope="module")
def world() -> World:
    return default_world()


def test_the_same_seed_builds_the_same_world_and_another_seed_another(world: World) -> None:
    again = World(world.seed)
    other = World(world.seed + 1)

    for name in NAMES:
        assert again.ranking(name, "w1", 20) == world.ranking(name, "w1", 20)
        assert other.ranking(name, "w1", 20) != world.ranking(name, "w1", 20)
    assert again.truth("w1") == world.truth("w1")
    assert other.truth("w1") != world.truth("w1")


def test_a_users_truth_is_held_out_from_their_history_and_ranked_by_utility(
    world: World,
) -> None:
    for user_id in ("w1", "w2", None):
        user = world.user(user_id)
        truth, history = world.truth(user_id), world.history(user_id)
        assert len(truth) == 10 and len(history) == 20
        assert not set(truth) & set(history)
        utility = world.utility(user)
        assert list(utility[user.truth]) == sorted(utility[user.truth], reverse=True)
    assert world.truth("w1") != world.truth("w2")


def test_no_recommender_recommends_what_the_user_already_has(world: World) -> None:
    for name in (*NAMES, "r7"):
        for user_id in ("w1", "w2", "w3"):
            ranked = {item["id"] for item in world.ranking(name, user_id, MAX_RESULTS)}
            assert len(ranked) == MAX_RESULTS
            assert not ranked & set(world.history(user_id))


def test_trending_is_the_same_for_everyone_in_a_region_and_the_others_are_personal(
    world: World,
) -> None:
    users = [f"w{n}" for n in range(60)]
    by_region: dict[int, list[str]] = {}
    for user_id in users:
        by_region.setdefault(world.user(user_id).region, []).append(user_id)
    first, second = next(group for group in by_region.values() if len(group) >= 2)[:2]
    seen = set(world.history(first)) | set(world.history(second))

    def unseen(name: str, user_id: str) -> list[str]:
        return [i["id"] for i in world.ranking(name, user_id, 60) if i["id"] not in seen][:20]

    assert unseen("trd", first) == unseen("trd", second)
    for name in ("sml", "asc", "psn"):
        assert unseen(name, first) != unseen(name, second)


def test_every_recommender_beats_chance_and_none_reaches_the_oracle(world: World) -> None:
    users = [f"signal-{n}" for n in range(300)]
    rng = np.random.default_rng(0)

    def mean_ndcg(rank: Callable[[str], list[str]]) -> float:
        return float(np.mean([ndcg_at(rank(u), world.truth(u)) for u in users]))

    def chance(user_id: str) -> list[str]:
        return [f"i{i}" for i in rng.choice(CATALOGUE_SIZE, size=10, replace=False)]

    random_ndcg = mean_ndcg(chance)
    oracle_ndcg = mean_ndcg(lambda u: world.oracle(u, 10))
    for name in NAMES:

        def ranking(u: str, n: str = name) -> list[str]:
            return [str(i["id"]) for i in world.ranking(n, u, 10)]

        quality = mean_ndcg(ranking)
        assert 4 * random_ndcg < quality < oracle_ndcg, name


def test_sizes_outside_the_served_range_are_refused(world: World) -> None:
    for size in (0, MAX_RESULTS + 1):
        with pytest.raises(ValueError, match="size must be from 1 to 100"):
            world.ranking("sml", "w1", size)

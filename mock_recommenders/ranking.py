"""What a mock recommender ranks: its view of the synthetic world, per (recommender, user)."""

from __future__ import annotations

from typing import Any

from mock_recommenders.world import CATALOGUE_SIZE, DEFAULT_SEED, MAX_RESULTS, default_world

__all__ = ["CATALOGUE_SIZE", "MAX_RESULTS", "rank_items"]


def rank_items(
    name: str, user_id: str | None, result_size: int, seed: int = DEFAULT_SEED
) -> list[dict[str, Any]]:
    """The top `result_size` items recommender `name` gives `user_id`, best first.

    Deterministic per (world `seed`, recommender, user), the same in every process, and
    prefix-stable: the top 3 are the first 3 of the top 10. Scores are in [0, 1], rounded to
    4 decimals, and never increase down the list; the user's history is never recommended.
    See `mock_recommenders.world` for what each recommender is.
    """
    return default_world(seed).ranking(name, user_id, result_size)

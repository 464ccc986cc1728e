"""What a mock recommender ranks: a deterministic list per (recommender, user)."""

from __future__ import annotations

import hashlib
import random
from typing import Any

__all__ = ["CATALOGUE_SIZE", "rank_items"]

CATALOGUE_SIZE = 1000


def _rng(name: str, user_id: str | None) -> random.Random:
    # hashlib, not hash(): Python salts hash() per process, and the lists must agree across
    # processes (gunicorn workers, test runners).
    key = f"{name}:{user_id if user_id is not None else '<anonymous>'}".encode()
    return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big"))


def rank_items(name: str, user_id: str | None, result_size: int) -> list[dict[str, Any]]:
    """The top `result_size` items recommender `name` gives `user_id`, best first.

    Deterministic, different per recommender, and prefix-stable: the top 3 are the first 3
    of the top 10. Scores are strictly descending, in (0, 1].
    """
    rng = _rng(name, user_id)
    top = 0.5 + 0.5 * rng.random()
    decay = 0.97 + 0.02 * rng.random()
    seen: set[int] = set()
    items: list[dict[str, Any]] = []
    while len(items) < result_size:
        # Drawing one item at a time (not random.sample, whose method depends on the size
        # asked for) keeps the list prefix-stable.
        item = rng.randrange(CATALOGUE_SIZE)
        if item in seen:
            continue
        seen.add(item)
        items.append({"id": f"i{item}", "score": round(top * decay ** len(items), 4)})
    return items

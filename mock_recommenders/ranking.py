"""What a mock recommender ranks: a deterministic list per (recommender, user)."""

from __future__ import annotations

import hashlib
import random
from typing import Any

__all__ = ["CATALOGUE_SIZE", "rank_items"]

CATALOGUE_SIZE = 1000
# Built once for the whole catalogue, not per user: memory stays flat, and each call skips
# 100 string formats.
_IDS = tuple(f"i{n}" for n in range(CATALOGUE_SIZE))
# Enough random bits to cover the catalogue; draws at or above its size are rejected.
_BITS = (CATALOGUE_SIZE - 1).bit_length()


def _rng(name: str, user_id: str | None) -> random.Random:
    # hashlib, not hash(): Python salts hash() per process, and the lists must agree across
    # processes (gunicorn workers, test runners).
    key = f"{name}:{user_id if user_id is not None else '<anonymous>'}".encode()
    return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big"))


def rank_items(name: str, user_id: str | None, result_size: int) -> list[dict[str, Any]]:
    """The top `result_size` items recommender `name` gives `user_id`, best first.

    Deterministic, different per recommender, and prefix-stable: the top 3 are the first 3
    of the top 10. Scores are strictly descending, in (0, 1], rounded to 4 decimals.
    """
    rng = _rng(name, user_id)
    top = 0.5 + 0.5 * rng.random()
    # At least 0.97, so even the 100th score (>= 0.02) stays well above 0; at most 0.99, so
    # neighbours differ by >= 0.0007 and still differ after rounding to 4 decimals.
    decay = 0.97 + 0.02 * rng.random()
    draw = rng.getrandbits
    seen: set[int] = set()
    items: list[dict[str, Any]] = []
    while len(items) < result_size:
        # One item at a time (not random.sample, whose method changes with the size asked
        # for) keeps the list prefix-stable; getrandbits is stable across Python versions.
        item = draw(_BITS)
        if item >= CATALOGUE_SIZE or item in seen:
            continue
        seen.add(item)
        items.append({"id": _IDS[item], "score": round(top * decay ** len(items), 4)})
    return items

"""Fused answers drawn at random, as the gateway's feedback code receives them.

The storage benchmark and the impression-recording benchmark both feed the feedback code
answers shaped like `Fuser.fuse`'s: ten items, each from one to four of the mocks' recommenders
with their ranks and scores. One item is drawn here; each benchmark says how its ids are made.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

__all__ = ["RECOMMENDERS", "fused_item"]

RECOMMENDERS = ("sml", "asc", "trd", "psn")


def fused_item(draw: random.Random, item_id: Callable[[random.Random], str]) -> dict[str, Any]:
    """One item of a fused answer: its sources (1-4 recommenders, each with a rank and a
    score), its id from `item_id` (drawn after the sources), then its score."""
    names = draw.sample(RECOMMENDERS, draw.choice([1, 1, 2, 2, 3, 4]))
    sources = [
        {"name": name, "rank": draw.randrange(1, 40), "score": draw.random()} for name in names
    ]
    return {"id": item_id(draw), "score": draw.random(), "sources": sources}

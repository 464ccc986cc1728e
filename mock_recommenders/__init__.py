"""Local mock recommenders for development, tests and benchmarks.

``python -m mock_recommenders`` serves `sml`, `asc`, `trd` and `psn` on ports 5001-5004;
`MockFleet` runs them inside a test process on free ports, `MockFleetProcess` in a child
process of their own (for load, where they must not share the caller's GIL). What they rank is
a seeded synthetic world (`mock_recommenders.world`) with a held-out truth per user.
"""

from __future__ import annotations

from mock_recommenders.behaviour import Behaviour
from mock_recommenders.fleet import MockFleet
from mock_recommenders.process import MockFleetProcess
from mock_recommenders.ranking import rank_items
from mock_recommenders.server import DEFAULT_NAMES, Recommender
from mock_recommenders.world import World, default_world

__all__ = [
    "DEFAULT_NAMES",
    "Behaviour",
    "MockFleet",
    "MockFleetProcess",
    "Recommender",
    "World",
    "default_world",
    "rank_items",
]

"""Local mock recommenders for development, tests and benchmarks.

``python -m mock_recommenders`` serves `sml`, `asc`, `trd` and `psn` on ports 5001-5004;
`MockFleet` runs them inside a test process on free ports.
"""

from __future__ import annotations

from mock_recommenders.behaviour import Behaviour
from mock_recommenders.fleet import MockFleet
from mock_recommenders.ranking import rank_items
from mock_recommenders.server import DEFAULT_NAMES, Recommender

__all__ = ["DEFAULT_NAMES", "Behaviour", "MockFleet", "Recommender", "rank_items"]

"""The feedback store: impressions shown, events on them, the counters, and learnt weights.

`FeedbackStore` is the interface; `SQLiteStore` (one host, several worker processes sharing a
file) and `RedisStore` (several instances) implement it with identical semantics, and
`open_store` picks one from a URL:

    sqlite:///relative/path.db    sqlite:////absolute/path.db    redis://host:port/N

Every method blocks: callers run them off the event loop (a writer thread). Events on one
impression may reach any instance; the store decides each one atomically:

- ``unknown_request``: no impression with that request id, or it has expired;
- ``item_not_shown``: the impression exists but did not show that item;
- ``duplicate``: the event id was accepted before for that request;
- ``accepted``: counted. A click or purchase credits recommenders (`credit_for`), moves the
  impression's per-team clicks and the pairwise counters (`pairwise_delta`), and the arm's
  clicks; a dismiss is counted by kind and credits nobody.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol
from urllib.parse import urlsplit

from gateway.config.store_urls import check_store_url
from gateway.feedback.impressions import FeedbackEvent, StorableImpression
from gateway.feedback.records import EventResult, FeedbackStats, LearnedWeights
from gateway.feedback.sqlite_store import SQLiteStore

# `gateway.feedback.redis_store` (and the redis package, which imports OpenTelemetry when it is
# installed) is imported only when a Redis store is opened: a gateway without one, or with
# tracing off, loads neither.
__all__ = ["FeedbackStore", "SQLiteStore", "open_store"]


class FeedbackStore(Protocol):
    """What the gateway needs of a feedback store; see the module docstring for the rules."""

    def save_impressions(self, impressions: Sequence[StorableImpression]) -> None:
        """Store a batch atomically, counting impressions per recommender and per arm."""
        ...

    def record(self, events: Sequence[FeedbackEvent]) -> list[EventResult]:
        """Judge and count a batch of events atomically, in order; one result per event."""
        ...

    def stats(self) -> FeedbackStats:
        """Every counter, read at one moment."""
        ...

    def expire(self) -> int:
        """Delete the impressions past the retention; how many were deleted."""
        ...

    def load_weights(self) -> LearnedWeights | None:
        """The learnt weights saved last, or None before any."""
        ...

    def save_weights(self, weights: LearnedWeights) -> bool:
        """Keep `weights` if their version is newer than the stored one; whether they were."""
        ...

    def close(self) -> None:
        """Release connections; the store refuses use afterwards."""
        ...


def open_store(
    url: str,
    retention_s: float,
    clock: Callable[[], float] = time.time,
    timeout_s: float = 5.0,
) -> FeedbackStore:
    """The store a URL names: ``sqlite:///PATH`` or ``redis://host:port/N``.

    ValueError, naming what is wrong, for any other URL (`check_store_url`). `clock` (unix
    seconds) decides which impressions have outlived `retention_s`; tests pass a fake one.
    `timeout_s` bounds each operation (SQLite's busy timeout, Redis' socket timeout). Nothing
    is connected yet: the store connects on first use.
    """
    if check_store_url(url) == "sqlite":
        return SQLiteStore(urlsplit(url).path[1:], retention_s, clock, busy_timeout_s=timeout_s)
    from gateway.feedback.redis_store import RedisStore

    return RedisStore(url, retention_s, clock, timeout_s=timeout_s)

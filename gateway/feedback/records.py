"""The values a feedback store hands back: event results, counters, learnt weights, its error.

A leaf module: the stores (`gateway.store_sqlite`, `gateway.store_redis`), the learner and
later the HTTP layer import these; they import nothing of the gateway but the pair counts.

Errors::

    FeedbackStoreError        the store could not be read or written (database, network)
    └── FeedbackStoreBusy     too many events wait for the store in this worker (`EventJudge`)
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.feedback.attribution import PairCounts

__all__ = [
    "ArmCounts",
    "EventResult",
    "FeedbackStats",
    "FeedbackStoreBusy",
    "FeedbackStoreError",
    "LearnedWeights",
    "RecommenderCounts",
    "store_errors",
]


class FeedbackStoreError(Exception):
    """The feedback store failed (its database or server); the cause is chained."""


class FeedbackStoreBusy(FeedbackStoreError):
    """Too many events already wait to be judged in this worker: the store is not keeping up."""


@contextlib.contextmanager
def store_errors(errors: type[Exception], store: str) -> Iterator[None]:
    """A store's own `errors` as the one `FeedbackStoreError`, naming the `store`, cause chained."""
    try:
        yield
    except errors as exc:
        raise FeedbackStoreError(f"feedback store ({store}): {exc}") from exc


class EventResult(StrEnum):
    """What became of one feedback event; the HTTP layer maps these to status codes."""

    ACCEPTED = "accepted"
    # The event_id was seen before for this request: accepted once, not counted again.
    DUPLICATE = "duplicate"
    # No such impression, or it has expired (404).
    UNKNOWN_REQUEST = "unknown_request"
    # The impression exists but that answer did not show the item (422).
    ITEM_NOT_SHOWN = "item_not_shown"


@dataclass(frozen=True, slots=True)
class RecommenderCounts:
    """One recommender: impressions it was in, positive events on its items, credit earned."""

    impressions: int = 0
    clicks: int = 0
    credit: float = 0.0


@dataclass(frozen=True, slots=True)
class ArmCounts:
    """One experiment arm: impressions, impressions with a positive event, positive events."""

    impressions: int = 0
    clicked_impressions: int = 0
    clicks: int = 0


@dataclass(frozen=True, slots=True)
class FeedbackStats:
    """Every counter of a store, read at one moment.

    `pairwise` maps `(a, b)` with a < b to a's wins, losses and ties against b; `events`
    counts accepted events by kind; `impressions_stored` the impressions not yet expired.
    """

    recommenders: Mapping[str, RecommenderCounts] = field(default_factory=dict)
    pairwise: Mapping[tuple[str, str], PairCounts] = field(default_factory=dict)
    arms: Mapping[str, ArmCounts] = field(default_factory=dict)
    events: Mapping[str, int] = field(default_factory=dict)
    impressions_stored: int = 0

    def credit_share(self, name: str) -> float:
        """The recommender's share of all credit given (0 when nobody has any yet)."""
        total = sum(counts.credit for counts in self.recommenders.values())
        counts = self.recommenders.get(name)
        return counts.credit / total if counts is not None and total > 0 else 0.0

    def comparisons(self, name: str) -> PairCounts:
        """Name's wins, losses and ties against every other recommender, summed."""
        wins = losses = ties = 0
        for (a, b), pair in self.pairwise.items():
            if name == a:
                wins, losses = wins + pair.wins, losses + pair.losses
            elif name == b:
                wins, losses = wins + pair.losses, losses + pair.wins
            else:
                continue
            ties += pair.ties
        return PairCounts(wins, losses, ties)


@dataclass(frozen=True, slots=True)
class LearnedWeights:
    """RRF weights learnt from feedback, the evidence behind them, when, and which version.

    Stores keep the highest version only, so instances racing to save agree on one answer.
    """

    weights: Mapping[str, float]
    evidence: int
    updated_at: float
    version: int

    def to_json(self) -> str:
        """The compact JSON the stores keep."""
        body = {
            "weights": dict(sorted(self.weights.items())),
            "evidence": self.evidence,
            "updated_at": self.updated_at,
            "version": self.version,
        }
        return json.dumps(body, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> LearnedWeights:
        """The weights `to_json` wrote; ValueError for anything else."""
        body = json.loads(text)
        try:
            weights = {str(k): float(v) for k, v in body["weights"].items()}
            learned = cls(
                weights, int(body["evidence"]), float(body["updated_at"]), int(body["version"])
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not learnt weights: {exc}") from exc
        if not all(math.isfinite(w) for w in weights.values()):
            raise ValueError("learnt weights must be finite")
        return learned

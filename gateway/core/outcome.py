"""The values a request's fan-out deals in: its `Deadline`, and each call's `Outcome`.

A leaf module: it imports nothing of the gateway, so every other module (the fan-out that makes
outcomes, the fusion and the metrics that read them, the errors that name their statuses) can
depend on it without depending on one another.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["MIN_CALL_BUDGET_S", "Deadline", "Outcome", "SourceStatus"]

# What came of one recommender's call, as `sources` reports it.
SourceStatus = Literal["ok", "timeout", "error", "circuit_open", "shed"]

# Below this, a call could not even connect: it is not started.
MIN_CALL_BUDGET_S = 0.001


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one recommender's call came to."""

    name: str
    status: SourceStatus
    latency_ms: float
    prediction: Any = None
    error: str | None = None
    attempts: int = 0
    # A timeout while the worker itself was overloaded: not the recommender's fault.
    overload: bool = False

    @property
    def ok(self) -> bool:
        """Whether the recommender answered usable JSON."""
        return self.status == "ok"


@dataclass(frozen=True, slots=True)
class Deadline:
    """The `time.perf_counter()` instant a request must be answered by, and its length.

    `queued_s`: how much of it the request spent waiting for admission, before any call: a
    call whose budget that wait cut short did not get the time it was due.
    """

    at: float
    ms: float
    queued_s: float = 0.0

    @classmethod
    def after(cls, ms: float, start: float | None = None, queued_s: float = 0.0) -> Deadline:
        """The deadline `ms` milliseconds after `start` (default: now)."""
        return cls((time.perf_counter() if start is None else start) + ms / 1000, ms, queued_s)

    def remaining_s(self) -> float:
        """Seconds left; negative once passed."""
        return self.at - time.perf_counter()

    def missed(self, name: str, latency_ms: float, attempts: int = 1) -> Outcome:
        """The outcome of a call that the deadline cut short."""
        reason = f"no answer within the {self.ms:.0f} ms deadline"
        return Outcome(name, "timeout", latency_ms, error=reason, attempts=attempts)

    @staticmethod
    def passed(name: str) -> Outcome:
        """The outcome of a call that the deadline left no time to begin."""
        return Outcome(name, "timeout", 0.0, error="deadline already passed")

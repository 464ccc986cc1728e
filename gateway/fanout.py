"""Fan-out: one request to every recommender at once, each call bounded by the deadline.

A fan-out never raises for a recommender's failure: every configured recommender yields an
`Outcome`, in config order, whatever happened to its call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.clients import RecommenderClient
from gateway.errors import RecommenderError, RecommenderTimeout, SourceStatus

__all__ = ["Deadline", "Outcome", "fan_out"]

log = logging.getLogger("gateway")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one recommender's call came to."""

    name: str
    status: SourceStatus
    latency_ms: float
    prediction: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the recommender answered usable JSON."""
        return self.status == "ok"


@dataclass(frozen=True, slots=True)
class Deadline:
    """The `time.perf_counter()` instant a request must be answered by, and its length."""

    at: float
    ms: float

    @classmethod
    def after(cls, ms: float, start: float | None = None) -> Deadline:
        """The deadline `ms` milliseconds after `start` (default: now)."""
        return cls((time.perf_counter() if start is None else start) + ms / 1000, ms)


async def _call(
    client: RecommenderClient, body: bytes, headers: Mapping[str, str], deadline: Deadline
) -> Outcome:
    started = time.perf_counter()
    remaining = deadline.at - started
    bound_by_deadline = remaining < client.timeout_s

    def elapsed_ms() -> float:
        return round((time.perf_counter() - started) * 1000, 1)

    if remaining <= 0:
        return Outcome(client.name, "timeout", 0.0, error="deadline already passed")
    try:
        prediction = await client.recommend(body, headers, min(client.timeout_s, remaining))
    except RecommenderTimeout as exc:
        # Cut by what is left of the request's deadline, not by its own timeout: say so.
        reason = (
            f"no answer within the {deadline.ms:.0f} ms deadline"
            if bound_by_deadline
            else exc.reason
        )
        return Outcome(client.name, exc.status, elapsed_ms(), error=reason)
    except RecommenderError as exc:
        return Outcome(client.name, exc.status, elapsed_ms(), error=exc.reason)
    except Exception:
        # A bug in the gateway must not turn one recommender's call into a gateway 500.
        log.exception("unexpected error calling recommender %s", client.name)
        return Outcome(client.name, "error", elapsed_ms(), error="gateway error during the call")
    return Outcome(client.name, "ok", elapsed_ms(), prediction=prediction)


async def fan_out(
    clients: Sequence[RecommenderClient],
    body: bytes,
    headers: Mapping[str, str],
    deadline: Deadline,
) -> list[Outcome]:
    """Call every recommender concurrently; return their outcomes in the order of `clients`.

    No call outlives `deadline`.
    """
    return list(await asyncio.gather(*(_call(c, body, headers, deadline) for c in clients)))

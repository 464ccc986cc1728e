"""Recommender clients: over the worker's connection pool (`gateway.upstream`), or blocking.

This module is the one boundary where the HTTP clients' exceptions become the gateway's
`RecommenderError`s (see `gateway.errors`), each carrying the recommender's name and a short
reason a frontend can read. Both clients read answers within the same `AnswerLimits`: bytes
(as sent and decompressed, enforced while reading), items, and JSON nesting and numbers
(`gateway.jsonlimits`).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gateway.blocking import BlockingPool
from gateway.errors import (
    BadRecommenderResponse,
    ClientClosedError,
    GatewayError,
    RecommenderTimeout,
    RecommenderUnavailable,
)
from gateway.jsonlimits import JsonRefused, loads
from gateway.resilience import parse_retry_after
from gateway.upstream import (
    MAX_ANSWER_BYTES,
    ConnectFailed,
    ConnectionPool,
    Disconnected,
    PoolClosed,
    TooLarge,
    Truncated,
    UpstreamError,
)

__all__ = ["AnswerLimits", "BlockingRecommenderClient", "RecommenderClient", "Replicas"]


@dataclass(frozen=True, slots=True)
class AnswerLimits:
    """What the gateway reads of one recommender's answer (its settings, by default)."""

    max_bytes: int = MAX_ANSWER_BYTES
    max_items: int = 1000
    max_depth: int = 64


DEFAULT_LIMITS = AnswerLimits()


# Statuses that say "try again": the recommender (or a proxy before it) is briefly unable.
RETRYABLE_STATUSES = frozenset({502, 503, 504})


def _check_answer(
    name: str, status: int, payload: bytes, retry_after: str | None, limits: AnswerLimits
) -> Any:
    """The parsed JSON of a recommender's answer, or the `RecommenderError` it amounts to."""
    if status >= 300:
        raise RecommenderUnavailable(
            name,
            f"answered HTTP {status}",
            retryable=status in RETRYABLE_STATUSES,
            retry_after_s=parse_retry_after(retry_after),
        )
    try:
        prediction = loads(payload, limits.max_depth)
    except JsonRefused as exc:
        raise BadRecommenderResponse(name, f"answered JSON beyond the limits: {exc}") from exc
    except ValueError as exc:
        raise BadRecommenderResponse(name, "answered a body that is not JSON") from exc
    if type(prediction) is dict:
        items = prediction.get("items")
        if type(items) is list and len(items) > limits.max_items:
            raise BadRecommenderResponse(
                name, f"answered {len(items)} items, above the limit of {limits.max_items}"
            )
    return prediction


def _failure(name: str, idempotent: bool, error: UpstreamError) -> GatewayError:
    """The `RecommenderError` an HTTP client's failure amounts to, with its reason."""
    if isinstance(error, PoolClosed):
        return ClientClosedError(f"the connection pool of recommender {name} is closed")
    if isinstance(error, ConnectFailed):
        # The request never left: always safe to try again.
        return RecommenderUnavailable(name, str(error), retryable=True)
    if isinstance(error, Disconnected):
        reason = "connection closed by the recommender before it answered"
        return RecommenderUnavailable(name, reason, retryable=idempotent)
    if isinstance(error, Truncated):
        return RecommenderUnavailable(name, "answer cut off before its end", retryable=idempotent)
    if isinstance(error, TooLarge):
        return BadRecommenderResponse(name, str(error))
    return RecommenderUnavailable(name, f"answered something unreadable: {error}")


class _Endpoint:
    """One recommender replica: its name, URL, time budget, and whether calls may repeat."""

    def __init__(self, name: str, url: str, timeout_s: float, idempotent: bool = True):
        self.name = name
        self.url = url
        self.timeout_s = timeout_s
        # Whether a call that may have reached the recommender can be repeated safely.
        self.idempotent = idempotent

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.url!r})"


class RecommenderClient(_Endpoint):
    """Calls one recommender's endpoint over the worker's connection pool."""

    def __init__(
        self,
        name: str,
        url: str,
        pool: ConnectionPool,
        timeout_s: float,
        idempotent: bool = True,
    ):
        super().__init__(name, url, timeout_s, idempotent)
        self._pool = pool

    async def recommend(
        self,
        body: bytes,
        headers: Mapping[str, str],
        timeout_s: float | None = None,
        limits: AnswerLimits = DEFAULT_LIMITS,
        answered: Callable[[int], None] | None = None,
    ) -> Any:
        """POST `body` (JSON) to the recommender and return its parsed JSON answer.

        `timeout_s` bounds the whole call (waiting for a pooled connection, connecting,
        sending, reading) and defaults to the client's own budget; the answer is read within
        `limits`; `answered`, if given, is told the answer's HTTP status (for its trace span).

        Raises `RecommenderTimeout`, `RecommenderUnavailable` or `BadRecommenderResponse`.
        """
        if self._pool.closed:
            raise ClientClosedError(f"the connection pool of recommender {self.name} is closed")
        budget = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(budget):
                answer = await self._pool.post(self.url, body, headers, limits.max_bytes)
        except TimeoutError as exc:
            raise RecommenderTimeout(self.name, f"no answer within {budget * 1000:.0f} ms") from exc
        except UpstreamError as exc:
            raise _failure(self.name, self.idempotent, exc) from exc
        if answered is not None:
            answered(answer.status)
        retry_after = answer.header(b"retry-after")
        return _check_answer(self.name, answer.status, answer.body, retry_after, limits)


class BlockingRecommenderClient(_Endpoint):
    """Calls one recommender from a thread, over a `gateway.blocking.BlockingPool`.

    Used by the thread-pool fan-out; the same answers, limits, errors and reasons as
    `RecommenderClient`, and the call's budget bounds it all: no thread waits past it.
    """

    def __init__(
        self,
        name: str,
        url: str,
        pool: BlockingPool,
        timeout_s: float,
        idempotent: bool = True,
    ):
        super().__init__(name, url, timeout_s, idempotent)
        self._pool = pool
        self._closed = False

    def close(self) -> None:
        """Refuse further calls (the pool is closed by its owner)."""
        self._closed = True

    def recommend(
        self,
        body: bytes,
        headers: Mapping[str, str],
        timeout_s: float | None = None,
        limits: AnswerLimits = DEFAULT_LIMITS,
        answered: Callable[[int], None] | None = None,
    ) -> Any:
        """POST `body` and return the parsed JSON answer; raise a `RecommenderError`.

        `timeout_s` bounds the whole call, as for `RecommenderClient.recommend`.
        """
        if self._closed:
            raise ClientClosedError(f"the connection pool of recommender {self.name} is closed")
        budget = self.timeout_s if timeout_s is None else timeout_s
        try:
            answer = self._pool.post(self.url, body, headers, budget, limits.max_bytes)
        except TimeoutError as exc:
            raise RecommenderTimeout(self.name, f"no answer within {budget * 1000:.0f} ms") from exc
        except UpstreamError as exc:
            raise _failure(self.name, self.idempotent, exc) from exc
        if answered is not None:
            answered(answer.status)
        retry_after = answer.header(b"retry-after")
        return _check_answer(self.name, answer.status, answer.body, retry_after, limits)


Client = TypeVar("Client", RecommenderClient, BlockingRecommenderClient)


class Replicas(Generic[Client]):
    """One recommender's clients, one per replica URL, taken in turn."""

    def __init__(self, clients: Sequence[Client]):
        if not clients:
            raise ValueError("a recommender needs at least one replica")
        self.clients: tuple[Client, ...] = tuple(clients)
        self.name: str = self.clients[0].name
        self.timeout_s: float = self.clients[0].timeout_s
        self._turn = itertools.count()

    def __len__(self) -> int:
        return len(self.clients)

    def pick(self) -> tuple[Client, Client | None]:
        """The replica whose turn it is, and another one for a hedge (None if there is none)."""
        # next() on a count is atomic under the GIL: safe from the threads strategy too.
        turn = next(self._turn) % len(self.clients)
        other = self.clients[(turn + 1) % len(self.clients)] if len(self.clients) > 1 else None
        return self.clients[turn], other

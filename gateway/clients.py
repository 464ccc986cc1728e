"""Recommender clients: over the worker's connection pool (`gateway.upstream`), or blocking.

This module is the one boundary where the HTTP clients' exceptions become the gateway's
`RecommenderError`s (see `gateway.errors`), each carrying the recommender's name and a short
reason a frontend can read. One table, `_TRANSLATIONS`, maps each of the HTTP layer's failures
(and a call's timeout) to its error, reason and whether it may be retried, for both clients.
Both read answers the same way (`_Endpoint._prediction`): an error status, with its
`Retry-After` (`parse_retry_after`), is a `RecommenderUnavailable`; a body is read within the
same `AnswerLimits`: bytes (as sent and decompressed, enforced while reading), items, and JSON
nesting and numbers (`gateway.jsonlimits`).
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Literal, Protocol, TypeVar

from gateway.blocking import BlockingPool
from gateway.errors import (
    BadRecommenderResponse,
    ClientClosedError,
    GatewayError,
    RecommenderTimeout,
    RecommenderUnavailable,
)
from gateway.jsonlimits import JsonRefused, loads
from gateway.upstream import (
    MAX_ANSWER_BYTES,
    Answer,
    ConnectFailed,
    ConnectionPool,
    Disconnected,
    PoolClosed,
    TooLarge,
    Truncated,
    UpstreamError,
)

__all__ = [
    "AnswerLimits",
    "BlockingRecommenderClient",
    "RecommenderClient",
    "Replicas",
    "parse_retry_after",
]


@dataclass(frozen=True, slots=True)
class AnswerLimits:
    """What the gateway reads of one recommender's answer (its settings, by default)."""

    max_bytes: int = MAX_ANSWER_BYTES
    max_items: int = 1000
    max_depth: int = 64


DEFAULT_LIMITS = AnswerLimits()


# Statuses that say "try again": the recommender (or a proxy before it) is briefly unable.
RETRYABLE_STATUSES = frozenset({502, 503, 504})


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    # RFC 9110 says whole seconds; a decimal is taken as meant rather than ignored.
    if value.replace(".", "", 1).isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.now(UTC).timestamp() if now is None else now
    return max(when.timestamp() - current, 0.0)


class _GatewayErrorClass(Protocol):
    """Makes a gateway error: a `RecommenderError` class, or `_client_closed`."""

    def __call__(self, recommender: str, reason: str, *, retryable: bool) -> GatewayError: ...


def _client_closed(recommender: str, reason: str, *, retryable: bool) -> GatewayError:
    # Not the recommender's failure: the gateway used a client it had closed.
    return ClientClosedError(reason)


@dataclass(frozen=True, slots=True)
class _Translation:
    """How one kind of failure of the HTTP layer reads as a gateway error."""

    error: _GatewayErrorClass
    # `{name}`: the recommender; `{error}`: the HTTP layer's message; `{budget_ms}`: the call's.
    reason: str
    # "if idempotent": the request may have reached the recommender; repeat it only if safe.
    retryable: Literal["always", "never", "if idempotent"]


# The HTTP layer's failures (and a call's timeout) as the gateway's errors: the first entry
# the failure is an instance of applies, so the catch-all `UpstreamError` comes last.
_TRANSLATIONS: dict[type[Exception], _Translation] = {
    TimeoutError: _Translation(RecommenderTimeout, "no answer within {budget_ms:.0f} ms", "never"),
    PoolClosed: _Translation(
        _client_closed, "the connection pool of recommender {name} is closed", "never"
    ),
    # The request never left: always safe to try again.
    ConnectFailed: _Translation(RecommenderUnavailable, "{error}", "always"),
    Disconnected: _Translation(
        RecommenderUnavailable,
        "connection closed by the recommender before it answered",
        "if idempotent",
    ),
    Truncated: _Translation(
        RecommenderUnavailable, "answer cut off before its end", "if idempotent"
    ),
    TooLarge: _Translation(BadRecommenderResponse, "{error}", "never"),
    UpstreamError: _Translation(
        RecommenderUnavailable, "answered something unreadable: {error}", "never"
    ),
}


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

    def _translated(self, failure: Exception, budget_s: float) -> GatewayError:
        """The gateway's error for the HTTP layer's `failure` (or a timeout), by `_TRANSLATIONS`."""
        translation = next(t for kind, t in _TRANSLATIONS.items() if isinstance(failure, kind))
        reason = translation.reason.format(name=self.name, error=failure, budget_ms=budget_s * 1000)
        retryable = translation.retryable == "always" or (
            translation.retryable == "if idempotent" and self.idempotent
        )
        return translation.error(self.name, reason, retryable=retryable)

    def _prediction(
        self, answer: Answer, limits: AnswerLimits, answered: Callable[[int], None] | None
    ) -> Any:
        """The parsed JSON of the recommender's answer, or the `RecommenderError` it amounts to."""
        if answered is not None:
            answered(answer.status)
        if answer.status >= 300:
            raise RecommenderUnavailable(
                self.name,
                f"answered HTTP {answer.status}",
                retryable=answer.status in RETRYABLE_STATUSES,
                retry_after_s=parse_retry_after(answer.header(b"retry-after")),
            )
        try:
            prediction = loads(answer.body, limits.max_depth)
        except JsonRefused as exc:
            raise BadRecommenderResponse(
                self.name, f"answered JSON beyond the limits: {exc}"
            ) from exc
        except ValueError as exc:
            raise BadRecommenderResponse(self.name, "answered a body that is not JSON") from exc
        if type(prediction) is dict:
            items = prediction.get("items")
            if type(items) is list and len(items) > limits.max_items:
                raise BadRecommenderResponse(
                    self.name,
                    f"answered {len(items)} items, above the limit of {limits.max_items}",
                )
        return prediction


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
        budget = self.timeout_s if timeout_s is None else timeout_s
        if self._pool.closed:
            raise self._translated(PoolClosed(), budget)
        try:
            async with asyncio.timeout(budget):
                answer = await self._pool.post(self.url, body, headers, limits.max_bytes)
        except (TimeoutError, UpstreamError) as exc:
            raise self._translated(exc, budget) from exc
        return self._prediction(answer, limits, answered)


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
        budget = self.timeout_s if timeout_s is None else timeout_s
        if self._closed:
            raise self._translated(PoolClosed(), budget)
        try:
            answer = self._pool.post(self.url, body, headers, budget, limits.max_bytes)
        except (TimeoutError, UpstreamError) as exc:
            raise self._translated(exc, budget) from exc
        return self._prediction(answer, limits, answered)


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

"""Recommender clients: over the worker's connection pool (`gateway.upstream`), or blocking.

This module is the one boundary where the HTTP clients' exceptions become the gateway's
`RecommenderError`s (see `gateway.errors`), each carrying the recommender's name and a short
reason a frontend can read.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, Generic, NoReturn, TypeVar

import requests

from gateway.errors import (
    BadRecommenderResponse,
    ClientClosedError,
    RecommenderTimeout,
    RecommenderUnavailable,
)
from gateway.resilience import parse_retry_after
from gateway.upstream import (
    ConnectFailed,
    ConnectionPool,
    Disconnected,
    PoolClosed,
    Truncated,
    UpstreamError,
)

__all__ = ["BlockingRecommenderClient", "RecommenderClient", "Replicas", "parse_json"]


def _reject_constant(name: str) -> NoReturn:
    # NaN and Infinity are not JSON; passing them on would garble the gateway's own response.
    raise ValueError(f"{name} is not valid JSON")


# One decoder for all: `json.loads` with a hook builds a new decoder (and scanner) per call.
_STRICT_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_json(payload: bytes | str) -> Any:
    """Parse strict JSON text in UTF-8 (no NaN or Infinity); raise `ValueError` otherwise."""
    try:
        text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        return _STRICT_DECODER.decode(text)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def _describe(error: BaseException) -> str:
    # asyncio words a refused connection as "Connect call failed ('127.0.0.1', 5001)"; the
    # errno's own text is what an operator searches for.
    if isinstance(error, socket.gaierror):
        return "host name not resolved"
    if isinstance(error, OSError):
        if error.errno and error.errno > 0:
            return os.strerror(error.errno)
        return error.strerror or type(error).__name__
    return type(error).__name__


def _find_cause(
    error: BaseException, kinds: tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first exception of `kinds` in the chain under `error`.

    requests wraps urllib3, which wraps the socket error: ``ConnectionError(MaxRetryError(
    reason=NewConnectionError(...) from ConnectionRefusedError))``.
    """
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kinds):
            return current
        links = (getattr(current, "reason", None), current.__cause__, current.__context__)
        pending.extend(e for e in (*links, *current.args) if isinstance(e, BaseException))
    return None


# Statuses that say "try again": the recommender (or a proxy before it) is briefly unable.
RETRYABLE_STATUSES = frozenset({502, 503, 504})


def _check_answer(name: str, status: int, payload: bytes, retry_after: str | None) -> Any:
    """The parsed JSON of a recommender's answer, or the `RecommenderError` it amounts to."""
    if status >= 300:
        raise RecommenderUnavailable(
            name,
            f"answered HTTP {status}",
            retryable=status in RETRYABLE_STATUSES,
            retry_after_s=parse_retry_after(retry_after),
        )
    try:
        return parse_json(payload)
    except ValueError as exc:
        raise BadRecommenderResponse(name, "answered a body that is not JSON") from exc


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
        self, body: bytes, headers: Mapping[str, str], timeout_s: float | None = None
    ) -> Any:
        """POST `body` (JSON) to the recommender and return its parsed JSON answer.

        `timeout_s` bounds the whole call (waiting for a pooled connection, connecting,
        sending, reading) and defaults to the client's own budget.

        Raises `RecommenderTimeout`, `RecommenderUnavailable` or `BadRecommenderResponse`.
        """
        if self._pool.closed:
            raise ClientClosedError(f"the connection pool of recommender {self.name} is closed")
        budget = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(budget):
                answer = await self._pool.post(self.url, body, headers)
        except TimeoutError as exc:
            raise RecommenderTimeout(self.name, f"no answer within {budget * 1000:.0f} ms") from exc
        except UpstreamError as exc:
            raise self._unavailable(exc) from exc
        return _check_answer(self.name, answer.status, answer.body, answer.header(b"retry-after"))

    def _unavailable(self, error: UpstreamError) -> Exception:
        if isinstance(error, ConnectFailed):
            # The request never left: always safe to try again.
            return RecommenderUnavailable(self.name, str(error), retryable=True)
        if isinstance(error, Disconnected):
            reason = "connection closed by the recommender before it answered"
            return RecommenderUnavailable(self.name, reason, retryable=self.idempotent)
        if isinstance(error, Truncated):
            reason = "answer cut off before its end"
            return RecommenderUnavailable(self.name, reason, retryable=self.idempotent)
        if isinstance(error, PoolClosed):
            return ClientClosedError(f"the connection pool of recommender {self.name} is closed")
        return RecommenderUnavailable(self.name, f"answered something unreadable: {error}")


class BlockingRecommenderClient(_Endpoint):
    """Calls one recommender from a thread, over a pooled `requests.Session`.

    Used by the thread-pool fan-out; it maps `requests`' errors onto the same
    `RecommenderError`s as `RecommenderClient`, with the same reasons.
    """

    def __init__(
        self,
        name: str,
        url: str,
        session: requests.Session,
        timeout_s: float,
        idempotent: bool = True,
    ):
        super().__init__(name, url, timeout_s, idempotent)
        self._session = session
        self._closed = False

    def close(self) -> None:
        """Refuse further calls (the session is closed by its owner)."""
        self._closed = True

    def recommend(
        self, body: bytes, headers: Mapping[str, str], timeout_s: float | None = None
    ) -> Any:
        """POST `body` and return the parsed JSON answer; raise a `RecommenderError`.

        `timeout_s` bounds connecting and each wait for data (requests has no total timeout;
        the thread-pool fan-out stops waiting at the deadline regardless).
        """
        if self._closed:
            raise ClientClosedError(f"the session of recommender {self.name} is closed")
        budget = self.timeout_s if timeout_s is None else timeout_s
        try:
            response = self._session.post(
                self.url,
                data=body,
                headers={"Content-Type": "application/json", **headers},
                timeout=budget,
                allow_redirects=False,
            )
        except requests.Timeout as exc:
            raise RecommenderTimeout(self.name, f"no answer within {budget * 1000:.0f} ms") from exc
        except requests.ConnectionError as exc:
            cause = _find_cause(exc, (ConnectionRefusedError, socket.gaierror))
            if cause is not None:
                host, port = _host_port(self.url)
                reason = f"cannot connect to {host}:{port}: {_describe(cause)}"
                raise RecommenderUnavailable(self.name, reason, retryable=True) from exc
            raise RecommenderUnavailable(
                self.name,
                "connection closed by the recommender before it answered",
                retryable=self.idempotent,
            ) from exc
        except requests.RequestException as exc:
            raise RecommenderUnavailable(
                self.name, f"call failed: {type(exc).__name__}", retryable=self.idempotent
            ) from exc
        return _check_answer(
            self.name, response.status_code, response.content, response.headers.get("Retry-After")
        )


def _host_port(url: str) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(url)
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


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

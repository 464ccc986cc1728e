"""Recommender clients: over the worker's aiohttp session, or from threads over requests.

This module is the one boundary where the HTTP libraries' exceptions become the gateway's
`RecommenderError`s (see `gateway.core.errors`), each carrying the recommender's name and a short
reason a frontend can read. One table, `_TRANSLATIONS`, maps each failure of aiohttp, requests,
urllib3 and http.client (and of `gateway.recommenders.bodies`, and a call's timeout) to its error,
reason and whether it may be retried, for both clients. requests and urllib3 wrap one failure in
several
layers (a refused connection is a `requests.ConnectionError` around a `MaxRetryError` around a
`NewConnectionError` around the `ConnectionRefusedError`), so a failure matches an entry when it
or anything it wraps (`_wrapped`) is of one of the entry's kinds; entries are tried in order.

Both clients read answers the same way (`_Endpoint._prediction`): an error status, with its
`Retry-After` (`parse_retry_after`), is a `RecommenderUnavailable`; a body is read within the
same `AnswerLimits`: bytes (as sent and decompressed, enforced while reading,
`gateway.recommenders.bodies`), items, and JSON nesting and numbers (`gateway.core.jsonlimits`).
"""

from __future__ import annotations

import asyncio
import email.utils
import http.client
import itertools
import os
import socket
import ssl
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Literal, Protocol, TypeVar

import aiohttp
import requests
import urllib3.exceptions
from yarl import URL

from gateway.core.errors import (
    BadRecommenderResponse,
    ClientClosedError,
    GatewayError,
    RecommenderTimeout,
    RecommenderUnavailable,
)
from gateway.core.jsonlimits import JsonRefused, loads
from gateway.core.protocols import NATIVE, AnswerMismatch, WireProtocol
from gateway.core.request_id import REQUEST_ID_HEADER
from gateway.recommenders import async_http
from gateway.recommenders.blocking_http import SessionClosed, ThreadSessions
from gateway.recommenders.bodies import MAX_ANSWER_BYTES, Answer, Malformed, TooLarge, Truncated

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
    """How one kind of failure of the HTTP libraries reads as a gateway error."""

    kinds: tuple[type[BaseException], ...]
    error: _GatewayErrorClass
    # `{name}`: the recommender; `{error}`: the failure's own words; `{budget_ms}`: the call's
    # budget; `{origin}`: where the call went; `{why}`: the system's words for a socket error.
    reason: str
    # "if idempotent": the request may have reached the recommender; repeat it only if safe.
    retryable: Literal["always", "never", "if idempotent"]


# The libraries' failures (and a call's timeout) as the gateway's errors: the first entry that
# the failure, or anything it wraps, is an instance of applies, so the catch-alls come last.
_TRANSLATIONS: tuple[_Translation, ...] = (
    _Translation(
        (TimeoutError, requests.Timeout),
        RecommenderTimeout,
        "no answer within {budget_ms:.0f} ms",
        "never",
    ),
    _Translation(
        (SessionClosed,),
        _client_closed,
        "the HTTP session of recommender {name} is closed",
        "never",
    ),
    _Translation((TooLarge, Malformed), BadRecommenderResponse, "{error}", "never"),
    _Translation(
        (Truncated,), RecommenderUnavailable, "answer cut off before its end", "if idempotent"
    ),
    # The request never left: always safe to try again.
    _Translation(
        (
            aiohttp.ClientConnectorError,
            urllib3.exceptions.NewConnectionError,
            requests.exceptions.SSLError,
        ),
        RecommenderUnavailable,
        "cannot connect to {origin}: {why}",
        "always",
    ),
    _Translation(
        (aiohttp.ServerDisconnectedError, http.client.RemoteDisconnected, ConnectionError),
        RecommenderUnavailable,
        "connection closed by the recommender before it answered",
        "if idempotent",
    ),
    _Translation(
        (aiohttp.ClientError, requests.RequestException, http.client.HTTPException, OSError),
        RecommenderUnavailable,
        "answered something unreadable: {error}",
        "never",
    ),
)


def _wrapped(failure: BaseException) -> Iterator[BaseException]:
    """`failure` and every failure it wraps: its cause and context, and what requests and
    urllib3 keep in `reason` or `args`, outermost first."""
    seen: set[int] = set()
    pending = [failure]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        inner = (
            current.__cause__,
            current.__context__,
            getattr(current, "reason", None),  # urllib3's MaxRetryError
            getattr(current, "os_error", None),  # aiohttp's ClientConnectorError
        )
        pending += [e for e in (*inner, *current.args) if isinstance(e, BaseException)]


def _released(error: GatewayError, failure: BaseException) -> GatewayError:
    """`error`, once the frames `failure` went through have let go of their locals.

    A failed call's frames hold what it had read (an aiohttp response and its buffered body,
    up to a few hundred KB), and the failure's traceback holds the frames: kept as the error's
    cause, and in a cycle through them, that waits for a garbage collection to be freed. The
    traceback still says where it failed; its frames no longer hold the answer.
    """
    traceback.clear_frames(failure.__traceback__)
    return error


def _words(failure: BaseException) -> str:
    """What `failure` says, on one line (aiohttp's own words, not its URL, where it has them)."""
    message = getattr(failure, "message", None)
    text = message if isinstance(message, str) and message else str(failure)
    return " ".join(text.split()) or type(failure).__name__


def _why(failures: Sequence[BaseException]) -> str:
    """The system's own words for the socket error among `failures`: what an operator searches."""
    for failure in reversed(failures):
        if isinstance(failure, socket.gaierror):
            return "host name not resolved"
        if isinstance(failure, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted: {failure.verify_message}"
        if isinstance(failure, ssl.SSLError):
            return f"TLS failed: {failure.reason or failure}"
        if isinstance(failure, OSError) and failure.errno and failure.errno > 0:
            return os.strerror(failure.errno)
    return str(failures[-1]) or type(failures[-1]).__name__


class _Endpoint:
    """One recommender replica: its name, URL, time budget, whether calls may repeat, and the
    protocol it speaks (`gateway.core.protocols`)."""

    def __init__(
        self,
        name: str,
        url: str,
        timeout_s: float,
        idempotent: bool = True,
        protocol: WireProtocol = NATIVE,
        headers: Mapping[str, str] | None = None,
    ):
        self.name = name
        self.url = url
        self.timeout_s = timeout_s
        # Whether a call that may have reached the recommender can be repeated safely.
        self.idempotent = idempotent
        self.protocol = protocol
        # Sent with every call (a model mesh's routing header); the gateway's own win.
        self.headers = dict(headers or {})

    def _headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        return {**self.headers, **headers} if self.headers else headers

    def _body(self, native: bytes, headers: Mapping[str, str]) -> bytes:
        """What to send: the native body, in the recommender's protocol."""
        if self.protocol is NATIVE:
            return native
        return self.protocol.request_body(native, headers.get(REQUEST_ID_HEADER))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.url!r})"

    @property
    def origin(self) -> str:
        """Where the calls go: host and port."""
        url = URL(self.url)
        return f"{url.host}:{url.port}"

    def _translated(self, failure: Exception, budget_s: float) -> GatewayError | None:
        """The gateway's error for the libraries' `failure` (or a timeout), by `_TRANSLATIONS`;
        None for a failure of none of their kinds (the gateway's own bug, raised as it is)."""
        failures = list(_wrapped(failure))
        for translation in _TRANSLATIONS:
            matched = [f for f in failures if isinstance(f, translation.kinds)]
            if not matched:
                continue
            words = translation.reason
            reason = words.format(
                name=self.name,
                budget_ms=budget_s * 1000,
                origin=self.origin,
                why=_why(failures) if "{why}" in words else "",
                error=_words(matched[-1]) if "{error}" in words else "",
            )
            retryable = translation.retryable == "always" or (
                translation.retryable == "if idempotent" and self.idempotent
            )
            return translation.error(self.name, reason, retryable=retryable)
        return None

    def _closed(self) -> ClientClosedError:
        # Not the recommender's failure: the gateway used a client it had closed.
        return ClientClosedError(f"the HTTP session of recommender {self.name} is closed")

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
                retry_after_s=parse_retry_after(answer.header("Retry-After")),
            )
        try:
            prediction = loads(answer.body, limits.max_depth)
        except JsonRefused as exc:
            raise BadRecommenderResponse(
                self.name, f"answered JSON beyond the limits: {exc}"
            ) from exc
        except ValueError as exc:
            raise BadRecommenderResponse(self.name, "answered a body that is not JSON") from exc
        if self.protocol is not NATIVE:
            try:
                prediction = self.protocol.native_answer(prediction)
            except AnswerMismatch as exc:
                raise BadRecommenderResponse(
                    self.name, f"answered {self.protocol.name} JSON that does not fit: {exc}"
                ) from None
        if type(prediction) is dict:
            items = prediction.get("items")
            if type(items) is list and len(items) > limits.max_items:
                raise BadRecommenderResponse(
                    self.name,
                    f"answered {len(items)} items, above the limit of {limits.max_items}",
                )
        return prediction


class RecommenderClient(_Endpoint):
    """Calls one recommender's endpoint over the worker's aiohttp session."""

    def __init__(
        self,
        name: str,
        url: str,
        session: aiohttp.ClientSession,
        timeout_s: float,
        idempotent: bool = True,
        protocol: WireProtocol = NATIVE,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(name, url, timeout_s, idempotent, protocol, headers)
        self._session = session
        self._target = URL(url)  # parsed once, not on every call

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
        if self._session.closed:
            raise self._closed()
        try:
            async with asyncio.timeout(budget):
                answer = await async_http.post(
                    self._session,
                    self._target,
                    self._body(body, headers),
                    self._headers(headers),
                    limits.max_bytes,
                )
        except Exception as exc:
            error = self._translated(exc, budget)
            if error is None:
                raise
            raise _released(error, exc) from exc
        return self._prediction(answer, limits, answered)


class BlockingRecommenderClient(_Endpoint):
    """Calls one recommender from a thread, over requests (`gateway.recommenders.blocking_http`).

    Used by the `threads` and `sequential` fan-outs; the same answers, limits, errors and
    reasons as `RecommenderClient`, and the call's budget bounds it all: no thread waits past it.
    """

    def __init__(
        self,
        name: str,
        url: str,
        sessions: ThreadSessions,
        timeout_s: float,
        idempotent: bool = True,
        protocol: WireProtocol = NATIVE,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(name, url, timeout_s, idempotent, protocol, headers)
        self._sessions = sessions
        self._open = True

    def close(self) -> None:
        """Refuse further calls (the sessions are closed by their owner)."""
        self._open = False

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
        if not self._open:
            raise self._closed()
        try:
            answer = self._sessions.post(
                self.url,
                self._body(body, headers),
                self._headers(headers),
                budget,
                limits.max_bytes,
            )
        except Exception as exc:
            error = self._translated(exc, budget)
            if error is None:
                raise
            raise _released(error, exc) from exc
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

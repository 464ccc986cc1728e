"""The spans the request path opens, as interfaces, and the tracer that records none.

`Tracing` is a worker's tracer; this base, `NO_TRACING`, hands out one shared do-nothing span,
so that with tracing off the request path imports no OpenTelemetry module and pays a few
method calls. `gateway.observability.otel` implements them over OpenTelemetry, and
`gateway.observability.tracing` picks one by the settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol

__all__ = ["NO_TRACING", "AttemptSpan", "CallSpan", "RequestSpan", "Tracing"]


class _Span(Protocol):
    def __enter__(self) -> Any: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...


class RequestSpan(_Span, Protocol):
    """The server span of one request."""

    @property
    def trace_id(self) -> str | None:
        """The trace's id as 32 hex digits (None when tracing is off)."""
        ...

    def answered(
        self, status: int, complete: bool, coverage: float | None, fusion: str | None
    ) -> None:
        """Record what the request was answered."""
        ...


class CallSpan(_Span, Protocol):
    """The span of one recommender call, parent of its attempts."""

    def finished(self, status: str, attempts: int, error: str | None) -> None:
        """Record what the call came to (an `Outcome`'s status, attempts and reason)."""
        ...


class AttemptSpan(_Span, Protocol):
    """The client span of one HTTP attempt at a recommender."""

    def headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """`headers` with this span's `traceparent` (and `tracestate`) added."""
        ...

    def answered(self, status: int) -> None:
        """Record the HTTP status the recommender answered."""
        ...


class Tracing:
    """The tracer of a worker; this base traces nothing, at no cost (`NO_TRACING`)."""

    enabled = False

    def request(self, headers: Any, request_id: str) -> RequestSpan:
        """A server span continuing the trace in `headers` (`traceparent`, `tracestate`)."""
        return _NO_SPAN

    def call(self, recommender: str) -> CallSpan:
        """A span for one call to `recommender`, child of the current span."""
        return _NO_SPAN

    def attempt(self, recommender: str, url: str, resend_count: int, hedge: bool) -> AttemptSpan:
        """A client span for one attempt at `url` (`resend_count`: retries before it)."""
        return _NO_SPAN

    def shutdown(self) -> None:
        """Export what is left and stop exporting (blocks: call it off the serving loop)."""


class _NoSpan:
    """Every span when tracing is off: one shared object that records nothing."""

    __slots__ = ()

    trace_id = None

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def answered(self, *args: Any) -> None:
        """Nothing to record."""

    def finished(self, status: str, attempts: int, error: str | None) -> None:
        """Nothing to record."""

    def headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """No trace context to send."""
        return headers


_NO_SPAN = _NoSpan()
NO_TRACING = Tracing()

"""Distributed tracing: a span per request, per recommender call and per attempt, or nothing.

Tracing is off by default, and then it is `NO_TRACING`: spans that are shared do-nothing
objects, so the request path imports no OpenTelemetry module and pays a few method calls.
It is switched on by the config (`tracing.enabled`) or by the standard
`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, and off again by
`OTEL_SDK_DISABLED=true`. Then `start_tracing` (called by each worker's runtime, after the fork)
imports `gateway.otel`, the OpenTelemetry implementation, and builds the worker's own tracer
provider, exporting OTLP over HTTP/protobuf in batches; `Tracing.shutdown` flushes it.

The span tree of a ``POST /recommendation``::

    POST /recommendation          SERVER    the frontend's traceparent continued
    ├── recommender sml           INTERNAL  one per recommender call: its status, attempts
    │   └── POST sml              CLIENT    one per attempt: replica URL, HTTP status, error
    ├── recommender asc
    │   ├── POST asc                        a failed first attempt
    │   └── POST asc                        its retry (http.request.resend_count=1)
    ├── recommender psn
    │   ├── POST psn                        the slow replica
    │   └── POST psn                        the hedge (gateway.attempt.hedge=true)
    └── recommender trd                     circuit_open: no attempt, nobody called

Each attempt sends its own span's `traceparent` to the recommender.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol

from gateway.config import TracingSettings
from gateway.errors import ConfigError

__all__ = [
    "INSTALL_HINT",
    "NO_TRACING",
    "AttemptSpan",
    "CallSpan",
    "RequestSpan",
    "Tracing",
    "check_installed",
    "start_tracing",
    "switched_on",
]

INSTALL_HINT = "pip install 'fusion-gateway[tracing]'"


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


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() == "true"


def switched_on(settings: TracingSettings, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether tracing is on: by the config or an OTLP endpoint variable, unless the SDK is off."""
    if _flag(environ, "OTEL_SDK_DISABLED"):
        return False
    return (
        settings.enabled
        or bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        or bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    )


def check_installed(settings: TracingSettings) -> None:
    """Raise `ConfigError` naming the extra if tracing is on and its packages are missing."""
    if not switched_on(settings):
        return
    try:
        import gateway.otel  # noqa: F401 - imported to see that it can be
    except ImportError as exc:
        raise ConfigError(
            f"tracing is switched on (tracing.enabled or OTEL_EXPORTER_OTLP_ENDPOINT) but the "
            f"OpenTelemetry packages are not installed ({exc}): {INSTALL_HINT}"
        ) from exc


def start_tracing(settings: TracingSettings, span_processor: Any = None) -> Tracing:
    """This worker's tracing: `NO_TRACING` when off, else a tracer provider of its own.

    `span_processor` takes the spans instead of the OTLP exporter's batches (tests give a
    `SimpleSpanProcessor` of an in-memory exporter).
    """
    if not switched_on(settings):
        return NO_TRACING
    check_installed(settings)
    from gateway.otel import OtelTracing

    return OtelTracing(settings, span_processor)

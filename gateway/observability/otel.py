"""The OpenTelemetry side of `gateway.observability.tracing`: imported only when tracing is switched
on.

The OpenTelemetry API is used directly, not the instrumentation packages:
opentelemetry-instrumentation-flask wraps Flask's WSGI call, which here runs inside a greenlet
portal under the ASGI app (`gateway.serving.asgi_app`), after admission, with the view's coroutine
awaited on the loop. The recommenders are called over aiohttp and requests, but their
instrumentation packages would not know a recommender call from its attempts, a retry from a
hedge: each attempt is a CLIENT span made around the library's call (`gateway.fanout.call`), whose
`traceparent` goes out in that attempt's headers.

Each worker makes its own `TracerProvider` (never installed as the global one: a test process
holds several apps, a worker one), with the OTLP/HTTP exporter behind the SDK's batch
processor, whose thread starts in the worker, after the fork. The `OTEL_*` variables are the
SDK's: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), the
exporter's OTEL_EXPORTER_OTLP_* and the batch processor's OTEL_BSP_*; where one is set it wins
over the config. Context crosses to the recommenders as W3C trace context (or what
OTEL_PROPAGATORS names).
"""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context, propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway.config.settings import TracingSettings
from gateway.observability.spans import AttemptSpan, CallSpan, RequestSpan, Tracing

__all__ = ["OtelTracing"]

_ROUTE = "/recommendation"


class _Current:
    """A span made current for the `with` block, ended at its end; errors recorded on it."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: trace.Span):
        self._span = span
        self._token: object = None

    def __enter__(self) -> Any:
        self._token = context.attach(trace.set_span_in_context(self._span))
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        context.detach(self._token)  # type: ignore[arg-type]
        if error is not None:
            self._failed(error)
        self._span.end()

    def _failed(self, error: BaseException) -> None:
        self._span.record_exception(error)
        self._span.set_status(Status(StatusCode.ERROR, str(error)))
        self._span.set_attribute("error.type", type(error).__qualname__)


class _RequestSpan(_Current):
    def _failed(self, error: BaseException) -> None:
        status = getattr(error, "status", None) or getattr(error, "code", None)
        if isinstance(status, int) and status < 500:
            # The frontend's mistake (a 4xx), not the gateway's failure.
            self._span.set_attribute("http.response.status_code", status)
            return
        super()._failed(error)

    @property
    def trace_id(self) -> str | None:
        return trace.format_trace_id(self._span.get_span_context().trace_id)

    def answered(
        self, status: int, complete: bool, coverage: float | None, fusion: str | None
    ) -> None:
        span = self._span
        # One call per span: each sets the attributes under the span's lock, after cleaning.
        found: dict[str, Any] = {"http.response.status_code": status, "gateway.complete": complete}
        if coverage is not None:
            found["gateway.coverage"] = coverage
        if fusion is not None:
            found["gateway.fusion"] = fusion
        if status >= 500:
            # The server span's rule: 5xx is an error, 4xx is the client's.
            span.set_status(Status(StatusCode.ERROR))
            found["error.type"] = str(status)
        span.set_attributes(found)


class _CallSpan(_Current):
    def finished(self, status: str, attempts: int, error: str | None) -> None:
        span = self._span
        found: dict[str, Any] = {"gateway.call.status": status, "gateway.call.attempts": attempts}
        if status != "ok":
            found["error.type"] = status
            span.set_status(Status(StatusCode.ERROR, error))
        span.set_attributes(found)


class _AttemptSpan(_Current):
    __slots__ = ("_status",)

    def __init__(self, span: trace.Span):
        super().__init__(span)
        self._status = 0

    def headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        carrier = dict(headers)
        propagate.inject(carrier, context=trace.set_span_in_context(self._span))
        return carrier

    def answered(self, status: int) -> None:
        self._status = status
        self._span.set_attribute("http.response.status_code", status)

    def _failed(self, error: BaseException) -> None:
        if isinstance(error, asyncio.CancelledError):
            # A hedge's loser, or the request's end: not a failure of this attempt.
            self._span.set_attribute("gateway.attempt.cancelled", True)
            return
        self._span.set_status(Status(StatusCode.ERROR, str(error)))
        # An error status names the error (semantic conventions); else the exception does.
        kind = str(self._status) if self._status >= 400 else type(error).__qualname__
        self._span.set_attribute("error.type", kind)


class _Unsampled:
    """A call or an attempt of a request that is not sampled: no span, the context still sent.

    The SDK would make a non-recording span for each, at about 14 µs apiece on the
    development machine (measured: 124 µs of tracing per request at a 1% sampler before,
    against 606 µs at 100%), for nothing: a parent-based sampler drops them all.
    """

    __slots__ = ()

    def __enter__(self) -> _Unsampled:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def finished(self, status: str, attempts: int, error: str | None) -> None:
        """Nothing to record."""

    def answered(self, status: int) -> None:
        """Nothing to record."""

    def headers(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """`headers` with the request's (unsampled) trace context: the recommender follows it."""
        carrier = dict(headers)
        propagate.inject(carrier)
        return carrier


_UNSAMPLED = _Unsampled()


def _sampler(settings: TracingSettings) -> Any:
    # OTEL_TRACES_SAMPLER, where set, is the SDK's to read (sampler=None).
    if os.environ.get("OTEL_TRACES_SAMPLER"):
        return None
    return ParentBased(TraceIdRatioBased(settings.sample_ratio))


def _resource(settings: TracingSettings) -> Resource:
    attributes: dict[str, Any] = {
        "service.instance.id": uuid.uuid4().hex,
        "process.pid": os.getpid(),
    }
    # Resource.create lets what it is given win over the variables: give a name only if
    # neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES names the service.
    named = os.environ.get("OTEL_SERVICE_NAME") or any(
        pair.split("=", 1)[0].strip() == "service.name"
        for pair in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    )
    if not named:
        attributes["service.name"] = settings.service_name
    return Resource.create(attributes)


def _processor(settings: TracingSettings) -> SpanProcessor:
    endpoint = None
    if settings.endpoint is not None and not (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    ):
        endpoint = f"{str(settings.endpoint).rstrip('/')}/v1/traces"
    return BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))


class OtelTracing(Tracing):
    """A worker's tracer: its own provider, sampler, resource and exporting processor."""

    enabled = True

    def __init__(self, settings: TracingSettings, span_processor: SpanProcessor | None = None):
        self.provider = TracerProvider(sampler=_sampler(settings), resource=_resource(settings))
        self.provider.add_span_processor(span_processor or _processor(settings))
        self._tracer = self.provider.get_tracer("gateway")

    def request(self, headers: Any, request_id: str) -> RequestSpan:
        span = self._tracer.start_span(
            f"POST {_ROUTE}",
            context=propagate.extract(headers),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": "POST",
                "http.route": _ROUTE,
                "url.path": _ROUTE,
                "gateway.request_id": request_id,
            },
        )
        return _RequestSpan(span)

    def call(self, recommender: str) -> CallSpan:
        if not trace.get_current_span().is_recording():
            return _UNSAMPLED
        span = self._tracer.start_span(
            f"recommender {recommender}",
            kind=SpanKind.INTERNAL,
            attributes={"gateway.recommender": recommender},
        )
        return _CallSpan(span)

    def attempt(self, recommender: str, url: str, resend_count: int, hedge: bool) -> AttemptSpan:
        if not trace.get_current_span().is_recording():
            return _UNSAMPLED
        target = _target(url)
        attributes: dict[str, Any] = {
            "http.request.method": "POST",
            "url.full": url,
            "server.address": target[0],
            "server.port": target[1],
            "gateway.recommender": recommender,
        }
        if resend_count:
            attributes["http.request.resend_count"] = resend_count
        if hedge:
            attributes["gateway.attempt.hedge"] = True
        span = self._tracer.start_span(
            f"POST {recommender}", kind=SpanKind.CLIENT, attributes=attributes
        )
        return _AttemptSpan(span)

    def shutdown(self) -> None:
        self.provider.force_flush()
        self.provider.shutdown()


@functools.lru_cache(maxsize=1024)
def _target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "", port

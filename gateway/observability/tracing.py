"""Distributed tracing: a span per request, per recommender call and per attempt, or nothing.

Tracing is off by default, and then it is `NO_TRACING`: spans that are shared do-nothing
objects, so the request path imports no OpenTelemetry module and pays a few method calls.
It is switched on by the config (`tracing.enabled`) or by the standard
`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, and off again by
`OTEL_SDK_DISABLED=true`. Then `start_tracing` (called by each worker's runtime, after the fork)
imports `gateway.observability.otel`, the OpenTelemetry implementation, and builds the worker's own
tracer provider, exporting OTLP over HTTP/protobuf in batches; `Tracing.shutdown` flushes it.

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
from typing import Any

from gateway.config.settings import TracingSettings
from gateway.core.errors import ConfigError
from gateway.observability.spans import NO_TRACING, AttemptSpan, CallSpan, RequestSpan, Tracing

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
        import gateway.observability.otel  # noqa: F401 - imported to see that it can be
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
    from gateway.observability.otel import OtelTracing

    return OtelTracing(settings, span_processor)

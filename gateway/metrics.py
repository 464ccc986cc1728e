"""Prometheus metrics, aggregated over every gunicorn worker.

Under gunicorn, `gunicorn.conf.py` points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory
before the workers fork; each worker writes its values there, and `GET /metrics` merges them
(prometheus-client's multiprocess mode). Without that variable (tests, a single process) the
default registry is served.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.fanout import Outcome

__all__ = [
    "CONTENT_TYPE_LATEST",
    "IN_FLIGHT",
    "IN_FLIGHT_EVERY_S",
    "observe_outcomes",
    "observe_request",
    "render",
]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)

REQUESTS = Counter(
    "gateway_requests_total", "Requests answered, by route and status.", ["route", "status"]
)
REQUEST_SECONDS = Histogram(
    "gateway_request_duration_seconds",
    "Time to answer a request, by route and status.",
    ["route", "status"],
    buckets=_LATENCY_BUCKETS,
)
CALLS = Counter(
    "gateway_recommender_calls_total",
    "Calls to each recommender, by outcome (ok, timeout, error, circuit_open, shed).",
    ["recommender", "outcome"],
)
CALL_SECONDS = Histogram(
    "gateway_recommender_call_duration_seconds",
    "Time each recommender's call took, retries and hedges included.",
    ["recommender"],
    buckets=_LATENCY_BUCKETS,
)
BREAKER_OPEN = Gauge(
    "gateway_circuit_breaker_open",
    "1 when a worker's breaker for the recommender is open or half-open (max over workers).",
    ["recommender"],
    multiprocess_mode="max",
)
IN_FLIGHT = Gauge(
    "gateway_in_flight_requests",
    "Requests being served now, summed over live workers (refreshed every second).",
    multiprocess_mode="livesum",
)
IN_FLIGHT_EVERY_S = 1.0


def observe_request(route: str, status: int, seconds: float) -> None:
    """Count one answered request and its latency."""
    labels = (route, str(status))
    REQUESTS.labels(*labels).inc()
    REQUEST_SECONDS.labels(*labels).observe(seconds)


# Each metric write takes prometheus-client's process-wide lock, which request threads and
# the loop thread contend for; a gauge is therefore written only when its value changes.
_published_breakers: dict[str, int] = {}


def observe_outcomes(outcomes: Iterable[Outcome], breaker_states: Mapping[str, str]) -> None:
    """Count each recommender's outcome and latency, and publish its breaker's state."""
    for outcome in outcomes:
        CALLS.labels(outcome.name, outcome.status).inc()
        if outcome.attempts > 0:
            CALL_SECONDS.labels(outcome.name).observe(outcome.latency_ms / 1000)
        is_open = 0 if breaker_states.get(outcome.name, "closed") == "closed" else 1
        if _published_breakers.get(outcome.name) != is_open:
            _published_breakers[outcome.name] = is_open
            BREAKER_OPEN.labels(outcome.name).set(is_open)


def render() -> bytes:
    """The metrics in Prometheus text format, merged over workers when there are several."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)

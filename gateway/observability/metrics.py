"""Prometheus metrics, aggregated over every gunicorn worker.

Under gunicorn, `gunicorn.conf.py` points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory
before the workers fork; each worker writes its values there, and `GET /metrics` merges them
(prometheus-client's multiprocess mode). Without that variable (tests, a single process) the
default registry is served.
"""

from __future__ import annotations

import bisect
import os
import threading
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

from gateway.core.outcome import Outcome

__all__ = [
    "CONCURRENCY_LIMIT",
    "CONTENT_TYPE_LATEST",
    "DEADLINE",
    "FLUSH_EVERY_S",
    "IN_FLIGHT",
    "QUEUE_CAPACITY",
    "QUEUE_LENGTH",
    "flush",
    "observe_feedback",
    "observe_feedback_store_error",
    "observe_impressions",
    "observe_impressions_waiting",
    "observe_lag",
    "observe_learned_weights",
    "observe_learner_update",
    "observe_outcomes",
    "observe_queue_wait",
    "observe_request",
    "observe_shed",
    "render",
]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

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
LOOP_LAG = Histogram(
    "gateway_event_loop_lag_seconds",
    "How late each worker's event loop ran a timer, measured every admission.interval_ms: "
    "the worker's own queueing, which admission keeps near admission.target_lag_ms.",
    buckets=_LAG_BUCKETS,
)
CONCURRENCY_LIMIT = Gauge(
    "gateway_concurrency_limit",
    "Requests the workers admit at once now (adaptive admission), summed over live workers.",
    multiprocess_mode="livesum",
)
DEADLINE = Gauge(
    "gateway_deadline_seconds",
    "The configured deadline_ms of /recommendation, in seconds: the p99 alert's threshold "
    "(deploy/observability), so that it follows the config.",
    multiprocess_mode="livemax",
)
OVERLOAD_TIMEOUTS = Counter(
    "gateway_overload_timeouts_total",
    "Calls that timed out while the worker itself was overloaded (its loop stalled): "
    "reported as timeouts, not counted against the recommender's breaker.",
    ["recommender"],
)
SHED = Counter(
    "gateway_shed_requests_total",
    "Requests answered 503 by admission control (the worker's own overload; no recommender "
    "was called), by reason: queue_full (shed at once), deadline (waited in the queue until "
    "it could no longer be answered in time), limit (no queue). They are counted in "
    "gateway_requests_total too.",
    ["reason"],
)
for _reason in ("queue_full", "deadline", "limit"):
    SHED.labels(_reason)  # 0, not missing: the first burst of each shows in rate()
QUEUE_LENGTH = Gauge(
    "gateway_admission_queue_length",
    "Requests waiting in the workers' admission queues for a slot now, summed over live "
    "workers (refreshed every second).",
    multiprocess_mode="livesum",
)
QUEUE_CAPACITY = Gauge(
    "gateway_admission_queue_capacity",
    "The admission queues' size (admission.queue_size), summed over live workers.",
    multiprocess_mode="livesum",
)
QUEUE_WAIT = Histogram(
    "gateway_admission_queue_wait_seconds",
    "How long requests that found no free slot waited in the admission queue, by outcome: "
    "admitted (then served) or shed (for their deadline).",
    ["outcome"],
    buckets=_LATENCY_BUCKETS,
)
for _outcome in ("admitted", "shed"):
    QUEUE_WAIT.labels(_outcome)
FEEDBACK_EVENTS = Counter(
    "gateway_feedback_events_total",
    "Feedback events judged, by kind (click, purchase, dismiss) and result (accepted, "
    "duplicate, unknown_request, item_not_shown).",
    ["kind", "result"],
)
IMPRESSIONS = Counter(
    "gateway_feedback_impressions_total",
    "Answers' impressions, by outcome: recorded (written to the feedback store) or dropped "
    "(the worker's queue was full, or the store refused them for too long).",
    ["outcome"],
)
LEARNED_WEIGHT = Gauge(
    "gateway_feedback_learned_weight",
    "The learnt RRF weight of each recommender that `weights: learned` arms fuse with.",
    ["recommender"],
    multiprocess_mode="mostrecent",
)
LEARNER_UPDATES = Counter(
    "gateway_feedback_learner_updates_total",
    "New versions of the learnt weights saved to the feedback store by this gateway.",
)
FEEDBACK_STORE_OPERATIONS = ("save", "expire", "learn", "judge", "report")
FEEDBACK_STORE_ERRORS = Counter(
    "gateway_feedback_store_errors_total",
    "Feedback store calls that failed, by operation: the writer's (save impressions, expire "
    "them, learn) and the requests' (judge /feedback events, report /experiments).",
    ["operation"],
)
for _operation in FEEDBACK_STORE_OPERATIONS:
    FEEDBACK_STORE_ERRORS.labels(_operation)  # 0, not missing, until the first failure
IMPRESSIONS_WAITING = Gauge(
    "gateway_feedback_impressions_waiting",
    "Impressions held unwritten after the writer's last flush (summed over live workers): "
    "above 0 the store is failing or slow, and at feedback.queue_limit they are dropped.",
    multiprocess_mode="livesum",
)
FLUSH_EVERY_S = 1.0


class _Tally:
    """One histogram's observations since the last flush: a count per bucket, and their sum."""

    __slots__ = ("bounds", "buckets", "total")

    def __init__(self, size: int, bounds: tuple[float, ...] = _LATENCY_BUCKETS):
        self.bounds = bounds
        self.buckets = [0] * size
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


class _Pending:
    """What requests recorded since the last flush, kept in plain dicts.

    A request records a handful of numbers here (microseconds); `flush` hands them to
    prometheus-client, whose every write takes a process-wide lock and writes a shared file,
    in one batch per label set, once a second (`FLUSH_EVERY_S`) and before `/metrics` renders.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()  # the gthread design records from request threads too
        self.requests: dict[tuple[str, str], int] = {}
        self.request_seconds: dict[tuple[str, str], _Tally] = {}
        self.calls: dict[tuple[str, str], int] = {}
        self.call_seconds: dict[str, _Tally] = {}
        self.overload_timeouts: dict[str, int] = {}
        self.shed: dict[str, int] = {}
        self.queue_wait: dict[str, _Tally] = {}
        self.lag = _Tally(len(_LAG_BUCKETS) + 1, _LAG_BUCKETS)
        self.feedback: dict[tuple[str, str], int] = {}
        self.impressions: dict[str, int] = {}
        self.learner_updates = 0

    def take(self) -> _Pending:
        """This batch, leaving an empty one in its place."""
        with self.lock:
            batch = _Pending()
            batch.requests, self.requests = self.requests, batch.requests
            batch.request_seconds, self.request_seconds = self.request_seconds, {}
            batch.calls, self.calls = self.calls, batch.calls
            batch.call_seconds, self.call_seconds = self.call_seconds, {}
            batch.overload_timeouts, self.overload_timeouts = self.overload_timeouts, {}
            batch.shed, self.shed = self.shed, batch.shed
            batch.queue_wait, self.queue_wait = self.queue_wait, {}
            batch.lag, self.lag = self.lag, batch.lag
            batch.feedback, self.feedback = self.feedback, batch.feedback
            batch.impressions, self.impressions = self.impressions, batch.impressions
            batch.learner_updates, self.learner_updates = self.learner_updates, 0
            return batch


_BUCKETS = len(_LATENCY_BUCKETS) + 1  # and +Inf
_pending = _Pending()


def observe_request(route: str, status: int, seconds: float) -> None:
    """Count one answered request and its latency."""
    labels = (route, str(status))
    with _pending.lock:
        _pending.requests[labels] = _pending.requests.get(labels, 0) + 1
        tally = _pending.request_seconds.get(labels)
        if tally is None:
            tally = _pending.request_seconds[labels] = _Tally(_BUCKETS)
        tally.add(seconds)


def observe_shed(route: str, seconds: float, reason: str) -> None:
    """Count one request shed by admission control (answered 503), and why."""
    observe_request(route, 503, seconds)
    with _pending.lock:
        _pending.shed[reason] = _pending.shed.get(reason, 0) + 1


def observe_queue_wait(seconds: float, outcome: str) -> None:
    """Record how long a request waited in the admission queue: `admitted`, or `shed`."""
    with _pending.lock:
        tally = _pending.queue_wait.get(outcome)
        if tally is None:
            tally = _pending.queue_wait[outcome] = _Tally(_BUCKETS)
        tally.add(seconds)


def observe_lag(seconds: float) -> None:
    """Record one measurement of the worker loop's lag."""
    with _pending.lock:
        _pending.lag.add(seconds)


def observe_feedback(judged: Iterable[tuple[str, str]]) -> None:
    """Count feedback events judged, each as its (kind, result)."""
    with _pending.lock:
        counts = _pending.feedback
        for labels in judged:
            counts[labels] = counts.get(labels, 0) + 1


def observe_impressions(recorded: int = 0, dropped: int = 0) -> None:
    """Count impressions written to the feedback store, and impressions dropped."""
    with _pending.lock:
        for outcome, count in (("recorded", recorded), ("dropped", dropped)):
            if count:
                _pending.impressions[outcome] = _pending.impressions.get(outcome, 0) + count


def observe_feedback_store_error(operation: str) -> None:
    """Count one failed feedback store call (rare: straight to the counter)."""
    FEEDBACK_STORE_ERRORS.labels(operation).inc()


def observe_impressions_waiting(count: int) -> None:
    """Publish how many impressions this worker holds unwritten after a flush."""
    IMPRESSIONS_WAITING.set(count)


def observe_learner_update() -> None:
    """Count one new version of the learnt weights saved."""
    with _pending.lock:
        _pending.learner_updates += 1


def observe_learned_weights(weights: Mapping[str, float]) -> None:
    """Publish the learnt weights now in use (rare: when the learner moves them)."""
    for name, weight in weights.items():
        LEARNED_WEIGHT.labels(name).set(weight)


# A gauge is written only when its value changes.
_published_breakers: dict[str, int] = {}


def observe_outcomes(outcomes: Iterable[Outcome], breaker_states: Mapping[str, str]) -> None:
    """Count each recommender's outcome and latency, and publish its breaker's state."""
    with _pending.lock:
        calls, call_seconds = _pending.calls, _pending.call_seconds
        for outcome in outcomes:
            key = (outcome.name, outcome.status)
            calls[key] = calls.get(key, 0) + 1
            if outcome.overload:
                excused = _pending.overload_timeouts
                excused[outcome.name] = excused.get(outcome.name, 0) + 1
            if outcome.attempts > 0:
                tally = call_seconds.get(outcome.name)
                if tally is None:
                    tally = call_seconds[outcome.name] = _Tally(_BUCKETS)
                tally.add(outcome.latency_ms / 1000)
    for outcome in outcomes:
        is_open = 0 if breaker_states.get(outcome.name, "closed") == "closed" else 1
        if _published_breakers.get(outcome.name) != is_open:
            _published_breakers[outcome.name] = is_open
            BREAKER_OPEN.labels(outcome.name).set(is_open)


def flush() -> None:
    """Hand what was recorded since the last flush to prometheus-client."""
    batch = _pending.take()
    for labels, count in batch.requests.items():
        REQUESTS.labels(*labels).inc(count)
    for labels, tally in batch.request_seconds.items():
        _add(REQUEST_SECONDS.labels(*labels), tally)
    for labels, count in batch.calls.items():
        CALLS.labels(*labels).inc(count)
    for name, tally in batch.call_seconds.items():
        _add(CALL_SECONDS.labels(name), tally)
    for name, count in batch.overload_timeouts.items():
        OVERLOAD_TIMEOUTS.labels(name).inc(count)
    for reason, count in batch.shed.items():
        SHED.labels(reason).inc(count)
    for outcome, tally in batch.queue_wait.items():
        _add(QUEUE_WAIT.labels(outcome), tally)
    if batch.lag.total or any(batch.lag.buckets):
        _add(LOOP_LAG, batch.lag)
    for labels, count in batch.feedback.items():
        FEEDBACK_EVENTS.labels(*labels).inc(count)
    for outcome, count in batch.impressions.items():
        IMPRESSIONS.labels(outcome).inc(count)
    if batch.learner_updates:
        LEARNER_UPDATES.inc(batch.learner_updates)


def _add(histogram: Histogram, tally: _Tally) -> None:
    # One write per bucket that moved and one for the sum, where `observe` would write twice
    # per observation. prometheus-client keeps a histogram's buckets uncumulated in `_buckets`
    # (as `observe` does); the tests read back every count and sum this writes.
    for index, count in enumerate(tally.buckets):
        if count:
            histogram._buckets[index].inc(count)
    histogram._sum.inc(tally.total)


def render() -> bytes:
    """The metrics in Prometheus text format, merged over workers when there are several.

    This worker's pending counts are flushed first; other workers' reach the files within
    `FLUSH_EVERY_S`.
    """
    flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)

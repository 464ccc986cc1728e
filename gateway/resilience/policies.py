"""Resilience for recommender calls: deadline-aware retries, circuit breakers and hedges.

Read top to bottom: the retry pieces, `RetryPolicy`, `CircuitBreaker` (and the
`SwitchedOffBreaker` that stands in when breakers are off), `Hedger`, and `Guard`, which
bundles one recommender's. Each takes plain values; `gateway.fanout.strategies.build_guards` makes
them from the settings, and `gateway.fanout.strategies` runs each call under its guard.

**Retries** are built from tenacity's pieces. A call is retried when its `RecommenderError`
says it is `retryable`: the connection failed or dropped, or the recommender answered 502, 503
or 504. A 4xx, a 500 or a body that is not JSON is not retried. Waits grow exponentially with
jitter, never shorter than the recommender's `Retry-After`. No attempt starts, or sleeps, past
the request's deadline. tenacity's `stop_after_delay` is checked only after a failed attempt,
so `stop_at_deadline` looks at the coming sleep too. tenacity's retryer decides (its `iter`);
the fan-out makes the attempts and takes the sleeps, with the policy's `sleep` or
`async_sleep`.

**Circuit breakers** keep one state per recommender, per worker process. After `threshold`
consecutive failed calls the breaker opens, and calls fail at once with `CircuitOpen`. After
`cooldown_s` one probe goes through (half-open): its success closes the breaker, its failure
opens it again. A recommender that hangs therefore stops costing every request the deadline.

**Hedges** send a slow call's attempt to a second replica as well, after a delay (configured,
or the recent p95), within a budget of extra calls; the first answer wins.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_exponential_jitter

from gateway.core.errors import CircuitOpen, RecommenderError
from gateway.core.outcome import MIN_CALL_BUDGET_S
from gateway.resilience.admission import LoopLag

__all__ = [
    "CircuitBreaker",
    "Guard",
    "Hedger",
    "RetryPolicy",
    "SwitchedOffBreaker",
]


def _is_retryable(error: BaseException) -> bool:
    return isinstance(error, RecommenderError) and error.retryable


_RETRY_IF_RETRYABLE = retry_if_exception(_is_retryable)


class _wait_for_retry_after(wait_base):
    """The inner wait, but never shorter than the failed attempt's `Retry-After`."""

    def __init__(self, inner: wait_base):
        self.inner = inner

    def __call__(self, retry_state: RetryCallState) -> float:
        wait: float = self.inner(retry_state)
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, RecommenderError) and error.retry_after_s is not None:
            return max(wait, error.retry_after_s)
        return wait


class stop_at_deadline(stop_base):
    """Stop when the coming sleep would leave too little of the deadline for another attempt."""

    def __init__(self, deadline_at: float):
        self.deadline_at = deadline_at

    def __call__(self, retry_state: RetryCallState) -> bool:
        left = self.deadline_at - time.perf_counter() - retry_state.upcoming_sleep
        return left < MIN_CALL_BUDGET_S


@dataclass(frozen=True)
class RetryPolicy:
    """How one recommender's calls are retried: tenacity decides, the caller waits."""

    attempts: int = 2
    initial_wait_s: float = 0.01
    max_wait_s: float = 0.2
    jitter_s: float = 0.01
    # Injected in tests, so that a retry test records its waits instead of sleeping.
    sleep: Callable[[float], Any] = time.sleep
    async_sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep

    def worth_retrying(self, error: BaseException) -> bool:
        """Whether a first failure like `error` may be retried at all under this policy."""
        return self.attempts > 1 and _is_retryable(error)

    @functools.cached_property
    def _wait(self) -> wait_base:
        return _wait_for_retry_after(
            wait_exponential_jitter(
                multiplier=self.initial_wait_s, max=self.max_wait_s, jitter=self.jitter_s
            )
        )

    def retrying(self, deadline_at: float) -> Retrying:
        """tenacity's retryer for one call that must end by `deadline_at` (perf_counter).

        Only its decisions are used (`iter`): the caller makes the attempts and the sleeps.
        """
        return Retrying(
            stop=stop_after_attempt(self.attempts) | stop_at_deadline(deadline_at),
            wait=self._wait,
            retry=_RETRY_IF_RETRYABLE,
            reraise=True,
        )


class CircuitBreaker:
    """One recommender's circuit breaker: closed, open, half-open after a cool-down.

    It opens after `threshold` consecutive failed calls. Thread-safe: the `threads` strategy
    reports from pool threads.
    """

    def __init__(
        self,
        name: str,
        threshold: int = 5,
        cooldown_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        """`closed`, `open` or `half_open`."""
        with self._lock:
            if self._opened_at is None:
                return "closed"
            if self._probing or self._clock() - self._opened_at >= self.cooldown_s:
                return "half_open"
            return "open"

    def before_call(self) -> None:
        """Let the call through, or raise `CircuitOpen`; in half-open, only one probe passes."""
        with self._lock:
            if self._opened_at is None:
                return
            waited = self._clock() - self._opened_at
            if waited >= self.cooldown_s and not self._probing:
                self._probing = True
                return
            if self._probing:
                reason = "circuit open; a probe call is under way"
            else:
                reason = (
                    f"circuit open after {self._failures} consecutive failures; "
                    f"next probe in {self.cooldown_s - waited:.1f} s"
                )
        raise CircuitOpen(self.name, reason)

    def succeeded(self) -> None:
        """A call answered: close the breaker."""
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probing = False

    def failed(self) -> None:
        """A call failed: count it, and open (or re-open) the breaker when due."""
        with self._lock:
            self._failures += 1
            if self._probing or self._failures >= self.threshold:
                self._opened_at = self._clock()
                self._probing = False

    def released(self) -> None:
        """A let-through call ended without a verdict (cancelled): free the probe slot."""
        with self._lock:
            self._probing = False


class SwitchedOffBreaker:
    """A breaker switched off (`breaker.enabled: false`): it never opens."""

    state = "closed"

    def before_call(self) -> None:
        """Every call goes through."""

    def succeeded(self) -> None:
        """Nothing to count."""

    def failed(self) -> None:
        """Nothing to count."""

    def released(self) -> None:
        """Nothing to free."""


class Hedger:
    """When one recommender's calls get a hedge, within a budget of extra calls.

    The hedge delay is `after_s` when configured, else the p95 of the last `window` answers
    (none until `min_samples` were seen). At most `max_extra_ratio` of the calls are hedged.
    """

    def __init__(
        self,
        after_s: float | None = None,
        max_extra_ratio: float = 0.1,
        min_samples: int = 20,
        window: int = 200,
    ):
        self.after_s = after_s
        self.max_extra_ratio = max_extra_ratio
        self.min_samples = min_samples
        self._latencies: collections.deque[float] = collections.deque(maxlen=window)
        self._p95: float | None = None
        self._since_p95 = 0
        self._lock = threading.Lock()
        self.calls = 0
        self.hedges = 0

    def delay_s(self) -> float | None:
        """How long to wait for the first replica before hedging; None: do not hedge."""
        return self.after_s if self.after_s is not None else self._p95

    def record(self, latency_s: float) -> None:
        """An answer came after `latency_s`; every 10 answers, refresh the p95."""
        with self._lock:
            self._latencies.append(latency_s)
            self._since_p95 += 1
            if len(self._latencies) >= self.min_samples and self._since_p95 >= 10:
                ordered = sorted(self._latencies)
                self._p95 = ordered[max(int(len(ordered) * 0.95) - 1, 0)]
                self._since_p95 = 0

    def count_call(self) -> None:
        """A call is starting (hedges are budgeted against calls)."""
        with self._lock:
            self.calls += 1

    def try_hedge(self) -> bool:
        """Take a hedge from the budget, if it allows one more."""
        with self._lock:
            if self.hedges + 1 > self.max_extra_ratio * self.calls:
                return False
            self.hedges += 1
            return True


@dataclass(frozen=True)
class Guard:
    """What protects one recommender's calls: retries, its circuit breaker, its hedging.

    `stalls` is the worker's loop-lag meter: a timeout during which the loop stalled for
    `excuse_stalled_share` of the call's time is the gateway's overload, and is not counted
    against the breaker (None: every timeout counts).
    """

    retry: RetryPolicy
    breaker: CircuitBreaker | SwitchedOffBreaker
    hedger: Hedger
    stalls: LoopLag | None = None
    excuse_stalled_share: float = 0.2

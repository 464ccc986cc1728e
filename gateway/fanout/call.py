"""One recommender's call: its attempts, retries and hedges, within the request's deadline.

Each call is one `_Call`, a state machine that decides what comes next and never waits
itself, as tenacity's `BaseRetrying.iter` does for its `Retrying` and `AsyncRetrying`:

1. begin: skipped if the deadline leaves no time, refused if the circuit breaker is open;
2. attempt, within the smaller of the recommender's timeout and what is left of the deadline;
3. on a failure its `RecommenderError` says is retryable, and if the policy allows more
   attempts, retry: from that failure on, tenacity decides each wait (never shorter than the
   recommender's `Retry-After`) and when to stop. No attempt starts, or sleeps, past the
   deadline; a call that answers at once never pays for tenacity;
4. settle: the breaker is told how the call went, unless the end was not the recommender's
   doing (a timeout while the worker's loop stalled: the gateway's overload; a bug in the
   gateway; a cancelled request), and the call becomes its `Outcome`.

Two drivers make the attempts and take the sleeps (the policy's `async_sleep` or `sleep`):
`call_recommender` on the worker loop, each attempt hedged to a second replica when it is
slow (`_hedged`), and `call_recommender_blocking` from a pool thread.

Whatever happens, a call never raises for it (but for its own cancellation): it becomes its
recommender's `Outcome`. The fan-out strategies (`gateway.fanout.strategies`) run one call per
recommender.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from tenacity import DoSleep, RetryCallState

from gateway.core.errors import CircuitOpen, RecommenderError, RecommenderTimeout
from gateway.core.outcome import MIN_CALL_BUDGET_S, Deadline, Outcome
from gateway.observability.tracing import Tracing
from gateway.recommenders.clients import (
    AnswerLimits,
    BlockingRecommenderClient,
    RecommenderClient,
    Replicas,
)
from gateway.resilience.policies import Guard, Hedger

__all__ = ["call_recommender", "call_recommender_blocking"]

log = logging.getLogger("gateway")


class _DeadlinePassed(RecommenderTimeout):
    """Too little of the deadline is left for another attempt."""


class _Attempt(NamedTuple):
    """Make an attempt within `budget_s`, after `resend_count` earlier ones."""

    budget_s: float
    resend_count: int


class _Sleep(NamedTuple):
    """Wait `seconds` before the next attempt."""

    seconds: float


# What a call's driver does next: an attempt, a sleep, or nothing more (the call's outcome).
_Action = _Attempt | _Sleep | Outcome


class _Call:
    """One recommender call's state machine: it decides what comes next, its driver does it.

    `start()` begins the call; after an attempt the driver reports `answered(prediction)` or
    `failed(error)`, after a sleep `slept()`, and `cancelled()` if the request is. Each returns
    what to do next: an `_Attempt`, a `_Sleep`, or the call's `Outcome` once it is over (its
    breaker told, if it let the call through). tenacity's `BaseRetrying.iter` decides retries.
    """

    def __init__(self, name: str, timeout_s: float, guard: Guard, deadline: Deadline):
        self.name = name
        self.timeout_s = timeout_s
        self.guard = guard
        self.deadline = deadline
        self.started = time.perf_counter()
        self.stall_mark = guard.stalls.mark() if guard.stalls else 0.0  # the loop's, at start
        self.attempts = 0
        # Whether the request's deadline, not the call's own timeout, bounds the last attempt,
        # and that attempt's budget.
        self.by_deadline = False
        self.budget_s = timeout_s
        # tenacity's state of the retries, from the first failure worth retrying on.
        self._retries: RetryCallState | None = None

    def start(self) -> _Attempt | Outcome:
        """The first attempt, or the outcome of a call that must not be made."""
        if self.deadline.at - time.perf_counter() < MIN_CALL_BUDGET_S:
            return Deadline.passed(self.name)
        try:
            self.guard.breaker.before_call()
        except CircuitOpen as exc:
            return self._outcome_of(exc)
        return self._next_attempt()

    def answered(self, prediction: Any) -> Outcome:
        """The outcome of a call whose attempt answered."""
        self.guard.breaker.succeeded()
        return Outcome(self.name, "ok", self._elapsed_ms(), prediction, attempts=self.attempts)

    def failed(self, error: Exception) -> _Sleep | Outcome:
        """After a failed attempt: the wait before the next one, or the call's outcome."""
        retries = self._retries
        if retries is None:
            # Retries only: tenacity costs ~25 µs a call, too much for every first attempt.
            if not self.guard.retry.worth_retrying(error):
                return self._settled(error)
            retrying = self.guard.retry.retrying(self.deadline.at)
            retrying.begin()
            retries = self._retries = RetryCallState(retrying, None, (), {})
        retries.set_exception((type(error), error, error.__traceback__))
        try:
            do = retries.retry_object.iter(retries)
        except Exception as last:  # tenacity gives up by raising the last failure again
            return self._settled(last)
        assert isinstance(do, DoSleep)  # after a failure, tenacity sleeps or gives up
        retries.prepare_for_next_attempt()
        return _Sleep(float(do))

    def slept(self) -> _Attempt | Outcome:
        """After the wait: the next attempt, if the deadline leaves time for it."""
        return self._next_attempt()

    def cancelled(self) -> None:
        """The request was cancelled mid-call: no verdict for the breaker."""
        self.guard.breaker.released()

    def _next_attempt(self) -> _Attempt | Outcome:
        remaining = self.deadline.at - time.perf_counter()
        if remaining < MIN_CALL_BUDGET_S:
            self.by_deadline = True
            return self._settled(_DeadlinePassed(self.name, "deadline passed between attempts"))
        self.attempts += 1
        self.by_deadline = remaining < self.timeout_s
        self.budget_s = min(self.timeout_s, remaining)
        return _Attempt(self.budget_s, self.attempts - 1)

    def _settled(self, error: Exception) -> Outcome:
        """Tell the breaker how the call failed (a gateway bug is not the recommender's)."""
        guard = self.guard
        if isinstance(error, RecommenderTimeout) and guard.stalls is not None:
            # Did the recommender get its budget? Not if the loop that would have read its answer
            # was stalled for a good part of it: then the timeout is the gateway's own queueing.
            stalled = guard.stalls.stalled_since(self.stall_mark)
            if stalled >= guard.excuse_stalled_share * (time.perf_counter() - self.started):
                guard.breaker.released()
                return self._overloaded(stalled)
        if isinstance(error, RecommenderTimeout) and self.by_deadline:
            # Nor did it if the deadline left this attempt short of the call's own timeout
            # mostly because the request first waited for admission: that wait was the
            # gateway's (time spent on earlier attempts was the recommender's).
            shortfall = self.timeout_s - self.budget_s
            lost = min(self.deadline.queued_s, shortfall)
            if lost > 0 and lost >= shortfall / 2:
                guard.breaker.released()
                return self._queued(lost)
        if isinstance(error, RecommenderError):
            guard.breaker.failed()
        else:
            guard.breaker.released()
        return self._outcome_of(error)

    def _elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 1)

    def _queued(self, lost_s: float) -> Outcome:
        """The outcome of a call cut short by the time its request waited for admission."""
        return self._excused(
            f"{lost_s * 1000:.0f} ms short of its timeout: the request waited that long in this "
            "gateway worker's admission queue"
        )

    def _overloaded(self, stalled_s: float) -> Outcome:
        """The outcome of a call that timed out while the worker itself was overloaded."""
        return self._excused(
            f"while this gateway worker was overloaded (its event loop stalled "
            f"{stalled_s * 1000:.0f} ms of them)"
        )

    def _excused(self, why: str) -> Outcome:
        """A timeout that was the gateway's own overload: reported, not the recommender's."""
        latency_ms = self._elapsed_ms()
        reason = f"no answer within {latency_ms:.0f} ms, {why}; not counted against the recommender"
        return Outcome(
            self.name, "timeout", latency_ms, error=reason, attempts=self.attempts, overload=True
        )

    def _outcome_of(self, error: BaseException) -> Outcome:
        """The outcome of a call that ended with `error`."""
        latency_ms = self._elapsed_ms()
        if isinstance(error, RecommenderTimeout) and self.by_deadline:
            return self.deadline.missed(self.name, latency_ms, self.attempts)
        if isinstance(error, RecommenderError):
            return Outcome(
                self.name, error.status, latency_ms, error=error.reason, attempts=self.attempts
            )
        # A bug in the gateway must not turn one recommender's call into a gateway 500.
        log.error("unexpected error calling recommender %s", self.name, exc_info=error)
        return Outcome(
            self.name,
            "error",
            latency_ms,
            error="gateway error during the call",
            attempts=self.attempts,
        )


async def _ask(
    client: RecommenderClient,
    tracing: Tracing,
    resend_count: int,
    body: bytes,
    headers: Mapping[str, str],
    budget: float,
    limits: AnswerLimits,
    hedge: bool = False,
) -> Any:
    """One HTTP attempt at one replica, in a span of its own whose context it sends."""
    with tracing.attempt(client.name, client.url, resend_count, hedge) as span:
        return await client.recommend(body, span.headers(headers), budget, limits, span.answered)


def _ask_blocking(
    client: BlockingRecommenderClient,
    tracing: Tracing,
    resend_count: int,
    body: bytes,
    headers: Mapping[str, str],
    budget: float,
    limits: AnswerLimits,
) -> Any:
    """`_ask`, from a thread."""
    with tracing.attempt(client.name, client.url, resend_count, False) as span:
        return client.recommend(body, span.headers(headers), budget, limits, span.answered)


async def _hedged(
    replicas: Replicas[RecommenderClient],
    hedger: Hedger,
    tracing: Tracing,
    attempt: _Attempt,
    body: bytes,
    headers: Mapping[str, str],
    limits: AnswerLimits,
) -> Any:
    """One attempt: the replica whose turn it is, and a hedge to another if it is slow."""
    primary, backup = replicas.pick()
    budget, resend_count = attempt
    ask = functools.partial(_ask, tracing=tracing, resend_count=resend_count, body=body)
    if backup is None:
        # One replica: nothing to hedge to, so nothing to count or time for it either.
        return await ask(primary, headers=headers, budget=budget, limits=limits)
    hedger.count_call()
    delay = hedger.delay_s()
    started = time.perf_counter()
    if delay is None or delay >= budget:
        prediction = await ask(primary, headers=headers, budget=budget, limits=limits)
        hedger.record(time.perf_counter() - started)
        return prediction
    first = asyncio.ensure_future(ask(primary, headers=headers, budget=budget, limits=limits))
    pending: set[asyncio.Future[Any]] = {first}
    try:
        done, pending = await asyncio.wait(pending, timeout=delay)
        if not done and hedger.try_hedge():
            hedge = ask(backup, headers=headers, budget=budget - delay, limits=limits, hedge=True)
            pending.add(asyncio.ensure_future(hedge))
        error: BaseException | None = None
        while True:
            for task in done:
                if task.exception() is None:
                    hedger.record(time.perf_counter() - started)
                    return task.result()
                error = error or task.exception()
            if not pending:
                break
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        # Every replica asked failed: report the first failure.
        assert error is not None
        raise error
    finally:
        # The loser (or both, if the request was cancelled) must not run on.
        for task in pending:
            task.cancel()


async def call_recommender(
    replicas: Replicas[RecommenderClient],
    guard: Guard,
    limits: AnswerLimits,
    body: bytes,
    headers: Mapping[str, str],
    deadline: Deadline,
    tracing: Tracing,
) -> Outcome:
    """One recommender's call under its guard, in a span that parents its attempts."""
    with tracing.call(replicas.name) as span:
        call = _Call(replicas.name, replicas.timeout_s, guard, deadline)
        try:
            do: _Action = call.start()
            while not isinstance(do, Outcome):
                if isinstance(do, _Sleep):
                    await guard.retry.async_sleep(do.seconds)
                    do = call.slept()
                    continue
                try:
                    prediction = await _hedged(
                        replicas, guard.hedger, tracing, do, body, headers, limits
                    )
                except Exception as error:
                    do = call.failed(error)
                else:
                    do = call.answered(prediction)
        except asyncio.CancelledError:
            call.cancelled()
            raise
        span.finished(do.status, do.attempts, do.error)
        return do


def call_recommender_blocking(
    replicas: Replicas[BlockingRecommenderClient],
    guard: Guard,
    limits: AnswerLimits,
    body: bytes,
    headers: Mapping[str, str],
    deadline: Deadline,
    tracing: Tracing,
) -> Outcome:
    """`call_recommender`, from a thread: the replica whose turn it is, no hedge."""
    with tracing.call(replicas.name) as span:
        call = _Call(replicas.name, replicas.timeout_s, guard, deadline)
        do: _Action = call.start()
        while not isinstance(do, Outcome):
            if isinstance(do, _Sleep):
                guard.retry.sleep(do.seconds)
                do = call.slept()
                continue
            try:
                prediction = _ask_blocking(
                    replicas.pick()[0], tracing, do.resend_count, body, headers, do.budget_s, limits
                )
            except Exception as error:
                do = call.failed(error)
            else:
                do = call.answered(prediction)
        span.finished(do.status, do.attempts, do.error)
        return do

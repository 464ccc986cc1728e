"""Fan-out strategies: how one request reaches every recommender, each call bounded by the deadline.

Three strategies share one interface, `FanOut`, and are chosen by name (`strategy:` in the
config) from `STRATEGIES`:

- ``async``: `asyncio.gather` of one call per recommender over the worker's shared aiohttp
  session: all calls in flight at once on the worker loop (the default);
- ``threads``: one blocking call per recommender in a `ThreadPoolExecutor` that lives as long
  as the worker, over a `gateway.blocking.BlockingPool` (each call, and so each thread, held
  no longer than the call's budget);
- ``sequential``: one recommender after another, over the same shared aiohttp session.

Whatever happens to a call, a fan-out never raises for it: every configured recommender
yields an `Outcome`, in config order. Every call reads its answer within its recommender's
`AnswerLimits` (`max_answer_bytes`, `max_items`, `max_json_depth`). Each call, and each of its
attempts, is a span of the request's trace when tracing is on (`gateway.tracing`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Protocol

from gateway.admission import LoopLag
from gateway.blocking import BlockingPool
from gateway.clients import (
    DEFAULT_LIMITS,
    AnswerLimits,
    BlockingRecommenderClient,
    RecommenderClient,
    Replicas,
)
from gateway.config import Settings
from gateway.errors import CircuitOpen, RecommenderError, RecommenderTimeout
from gateway.outcome import MIN_CALL_BUDGET_S, Deadline, Outcome
from gateway.resilience import CircuitBreaker, Guard, Hedger, RetryPolicy, SwitchedOffBreaker
from gateway.tracing import NO_TRACING, Tracing

__all__ = [
    "STRATEGIES",
    "AsyncFanOut",
    "FanOut",
    "SequentialFanOut",
    "ThreadPoolFanOut",
    "answer_limits",
    "build_fan_out",
    "build_guards",
]

log = logging.getLogger("gateway")


class FanOut(Protocol):
    """Calls every recommender with one request and reports each one's outcome."""

    name: ClassVar[str]

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        recommenders: Sequence[Replicas[RecommenderClient]],
        guards: Mapping[str, Guard],
        tracing: Tracing = NO_TRACING,
    ) -> FanOut:
        """Build the strategy over the worker's clients, each call under its guard, traced."""
        ...

    async def fan_out(
        self, body: bytes, headers: Mapping[str, str], deadline: Deadline
    ) -> list[Outcome]:
        """Call every recommender; return their outcomes in config order, never raising."""
        ...

    async def close(self) -> None:
        """Release what the strategy holds (threads, sessions)."""
        ...


class _DeadlinePassed(RecommenderTimeout):
    """Too little of the deadline is left for another attempt."""


class _CallRecord:
    """One recommender call's bookkeeping: its attempts, its clock, and its `Outcome`."""

    def __init__(self, name: str, timeout_s: float, deadline: Deadline, stall_mark: float = 0.0):
        self.name = name
        self.timeout_s = timeout_s
        self.deadline = deadline
        self.started = time.perf_counter()
        self.attempts = 0
        self.by_deadline = False
        self.stall_mark = stall_mark  # the worker loop's stalled time when the call began

    @property
    def hopeless(self) -> bool:
        """Whether too little time is left to start the call at all."""
        return self.deadline.at - time.perf_counter() < MIN_CALL_BUDGET_S

    def next_attempt(self) -> float:
        """Count an attempt and return its time budget: its timeout, or what is left."""
        remaining = self.deadline.at - time.perf_counter()
        if remaining < MIN_CALL_BUDGET_S:
            self.by_deadline = True
            raise _DeadlinePassed(self.name, "deadline passed between attempts")
        self.attempts += 1
        # Whether the request's deadline, not the call's own timeout, bounds this attempt.
        self.by_deadline = remaining < self.timeout_s
        return min(self.timeout_s, remaining)

    def _elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 1)

    def skipped(self) -> Outcome:
        """The outcome of a call never started."""
        return Outcome(self.name, "timeout", 0.0, error="deadline already passed")

    def succeeded(self, prediction: Any) -> Outcome:
        """The outcome of a call that answered."""
        return Outcome(self.name, "ok", self._elapsed_ms(), prediction, attempts=self.attempts)

    def overloaded(self, stalled_s: float) -> Outcome:
        """The outcome of a call that timed out while the worker itself was overloaded."""
        latency_ms = self._elapsed_ms()
        reason = (
            f"no answer within {latency_ms:.0f} ms, while this gateway worker was overloaded "
            f"(its event loop stalled {stalled_s * 1000:.0f} ms of them); "
            "not counted against the recommender"
        )
        return Outcome(
            self.name, "timeout", latency_ms, error=reason, attempts=self.attempts, overload=True
        )

    def failed(self, error: BaseException) -> Outcome:
        """The outcome of a call that raised `error` (after its last attempt)."""
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


def _begin_call(
    name: str, timeout_s: float, guard: Guard, deadline: Deadline
) -> _CallRecord | Outcome:
    """Start a call's bookkeeping, or the outcome of a call that must not be made."""
    call = _CallRecord(name, timeout_s, deadline, guard.stalls.mark() if guard.stalls else 0.0)
    if call.hopeless:
        return call.skipped()
    try:
        guard.breaker.before_call()
    except CircuitOpen as exc:
        return call.failed(exc)
    return call


def _settle_call(
    call: _CallRecord, guard: Guard, error: BaseException | None, prediction: Any
) -> Outcome:
    """Tell the breaker how the call went (a gateway bug is not the recommender's failure)."""
    if error is None:
        guard.breaker.succeeded()
        return call.succeeded(prediction)
    if isinstance(error, RecommenderTimeout) and guard.stalls is not None:
        # Did the recommender get its budget? Not if the loop that would have read its answer
        # was stalled for a good part of it: then the timeout is the gateway's own queueing.
        stalled = guard.stalls.stalled_since(call.stall_mark)
        if stalled >= guard.excuse_stalled_share * (time.perf_counter() - call.started):
            guard.breaker.released()
            return call.overloaded(stalled)
    if isinstance(error, RecommenderError):
        guard.breaker.failed()
    else:
        guard.breaker.released()
    return call.failed(error)


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
    resend_count: int,
    body: bytes,
    headers: Mapping[str, str],
    budget: float,
    limits: AnswerLimits,
) -> Any:
    """One attempt: the replica whose turn it is, and a hedge to another if it is slow."""
    primary, backup = replicas.pick()
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


async def _call_recommender(
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
        outcome = await _guarded(replicas, guard, limits, body, headers, deadline, tracing)
        span.finished(outcome.status, outcome.attempts, outcome.error)
        return outcome


async def _guarded(
    replicas: Replicas[RecommenderClient],
    guard: Guard,
    limits: AnswerLimits,
    body: bytes,
    headers: Mapping[str, str],
    deadline: Deadline,
    tracing: Tracing,
) -> Outcome:
    call = _begin_call(replicas.name, replicas.timeout_s, guard, deadline)
    if isinstance(call, Outcome):
        return call
    try:
        try:
            budget = call.next_attempt()
            prediction = await _hedged(
                replicas, guard.hedger, tracing, 0, body, headers, budget, limits
            )
        except RecommenderError as first:
            if not guard.retry.worth_retrying(first):
                raise
            # Retries only: tenacity costs ~25 µs a call, too much for every first attempt.
            # The first failure is replayed as attempt 1, so waits and stops count from it.
            async for attempt in guard.retry.async_retrying(deadline.at):
                with attempt:
                    if attempt.retry_state.attempt_number == 1:
                        raise first
                    budget = call.next_attempt()
                    resend_count = call.attempts - 1
                    prediction = await _hedged(
                        replicas, guard.hedger, tracing, resend_count, body, headers, budget, limits
                    )
    except asyncio.CancelledError:
        guard.breaker.released()
        raise
    except Exception as exc:
        return _settle_call(call, guard, exc, None)
    return _settle_call(call, guard, None, prediction)


def _call_recommender_blocking(
    replicas: Replicas[BlockingRecommenderClient],
    guard: Guard,
    limits: AnswerLimits,
    body: bytes,
    headers: Mapping[str, str],
    deadline: Deadline,
    tracing: Tracing,
) -> Outcome:
    """`_call_recommender`, from a thread."""
    with tracing.call(replicas.name) as span:
        outcome = _guarded_blocking(replicas, guard, limits, body, headers, deadline, tracing)
        span.finished(outcome.status, outcome.attempts, outcome.error)
        return outcome


def _guarded_blocking(
    replicas: Replicas[BlockingRecommenderClient],
    guard: Guard,
    limits: AnswerLimits,
    body: bytes,
    headers: Mapping[str, str],
    deadline: Deadline,
    tracing: Tracing,
) -> Outcome:
    call = _begin_call(replicas.name, replicas.timeout_s, guard, deadline)
    if isinstance(call, Outcome):
        return call
    ask = functools.partial(_ask_blocking, tracing=tracing, body=body, headers=headers)
    try:
        try:
            budget = call.next_attempt()
            prediction = ask(replicas.pick()[0], resend_count=0, budget=budget, limits=limits)
        except RecommenderError as first:
            if not guard.retry.worth_retrying(first):
                raise
            for attempt in guard.retry.retrying(deadline.at):
                with attempt:
                    if attempt.retry_state.attempt_number == 1:
                        raise first
                    budget = call.next_attempt()
                    prediction = ask(
                        replicas.pick()[0],
                        resend_count=call.attempts - 1,
                        budget=budget,
                        limits=limits,
                    )
    except Exception as exc:
        return _settle_call(call, guard, exc, None)
    return _settle_call(call, guard, None, prediction)


class _OverSharedSession:
    """Base of the strategies that call through the worker's shared aiohttp session."""

    name: ClassVar[str]

    def __init__(
        self,
        recommenders: Sequence[Replicas[RecommenderClient]],
        guards: Mapping[str, Guard],
        limits: Mapping[str, AnswerLimits] | None = None,
        tracing: Tracing = NO_TRACING,
    ):
        self.tracing = tracing
        self.guarded = tuple(
            (replicas, guards[replicas.name], (limits or {}).get(replicas.name, DEFAULT_LIMITS))
            for replicas in recommenders
        )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        recommenders: Sequence[Replicas[RecommenderClient]],
        guards: Mapping[str, Guard],
        tracing: Tracing = NO_TRACING,
    ) -> FanOut:
        """Fan out over the worker's aiohttp clients."""
        return cls(recommenders, guards, answer_limits(settings), tracing)

    async def fan_out(
        self, body: bytes, headers: Mapping[str, str], deadline: Deadline
    ) -> list[Outcome]:
        """Call every recommender; return their outcomes in config order, never raising."""
        raise NotImplementedError

    async def close(self) -> None:
        """Nothing of its own: the session belongs to the runtime."""


class AsyncFanOut(_OverSharedSession):
    """All calls at once: `asyncio.gather` over the shared aiohttp session."""

    name: ClassVar[str] = "async"

    async def fan_out(
        self, body: bytes, headers: Mapping[str, str], deadline: Deadline
    ) -> list[Outcome]:
        """Call every recommender concurrently on the worker loop."""
        calls = (
            _call_recommender(replicas, guard, limits, body, headers, deadline, self.tracing)
            for replicas, guard, limits in self.guarded
        )
        return list(await asyncio.gather(*calls))


class SequentialFanOut(_OverSharedSession):
    """One recommender after another, over the shared aiohttp session."""

    name: ClassVar[str] = "sequential"

    async def fan_out(
        self, body: bytes, headers: Mapping[str, str], deadline: Deadline
    ) -> list[Outcome]:
        """Call each recommender in turn; those the deadline leaves no time for time out."""
        return [
            await _call_recommender(replicas, guard, limits, body, headers, deadline, self.tracing)
            for replicas, guard, limits in self.guarded
        ]


class ThreadPoolFanOut:
    """One blocking call per recommender in a thread pool that lives as long as the worker."""

    name: ClassVar[str] = "threads"

    def __init__(
        self,
        settings: Settings,
        guards: Mapping[str, Guard],
        max_threads: int,
        tracing: Tracing = NO_TRACING,
    ):
        self.tracing = tracing
        self._pool = BlockingPool(
            limit_per_host=settings.pool.limit_per_host,
            keepalive_timeout_s=settings.pool.keepalive_timeout_s,
        )
        self.clients = tuple(
            BlockingRecommenderClient(r.name, url, self._pool, settings.timeout_s(r), r.idempotent)
            for r in settings.recommenders
            for url in r.replicas
        )
        limits = answer_limits(settings)
        self.guarded = tuple(
            (
                Replicas([c for c in self.clients if c.name == r.name]),
                guards[r.name],
                limits[r.name],
            )
            for r in settings.recommenders
        )
        self._executor = ThreadPoolExecutor(max_threads, thread_name_prefix="gateway-fan-out")

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        recommenders: Sequence[Replicas[RecommenderClient]],
        guards: Mapping[str, Guard],
        tracing: Tracing = NO_TRACING,
    ) -> FanOut:
        """A pool of `settings.fan_out_threads` threads and its own connections."""
        return cls(settings, guards, settings.fan_out_threads, tracing)

    async def fan_out(
        self, body: bytes, headers: Mapping[str, str], deadline: Deadline
    ) -> list[Outcome]:
        """Submit every call to the pool and wait for them, at most until the deadline."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        # Each call in a copy of this task's context (as `asyncio.to_thread` does): its span
        # is then a child of the request's.
        futures = [
            loop.run_in_executor(
                self._executor,
                contextvars.copy_context().run,
                functools.partial(
                    _call_recommender_blocking,
                    replicas,
                    guard,
                    limits,
                    body,
                    headers,
                    deadline,
                    self.tracing,
                ),
            )
            for replicas, guard, limits in self.guarded
        ]
        await asyncio.wait(futures, timeout=max(deadline.remaining_s(), 0))
        outcomes = []
        for (replicas, _, _), future in zip(self.guarded, futures, strict=True):
            if future.done():
                outcomes.append(future.result())
            else:
                # The thread runs on until its call's budget, which the deadline bounds, ends.
                future.cancel()
                elapsed = round((time.perf_counter() - started) * 1000, 1)
                outcomes.append(deadline.missed(replicas.name, elapsed))
        return outcomes

    async def close(self) -> None:
        """Stop the pool (without waiting for stragglers) and close its connections."""
        for client in self.clients:
            client.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._pool.close()


def answer_limits(settings: Settings) -> dict[str, AnswerLimits]:
    """Each recommender's `AnswerLimits`, from its settings and the JSON depth limit."""
    return {
        r.name: AnswerLimits(r.max_answer_bytes, r.max_items, settings.max_json_depth)
        for r in settings.recommenders
    }


STRATEGIES: dict[str, type[FanOut]] = {
    strategy.name: strategy for strategy in (AsyncFanOut, ThreadPoolFanOut, SequentialFanOut)
}


def build_fan_out(
    settings: Settings,
    recommenders: Sequence[Replicas[RecommenderClient]],
    guards: Mapping[str, Guard],
    tracing: Tracing = NO_TRACING,
) -> FanOut:
    """The fan-out strategy `settings.strategy` names, each call under its recommender's guard."""
    return STRATEGIES[settings.strategy].from_settings(settings, recommenders, guards, tracing)


def build_guards(settings: Settings, stalls: LoopLag | None = None) -> dict[str, Guard]:
    """A fresh guard (retry policy, closed breaker, hedger) per configured recommender.

    `stalls`: the worker's loop-lag meter, which excuses the timeouts of an overloaded worker.
    """
    waits = settings.retry
    return {
        r.name: Guard(
            RetryPolicy(
                attempts=r.attempts,
                initial_wait_s=waits.initial_wait_ms / 1000,
                max_wait_s=waits.max_wait_ms / 1000,
                jitter_s=waits.jitter_ms / 1000,
            ),
            CircuitBreaker(r.name, settings.breaker.failure_threshold, settings.breaker.cooldown_s)
            if settings.breaker.enabled
            else SwitchedOffBreaker(),
            Hedger(
                r.hedge_after_ms / 1000 if r.hedge_after_ms is not None else None,
                settings.hedging.max_extra_ratio,
                settings.hedging.min_samples,
                settings.hedging.window,
            ),
            stalls,
            settings.breaker.excuse_stalled_share,
        )
        for r in settings.recommenders
    }

"""Fan-out strategies: how one request reaches every recommender, each call bounded by the deadline.

Three strategies share one interface, `FanOut`, and are chosen by name (`strategy:` in the
config) from `STRATEGIES`:

- ``async``: `asyncio.gather` of one call per recommender over the worker's shared aiohttp
  session: all calls in flight at once on the worker loop (the default);
- ``threads``: one blocking call per recommender in a `ThreadPoolExecutor` that lives as long
  as the worker, over a `gateway.blocking.BlockingPool` (each call, and so each thread, held
  no longer than the call's budget);
- ``sequential``: one recommender after another, over the same shared aiohttp session.

`build_guards` makes each recommender's `gateway.resilience.Guard` from the settings, and
`build_fan_out` the strategy, each call under its recommender's guard.

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
`_call_recommender` on the worker loop, each attempt hedged to a second replica when it is
slow (`_hedged`), and `_call_recommender_blocking` from a pool thread.

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
from typing import Any, ClassVar, NamedTuple, Protocol

from tenacity import DoSleep, RetryCallState

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
        # Whether the request's deadline, not the call's own timeout, bounds the last attempt.
        self.by_deadline = False
        # tenacity's state of the retries, from the first failure worth retrying on.
        self._retries: RetryCallState | None = None

    def start(self) -> _Attempt | Outcome:
        """The first attempt, or the outcome of a call that must not be made."""
        if self.deadline.at - time.perf_counter() < MIN_CALL_BUDGET_S:
            return Outcome(self.name, "timeout", 0.0, error="deadline already passed")
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
        return _Attempt(min(self.timeout_s, remaining), self.attempts - 1)

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
        if isinstance(error, RecommenderError):
            guard.breaker.failed()
        else:
            guard.breaker.released()
        return self._outcome_of(error)

    def _elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 1)

    def _overloaded(self, stalled_s: float) -> Outcome:
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


def _call_recommender_blocking(
    replicas: Replicas[BlockingRecommenderClient],
    guard: Guard,
    limits: AnswerLimits,
    body: bytes,
    headers: Mapping[str, str],
    deadline: Deadline,
    tracing: Tracing,
) -> Outcome:
    """`_call_recommender`, from a thread: the replica whose turn it is, no hedge."""
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

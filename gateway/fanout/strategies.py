"""Fan-out strategies: how one request reaches every recommender, each call bounded by the deadline.

Three strategies share one interface, `FanOut`, and are chosen by name (`strategy:` in the
config) from `STRATEGIES`:

- ``async``: `asyncio.gather` of one call per recommender over the worker's aiohttp session
  (`gateway.recommenders.async_http`): all calls in flight at once on the worker loop (the default);
- ``threads``: one blocking call per recommender over requests
  (`gateway.recommenders.blocking_http`: a session per thread), in a `ThreadPoolExecutor` that lives
  as long as the worker; each call,
  and so each thread, held no longer than the call's budget;
- ``sequential``: one recommender after another, over requests too, in one job of that pool
  per request: the calls wait in turn, the worker loop does not.

`build_guards` makes each recommender's `gateway.resilience.policies.Guard` from the settings, and
`build_fan_out` the strategy, each call under its recommender's guard.

Each recommender's call, its retries, hedges and settling, is `gateway.fanout.call`'s.

Whatever happens to a call, a fan-out never raises for it: every configured recommender
yields an `Outcome`, in config order. Every call reads its answer within its recommender's
`AnswerLimits` (`max_answer_bytes`, `max_items`, `max_json_depth`). Each call, and each of its
attempts, is a span of the request's trace when tracing is on (`gateway.observability.tracing`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, Protocol, TypeVar

from gateway.config.settings import Settings
from gateway.core.outcome import Deadline, Outcome
from gateway.fanout.call import call_recommender, call_recommender_blocking
from gateway.observability.tracing import NO_TRACING, Tracing
from gateway.recommenders.blocking_http import ThreadSessions
from gateway.recommenders.clients import (
    DEFAULT_LIMITS,
    AnswerLimits,
    BlockingRecommenderClient,
    RecommenderClient,
    Replicas,
)
from gateway.resilience.admission import LoopLag
from gateway.resilience.policies import (
    CircuitBreaker,
    Guard,
    Hedger,
    RetryPolicy,
    SwitchedOffBreaker,
)

T = TypeVar("T")

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
        user_agent: str = "fusion-gateway",
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


class AsyncFanOut:
    """All calls at once: `asyncio.gather` over the worker's aiohttp session."""

    name: ClassVar[str] = "async"

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
        user_agent: str = "fusion-gateway",
    ) -> FanOut:
        """Fan out over the worker's session (which sends its own User-Agent)."""
        return cls(recommenders, guards, answer_limits(settings), tracing)

    async def fan_out(
        self, body: bytes, headers: Mapping[str, str], deadline: Deadline
    ) -> list[Outcome]:
        """Call every recommender concurrently on the worker loop."""
        calls = (
            call_recommender(replicas, guard, limits, body, headers, deadline, self.tracing)
            for replicas, guard, limits in self.guarded
        )
        return list(await asyncio.gather(*calls))

    async def close(self) -> None:
        """Nothing of its own: the session belongs to the runtime."""


class _OverThreads:
    """Base of the strategies that call over requests from a pool of threads."""

    name: ClassVar[str]

    def __init__(
        self,
        settings: Settings,
        guards: Mapping[str, Guard],
        max_threads: int,
        tracing: Tracing = NO_TRACING,
        user_agent: str = "fusion-gateway",
    ):
        self.tracing = tracing
        self._sessions = ThreadSessions(
            limit_per_host=settings.pool.limit_per_host,
            keepalive_timeout_s=settings.pool.keepalive_timeout_s,
            user_agent=user_agent,
            ca_file=str(settings.pool.ca_file) if settings.pool.ca_file else None,
        )
        self.clients = tuple(
            BlockingRecommenderClient(
                r.name,
                url,
                self._sessions,
                settings.timeout_s(r),
                r.idempotent,
                r.wire_protocol(),
                r.headers,
            )
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
        user_agent: str = "fusion-gateway",
    ) -> FanOut:
        """A pool of `settings.fan_out_threads` threads, each with its own requests session."""
        return cls(settings, guards, settings.fan_out_threads, tracing, user_agent)

    def _submit(self, job: Callable[[], T]) -> asyncio.Future[T]:
        # In a copy of this task's context (as `asyncio.to_thread` does): the calls' spans are
        # then children of the request's.
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, contextvars.copy_context().run, job)

    def _call(
        self,
        replicas: Replicas[BlockingRecommenderClient],
        guard: Guard,
        limits: AnswerLimits,
        body: bytes,
        headers: Mapping[str, str],
        deadline: Deadline,
    ) -> Outcome:
        return call_recommender_blocking(
            replicas, guard, limits, body, headers, deadline, self.tracing
        )

    async def fan_out(
        self, body: bytes, headers: Mapping[str, str], deadline: Deadline
    ) -> list[Outcome]:
        """Call every recommender; return their outcomes in config order, never raising."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop the pool (without waiting for stragglers) and close the sessions."""
        for client in self.clients:
            client.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._sessions.close()


class ThreadPoolFanOut(_OverThreads):
    """One blocking call per recommender in a thread pool that lives as long as the worker."""

    name: ClassVar[str] = "threads"

    async def fan_out(
        self, body: bytes, headers: Mapping[str, str], deadline: Deadline
    ) -> list[Outcome]:
        """Submit every call to the pool and wait for them, at most until the deadline."""
        started = time.perf_counter()
        futures = [
            self._submit(
                functools.partial(self._call, replicas, guard, limits, body, headers, deadline)
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
                outcomes.append(deadline.missed(replicas.name, _since_ms(started)))
        return outcomes


class SequentialFanOut(_OverThreads):
    """One recommender after another, in one job of the thread pool per request."""

    name: ClassVar[str] = "sequential"

    async def fan_out(
        self, body: bytes, headers: Mapping[str, str], deadline: Deadline
    ) -> list[Outcome]:
        """Call each recommender in turn; those the deadline leaves no time for time out."""
        started = time.perf_counter()
        outcomes: list[Outcome] = []
        begun = [0]  # calls begun by the job: the one under way when the deadline came, if any

        def in_turn() -> None:
            for replicas, guard, limits in self.guarded:
                begun[0] += 1
                outcomes.append(self._call(replicas, guard, limits, body, headers, deadline))

        job = self._submit(in_turn)
        await asyncio.wait([job], timeout=max(deadline.remaining_s(), 0))
        if not job.done():
            job.cancel()  # the call under way ends at its budget, which the deadline bounds
        done = list(outcomes)
        rest = [replicas.name for replicas, _, _ in self.guarded[len(done) :]]
        under_way = rest[: begun[0] - len(done)]
        return (
            done
            + [deadline.missed(name, _since_ms(started)) for name in under_way]
            + [Deadline.passed(name) for name in rest[len(under_way) :]]
        )


def _since_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


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
    user_agent: str = "fusion-gateway",
) -> FanOut:
    """The fan-out strategy `settings.strategy` names, each call under its recommender's guard."""
    strategy = STRATEGIES[settings.strategy]
    return strategy.from_settings(settings, recommenders, guards, tracing, user_agent)


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

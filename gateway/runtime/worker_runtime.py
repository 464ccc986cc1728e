"""The worker runtime: one long-lived event loop per process, owning the recommenders' session.

The connections to the recommenders (the worker's one aiohttp `ClientSession`,
`gateway.recommenders.async_http`) belong to the loop that made them, so a shared session needs a
loop that outlives requests. There are two ways to
have one:

- **served on it** (`gateway.asgi` under uvicorn): the loop that serves HTTP is the worker's
  loop. `open` (at the ASGI lifespan's startup) opens the session on it, `aclose` (at its
  shutdown, after in-flight requests are done) closes it; views are awaited right there.
- **a loop thread** (`gateway.wsgi` under a WSGI server such as gthread): `start` runs a loop in
  a daemon thread the first time the process needs it (the gthread worker calls it once it has
  loaded the app, `GatewayFlask.async_to_sync` and `/readyz` before they need it), and
  `GatewayFlask.async_to_sync` hands each async view to it from the request's thread and waits
  (`run`). `close` (gunicorn's ``worker_exit`` hook, or ``atexit``) stops it.

Starting is explicit: `start` and `open` start; the accessors (`clients`, `strategy`, `guards`,
`tracing`, `feedback`, `loop`) only return this process's state, and raise `RuntimeError` when
the runtime is not started here (or is closed), never starting anything themselves.

Either way the state is kept per `os.getpid()`, so a runtime created in gunicorn's master before
the fork (``preload_app``) is started afresh in each worker and never runs in the master. After
closing, the clients refuse to be used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import logging
import os
import threading
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import aiohttp

from gateway.config.settings import Settings
from gateway.core.outcome import Deadline, Outcome
from gateway.fanout.strategies import FanOut, build_fan_out, build_guards
from gateway.feedback.service import FeedbackService
from gateway.observability import metrics
from gateway.observability.tracing import NO_TRACING, Tracing, start_tracing
from gateway.recommenders import async_http
from gateway.recommenders.clients import RecommenderClient, Replicas
from gateway.recommenders.readiness import RecommenderReadiness, probe
from gateway.resilience.admission import AdaptiveLimit, AdmissionQueue, LoopLag
from gateway.resilience.policies import Guard

__all__ = ["WorkerRuntime", "package_version"]

log = logging.getLogger("gateway")

T = TypeVar("T")


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (its transports cost the fan-out ~10% less CPU)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def package_version() -> str:
    """The installed fusion-gateway's version (0.0.0 when run from a tree not installed)."""
    try:
        return importlib.metadata.version("fusion-gateway")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _WorkerState:
    """What exists only while the runtime runs in this process (`thread`: a loop thread's)."""

    def __init__(self, pid: int, loop: asyncio.AbstractEventLoop, thread: threading.Thread | None):
        self.pid = pid
        self.loop = loop
        self.thread = thread
        self.session: aiohttp.ClientSession | None = None
        self.clients: tuple[RecommenderClient, ...] = ()
        self.strategy: FanOut | None = None
        self.guards: dict[str, Guard] = {}
        self.tracing: Tracing = NO_TRACING
        self.feedback: FeedbackService | None = None
        self.publisher: asyncio.Task[None] | None = None
        self.ticker: asyncio.Task[None] | None = None


class WorkerRuntime:
    """A process's event loop, its shared session, the recommender clients, and its feedback."""

    def __init__(self, settings: Settings, span_processor: Any = None):
        self.settings = settings
        # Replaces the OTLP export of each provider this runtime starts (tests).
        self.span_processor = span_processor
        self._lock = threading.Lock()
        self._state: _WorkerState | None = None
        # Every state started by this object, in any process. One inherited through fork is
        # kept here untouched: its sockets belong to the parent, and letting it be collected
        # would make aiohttp warn about (and close) them.
        self._states: list[_WorkerState] = []
        self._closed = False
        # Per process: nothing is admitted in gunicorn's master, so each worker starts at 0.
        admission = settings.admission
        self.admission = AdaptiveLimit(
            initial=admission.initial_limit if admission.adaptive else settings.max_in_flight,
            min_limit=min(admission.min_limit, settings.max_in_flight),
            max_limit=settings.max_in_flight,
            target_lag_s=admission.target_lag_ms / 1000,
            smoothing=admission.smoothing,
            rtt_tolerance=admission.latency_tolerance,
        )
        # Above the limit, requests wait here (the uvicorn design; the gthread one sheds).
        self.queue = AdmissionQueue(
            self.admission,
            size=admission.queue_size,
            deadline_s=settings.deadline_ms / 1000,
            wait_share=admission.queue_wait_share,
            order=admission.queue_order,
            max_bytes=admission.queue_max_body_bytes,
        )
        # Requests shed since the last line that said so (one a second at most).
        self.shed = 0
        # The loop's lag: what moves the limit, and what excuses a recommender's timeout.
        self.lag = LoopLag(admission.interval_ms / 1000, admission.target_lag_ms / 1000)

    @property
    def started(self) -> bool:
        """Whether this process has a running loop with an open session."""
        state = self._state
        return (
            state is not None
            and state.pid == os.getpid()
            and state.session is not None
            and not state.session.closed
        )

    @property
    def closed(self) -> bool:
        """Whether the runtime was closed; it does not start again."""
        return self._closed

    @property
    def clients(self) -> tuple[RecommenderClient, ...]:
        """The recommender clients of this process, in config order."""
        return self._here().clients

    @property
    def strategy(self) -> FanOut:
        """This process's fan-out strategy, as the settings name it."""
        strategy = self._here().strategy
        assert strategy is not None, "set when the session opens"
        return strategy

    @property
    def guards(self) -> dict[str, Guard]:
        """This process's guards (retry policy, breaker, hedger) by recommender name."""
        return self._here().guards

    @property
    def tracing(self) -> Tracing:
        """This process's tracer (`NO_TRACING` when tracing is off)."""
        return self._here().tracing

    @property
    def feedback(self) -> FeedbackService:
        """This process's feedback service (experiment arms, impressions, events, learner)."""
        feedback = self._here().feedback
        assert feedback is not None, "set when the session opens"
        return feedback

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """This process's long-lived event loop."""
        return self._here().loop

    def fan_out(
        self, body: bytes, headers: Mapping[str, str], deadline: Deadline
    ) -> Coroutine[Any, Any, list[Outcome]]:
        """Call every recommender with `body` by this process's strategy, within `deadline`."""
        return self.strategy.fan_out(body, headers, deadline)

    async def readiness(self) -> list[RecommenderReadiness]:
        """What each recommender's model server says of its readiness (on this process's loop)."""
        session = self._here().session
        assert session is not None, "set when the session opens"
        settings = self.settings
        return await probe(session, settings.recommenders, settings.readiness.timeout_ms / 1000)

    def breaker_states(self) -> dict[str, str]:
        """Each recommender's circuit breaker state, by name."""
        return {name: guard.breaker.state for name, guard in self._here().guards.items()}

    def start(self) -> None:
        """Start the loop thread and open the session, if this process has not yet."""
        self._ensure_started()

    async def open(self) -> None:
        """Open this process's session on the running loop, the one that serves it."""
        pid = os.getpid()
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closed:
                raise RuntimeError("the gateway runtime is closed")
            state = self._state
            if state is not None and state.pid == pid:
                if state.loop is not loop:
                    raise RuntimeError("the gateway runtime already runs on another loop")
                return
            state = _WorkerState(pid, loop, None)
            self._state = state
            self._states.append(state)
        # Nothing in it awaits: a request that comes meanwhile finds it whole.
        await self._open_session(state)
        log.info("worker %d: event loop and recommender session started", pid)

    async def aclose(self) -> None:
        """Close the session opened by `open` in this process; idempotent."""
        pid = os.getpid()
        with self._lock:
            self._closed = True
            mine = [s for s in self._states if s.pid == pid and s.thread is None]
            self._states = [s for s in self._states if s not in mine]
            if self._state in mine:
                self._state = None
        for state in mine:
            await self._close_session(state)
            log.info("worker %d: recommender session closed", pid)

    @property
    def on_loop_thread(self) -> bool:
        """Whether this process's runtime runs on a loop thread of its own (WSGI serving)."""
        state = self._state
        return state is not None and state.pid == os.getpid() and state.thread is not None

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coroutine` on the worker loop and wait for its result.

        The coroutine runs in a copy of the calling thread's context (the loop's handle copies
        it and the task inherits it), so Flask's `request` and `g` work inside an async view.
        """
        try:
            state = self._here()
            if state.thread is None:
                raise RuntimeError("the runtime is served on its own loop: await there instead")
            loop = state.loop
        except BaseException:
            coroutine.close()
            raise
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def close(self, timeout: float = 5.0) -> None:
        """Close this process's session, stop its loop and join its thread; idempotent."""
        pid = os.getpid()
        with self._lock:
            self._closed = True
            mine = [state for state in self._states if state.pid == pid]
            self._states = [state for state in self._states if state.pid != pid]
            if self._state in mine:
                self._state = None
        for state in mine:
            self._stop(state, timeout)

    def _stop(self, state: _WorkerState, timeout: float) -> None:
        if state.thread is None:
            # Served on its loop: the session is closed there, as `aclose` does.
            if not state.loop.is_running() or _running_loop() is state.loop:
                log.warning("worker %d: cannot close the session from here", state.pid)
                return
            future = asyncio.run_coroutine_threadsafe(self._close_session(state), state.loop)
            future.result(timeout)
            log.info("worker %d: recommender session closed", state.pid)
            return
        if not state.thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close_session(state), state.loop).result(timeout)
        except Exception:
            log.exception("closing the recommender session failed")
        state.loop.call_soon_threadsafe(state.loop.stop)
        state.thread.join(timeout)
        if not state.thread.is_alive():
            state.loop.close()
        log.info("worker %d: recommender session closed", state.pid)

    def _here(self) -> _WorkerState:
        """This process's state; `RuntimeError` if it has none (not started here, or closed)."""
        state = self._state
        if state is not None and state.pid == os.getpid():
            return state
        if self._closed:
            raise RuntimeError("the gateway runtime is closed")
        raise RuntimeError("the gateway runtime is not started in this process: start() or open()")

    def _ensure_started(self) -> _WorkerState:
        state = self._state
        pid = os.getpid()
        if state is not None and state.pid == pid:
            return state
        with self._lock:
            if self._closed:
                raise RuntimeError("the gateway runtime is closed")
            state = self._state
            if state is None or state.pid != pid:
                # A state from another pid was inherited through fork: its thread does not
                # exist here, so this process starts its own.
                state = self._start(pid)
                self._state = state
                self._states.append(state)
            return state

    def _start(self, pid: int) -> _WorkerState:
        loop = _new_event_loop()
        ready = threading.Event()

        def run_loop() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=run_loop, name=f"gateway-loop-{pid}", daemon=True)
        thread.start()
        ready.wait()
        state = _WorkerState(pid, loop, thread)
        asyncio.run_coroutine_threadsafe(self._open_session(state), loop).result()
        log.info("worker %d: event loop and recommender session started", pid)
        return state

    async def _open_session(self, state: _WorkerState) -> None:
        user_agent = f"fusion-gateway/{package_version()}"
        # Here, on the loop that serves the worker's requests: the session's connections are
        # this loop's. Each call is bounded by its own budget (see clients.py).
        state.session = async_http.open_session(self.settings.pool, user_agent)
        replicas = [
            Replicas(
                [
                    RecommenderClient(
                        recommender.name,
                        url,
                        state.session,
                        self.settings.timeout_s(recommender),
                        recommender.idempotent,
                        recommender.wire_protocol(),
                        recommender.headers,
                    )
                    for url in recommender.replicas
                ]
            )
            for recommender in self.settings.recommenders
        ]
        state.clients = tuple(client for group in replicas for client in group.clients)
        state.guards = build_guards(self.settings, self.lag)
        # Here, in the worker after the fork: the batch processor's thread is this process's.
        state.tracing = start_tracing(self.settings.tracing, self.span_processor)
        state.strategy = build_fan_out(
            self.settings, replicas, state.guards, state.tracing, user_agent
        )
        # Its store and writer thread are this process's too (a SQLite connection must not
        # cross a fork); the store connects on first use, so a store that is down delays
        # nothing here.
        state.feedback = FeedbackService(
            self.settings.feedback, self.settings.fusion_weights, self.settings.metrics
        )
        state.feedback.start()
        loop = asyncio.get_running_loop()
        state.publisher = loop.create_task(self._publish_metrics())
        state.ticker = loop.create_task(self.lag.run(self._on_tick))

    def _on_tick(self, lag_s: float, own_lag_s: float) -> None:
        if self.settings.admission.adaptive:
            self.admission.update(own_lag_s, len(self.queue))
        if self.settings.metrics:
            metrics.observe_lag(lag_s)

    async def _publish_metrics(self) -> None:
        # From the loop, once a second: cheaper than metric writes on every request.
        metrics.DEADLINE.set(self.settings.deadline_ms / 1000)
        metrics.QUEUE_CAPACITY.set(self.queue.size)
        while True:
            metrics.IN_FLIGHT.set(self.admission.in_flight)
            metrics.CONCURRENCY_LIMIT.set(self.admission.limit)
            metrics.QUEUE_LENGTH.set(len(self.queue))
            metrics.flush()
            if self.shed:
                shed, self.shed = self.shed, 0
                log.warning(
                    "worker %d overloaded: shed %d requests in the last second (503); "
                    "admission limit %d, loop lag up to %.1f ms",
                    os.getpid(),
                    shed,
                    self.admission.limit,
                    self.lag.take_max() * 1000,
                    extra={"shed": shed, "limit": self.admission.limit},
                )
            await asyncio.sleep(metrics.FLUSH_EVERY_S)

    @staticmethod
    async def _close_session(state: _WorkerState) -> None:
        if state.publisher is not None:
            state.publisher.cancel()
        if state.ticker is not None:
            state.ticker.cancel()
        if state.feedback is not None and state.feedback.enabled:
            # After the last requests: their impressions are written, then the store closed.
            await asyncio.to_thread(state.feedback.close)
        metrics.flush()  # the last second's counts
        if state.strategy is not None:
            await state.strategy.close()
        if state.session is not None:
            await state.session.close()
        # After the last requests: their spans go out with the rest. Off the loop, as the
        # export blocks (up to the exporter's timeout when the receiver is gone).
        if state.tracing.enabled:
            await asyncio.to_thread(state.tracing.shutdown)

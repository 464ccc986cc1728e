"""Admission that follows the worker's capacity: an adaptive concurrency limit on loop lag.

A worker serves all its requests on one event loop. When it has more work than CPU, every
callback waits longer for its turn: the loop *lags*, and that lag is queueing inside the
gateway itself. It is the gateway's own latency above its no-load latency (near zero), the
signal that TCP Vegas and LEDBAT read from round-trip times and that Netflix's
concurrency-limits (Gradient2) and Envoy's adaptive concurrency filter read from request
latency. Request latency is the wrong signal here: it is mostly the recommenders', and a slow
recommender must not make the gateway refuse work it could do.

`LoopLag` measures the lag continuously: a tick sleeps `interval_s` and reports how late it
woke. The limit follows the part of that lag the worker's own work accounts for (no more than
the CPU its loop used over the tick): on a machine shared with other busy processes, a timer is
also late while the system runs them, and admitting fewer requests would not give that time
back. On each tick, `AdaptiveLimit` moves the number of requests a worker admits at once:

- lag above `target_lag_s`: the limit shrinks in proportion, ``limit * max(0.5, target / lag)``;
- lag at or below the target, and the limit in use (at least half of it admitted at some point
  since the last tick): it grows by ``sqrt(limit)``, the headroom Gradient2 allows;
- otherwise (little demand) it stays, so an idle worker does not drift to the ceiling.

Each step is smoothed (``limit += smoothing * (new - limit)``) and kept within
``[min_limit, max_limit]``; `max_limit` is the hard ceiling (`admission.max_in_flight`).
A request above the limit is answered 503 with `Retry-After` at once, before any recommender
is called.

The same lag tells the breakers whom to blame (`LoopLag.stalled_since`): a call that timed
out while the loop was stalled for a good part of its budget did not get that budget, and the
timeout is the gateway's, not the recommender's.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable

__all__ = ["AdaptiveLimit", "LoopLag"]


class LoopLag:
    """How late the event loop runs its callbacks, measured by a tick every `interval_s`.

    `stall_tolerance_s` is the lag counted as normal; only what a tick is later than that adds
    to the running total of stalled time (`stalled_since`).
    """

    def __init__(
        self,
        interval_s: float = 0.025,
        stall_tolerance_s: float = 0.01,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.thread_time,
    ):
        self.interval_s = interval_s
        self.stall_tolerance_s = stall_tolerance_s
        self._clock = clock
        self._cpu_clock = cpu_clock
        self.last_s = 0.0
        self.max_s = 0.0
        self._stalled_s = 0.0
        self._due: float | None = None  # when the pending tick should wake

    def record(self, lag_s: float) -> None:
        """One tick woke `lag_s` late."""
        self.last_s = lag_s
        if lag_s > self.max_s:
            self.max_s = lag_s
        if lag_s > self.stall_tolerance_s:
            self._stalled_s += lag_s - self.stall_tolerance_s

    def mark(self) -> float:
        """The stalled time so far, to pass to `stalled_since` later."""
        return self._stalled_s

    def stalled_since(self, mark: float) -> float:
        """Seconds the loop was stalled (beyond the tolerance) since `mark`.

        A tick still pending counts with how late it already is: a stall under way when a call
        times out is part of that call's lost budget.
        """
        pending = 0.0
        if self._due is not None:
            pending = max(0.0, self._clock() - self._due - self.stall_tolerance_s)
        return self._stalled_s - mark + pending

    def take_max(self) -> float:
        """The largest lag since the last call (for the metrics), and start again."""
        seen, self.max_s = self.max_s, 0.0
        return seen

    async def run(self, on_tick: Callable[[float, float], None]) -> None:
        """Tick until cancelled; `on_tick(lag_s, own_lag_s)` after each.

        `own_lag_s` is the part of the lag this thread's own work can account for: the lag, but
        no more than the CPU the thread used during the tick. Time the system gave to other
        processes (a busy machine) delays the timer too, but admitting fewer requests here
        would not give it back.
        """
        clock = self._clock
        interval = self.interval_s
        cpu = self._cpu_clock
        try:
            while True:
                due = clock() + interval
                used = cpu()
                self._due = due
                await asyncio.sleep(interval)
                lag = max(0.0, clock() - due)
                self._due = None
                self.record(lag)
                on_tick(lag, min(lag, cpu() - used))
        finally:
            self._due = None


class AdaptiveLimit:
    """How many requests one worker admits at once, moved by the loop's lag (module docs)."""

    def __init__(
        self,
        initial: int = 32,
        min_limit: int = 4,
        max_limit: int = 512,
        target_lag_s: float = 0.01,
        smoothing: float = 0.2,
    ):
        if not 1 <= min_limit <= max_limit:
            raise ValueError("need 1 <= min_limit <= max_limit")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.target_lag_s = target_lag_s
        self.smoothing = smoothing
        self._limit = float(min(max(initial, min_limit), max_limit))
        self._lock = threading.Lock()
        self._in_flight = 0
        self._peak = 0  # the most admitted at once since the last update

    @property
    def limit(self) -> int:
        """Requests admitted at once now."""
        return int(self._limit)

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished."""
        return self._in_flight

    @property
    def full(self) -> bool:
        """Whether a request arriving now would be shed."""
        return self._in_flight >= int(self._limit)

    def try_enter(self) -> bool:
        """Admit one request if there is room under the limit."""
        with self._lock:
            if self._in_flight >= int(self._limit):
                self._peak = self._in_flight + 1  # demand beyond the limit: it is in use
                return False
            self._in_flight += 1
            if self._in_flight > self._peak:
                self._peak = self._in_flight
            return True

    def leave(self) -> None:
        """An admitted request finished."""
        with self._lock:
            self._in_flight -= 1

    def update(self, lag_s: float) -> None:
        """Move the limit after a tick of the loop that woke `lag_s` late."""
        with self._lock:
            limit = self._limit
            peak, self._peak = self._peak, self._in_flight
            if lag_s > self.target_lag_s:
                new = limit * max(0.5, self.target_lag_s / lag_s)
            elif peak * 2 >= limit:
                new = limit + math.sqrt(limit)
            else:
                return
            limit += self.smoothing * (new - limit)
            self._limit = min(max(limit, float(self.min_limit)), float(self.max_limit))

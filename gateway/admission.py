"""Admission that follows the worker's capacity: an adaptive concurrency limit per worker.

Two signals move the limit, each a measured latency against its no-load value:

- **the requests' latency** (Netflix concurrency-limits' Gradient2, in the spirit of Envoy's
  adaptive concurrency filter): the recent average latency of admitted requests against its
  long-term average. When admitting more makes every request slower (the gateway, or the
  recommenders behind it, queueing), the recent average rises above the long one;
  ``gradient = clamp(tolerance * long / recent, 0.5, 1)``. The tolerance is 2 (Gradient2's is
  1.5; with 1.5, 64 closed-loop clients on the 2-core benchmark machine, already past its
  knee, were shed a quarter of the time with their deadline far off). The long
  average follows slowly (about 100 ticks), so a recommender that stays slow becomes the new
  normal rather than a reason to keep refusing work;
- **the worker's own queueing**: its event loop's lag, how late a timer tick runs
  (`LoopLag`). No-load lag is near zero; the part above `target_lag_s` is requests waiting
  for the one loop that serves them all, and ``gradient = max(0.5, target / lag)``. Only the
  lag the worker's own work accounts for counts (no more than the CPU its loop used over the
  tick: time the system gave to other processes would not come back by admitting fewer), and
  of that only the admitted requests' share: a shed request costs the loop `SHED_COST` of a
  served one, and clients that retry at once come back as fast as they are shed, so a
  smaller limit would only shed more.

On each tick (`interval_s`), with the smaller of the two gradients:

- below 1: the limit shrinks to ``limit * gradient``;
- 1, with at least half the limit in use since the last tick: it grows by ``sqrt(limit)``
  (Gradient2's headroom);
- otherwise (little demand) it stays, so an idle worker does not drift to the ceiling.

Each step is smoothed (``limit += smoothing * (new - limit)``) and kept within
``[min_limit, max_limit]``; `max_limit` is the hard ceiling (`max_in_flight`). A request above
the limit is answered 503 with `Retry-After` at once, before any recommender is called.

The lag also tells the breakers whom to blame (`LoopLag.stalled_since`): a call that timed out
while the loop was stalled for a good part of its budget did not get that budget, and the
timeout is the gateway's, not the recommender's.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable

__all__ = ["SHED_COST", "AdaptiveLimit", "LoopLag"]

# What shedding a request costs the loop, as a share of serving one: 0.08 ms against 2.0-2.4 ms
# of a worker's CPU, measured with four recommenders (python -m benchmarks overload).
SHED_COST = 1 / 25


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
    """How many requests one worker admits at once, moved by latency and loop lag (module docs)."""

    def __init__(
        self,
        initial: int = 32,
        min_limit: int = 4,
        max_limit: int = 512,
        target_lag_s: float = 0.01,
        smoothing: float = 0.2,
        rtt_tolerance: float = 2.0,
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
        self._served = 0  # requests served since the last update
        self._shed = 0  # requests shed since the last update
        self._served_rate = 0.0  # served, then shed, per update, smoothed
        self._shed_rate = 0.0
        self.rtt_tolerance = rtt_tolerance
        self._rtt_sum = 0.0  # the latency of the requests served since the last update
        self._long_rtt = 0.0  # their long-term average (Gradient2's "long RTT")

    @property
    def limit(self) -> int:
        """Requests admitted at once now."""
        return int(self._limit)

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished."""
        return self._in_flight

    def shed_if_full(self) -> bool:
        """Whether a request arriving now is shed (counted as such) without a try for a slot."""
        if self._in_flight >= int(self._limit):
            self._shed += 1
            self._peak = self._in_flight + 1
            return True
        return False

    def try_enter(self) -> bool:
        """Admit one request if there is room under the limit."""
        with self._lock:
            if self._in_flight >= int(self._limit):
                self._peak = self._in_flight + 1  # demand beyond the limit: it is in use
                self._shed += 1
                return False
            self._in_flight += 1
            if self._in_flight > self._peak:
                self._peak = self._in_flight
            return True

    def leave(self, latency_s: float = 0.0) -> None:
        """An admitted request finished, `latency_s` after it was admitted."""
        with self._lock:
            self._in_flight -= 1
            self._served += 1
            self._rtt_sum += latency_s

    def _rtt_gradient(self, served: int) -> float:
        """Gradient2's: long-term over recent latency, with a tolerance, within [0.5, 1]."""
        if not served or not self._rtt_sum:
            return 1.0
        short = self._rtt_sum / served
        self._rtt_sum = 0.0
        long = self._long_rtt
        if not long:
            self._long_rtt = short
            return 1.0
        # Slow to follow (about 100 updates), so a rise under load shows; quick to come down
        # once latency has fallen well below it.
        long += (short - long) / 100
        if long > 2 * short:
            long *= 0.95
        self._long_rtt = long
        return max(0.5, min(1.0, self.rtt_tolerance * long / short))

    def update(self, lag_s: float) -> None:
        """Move the limit after a tick of the loop that woke `lag_s` late (its own work's part).

        The lag is first cut to the admitted requests' share of the loop's work: a shed request
        costs the loop too (`SHED_COST` of a served one), and when clients retry at once, as
        many come back as are shed, so shrinking the limit for their lag would only shed more.
        """
        with self._lock:
            limit = self._limit
            peak, self._peak = self._peak, self._in_flight
            gradient = self._rtt_gradient(self._served)
            # Over the last ten ticks or so: a tick is shorter than most requests.
            self._served_rate += 0.1 * (self._served - self._served_rate)
            self._shed_rate += 0.1 * (self._shed - self._shed_rate)
            self._served = self._shed = 0
            if self._shed_rate:
                served = self._served_rate
                lag_s *= served / (served + self._shed_rate * SHED_COST)
            if lag_s > self.target_lag_s:
                gradient = min(gradient, max(0.5, self.target_lag_s / lag_s))
            if gradient < 1.0:
                new = limit * gradient
            elif peak * 2 >= limit:
                new = limit + math.sqrt(limit)
            else:
                return
            limit += self.smoothing * (new - limit)
            self._limit = min(max(limit, float(self.min_limit)), float(self.max_limit))

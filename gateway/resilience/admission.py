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
``[min_limit, max_limit]``; `max_limit` is the hard ceiling (`max_in_flight`). While requests
wait in the queue and neither signal says the worker queues, the limit grows by `smoothing` of
itself each tick (a burst on an idle worker is not held to a stale limit), as long as the lag
stays under a quarter of its target and requests are not getting slower; it shrinks only on
lag or latency.

A request above the limit waits in the worker's `AdmissionQueue` (bounded, on the loop: a
future, no thread, no recommender call) for as long as it can still be answered within its
deadline, as AWS's load shedding does (time in queue against the client's timeout): it gives
up, shed with reason `deadline`, once the time it has waited plus the time requests take now
would pass the deadline, or once it has waited `queue_wait_share` of it. A request that finds
the queue full is shed at once (`queue_full`); with no queue (`queue_size: 0`), every request
above the limit is (`limit`). A shed request is answered 503 with `Retry-After`, before any
recommender is called.

The lag also tells the breakers whom to blame (`LoopLag.stalled_since`): a call that timed out
while the loop was stalled for a good part of its budget did not get that budget, and the
timeout is the gateway's, not the recommender's.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

__all__ = ["SHED_COST", "AdaptiveLimit", "AdmissionQueue", "LoopLag", "ShedReason"]

ShedReason = Literal["queue_full", "deadline", "limit"]

# Requests this much slower than their long-term average are slowing down: the limit does not
# open up for the requests waiting then (it may still grow by its usual step).
_STEADY = 1.25

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
        self._rising = 1.0  # the last tick's latency over the long-term average
        self.latency_s = 0.0  # what an admitted request takes now: an average of the last ~10

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
        """Whether every slot is taken."""
        return self._in_flight >= int(self._limit)

    def count_shed(self) -> None:
        """A request was shed (its cost to the loop weighs the lag, `update`)."""
        self._shed += 1

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

    def give_back(self) -> None:
        """A slot taken for a request that was never served is free again."""
        with self._lock:
            self._in_flight -= 1

    def leave(self, latency_s: float = 0.0) -> None:
        """An admitted request finished, `latency_s` after it was admitted."""
        with self._lock:
            self._in_flight -= 1
            self._served += 1
            self._rtt_sum += latency_s
            self.latency_s += 0.1 * (latency_s - self.latency_s)

    def _rtt_gradient(self, served: int) -> float:
        """Gradient2's: long-term over recent latency, with a tolerance, within [0.5, 1].

        Also keeps `_rising`, recent over long-term latency (1 with nothing served).
        """
        self._rising = 1.0
        if not served or not self._rtt_sum:
            return 1.0
        short = self._rtt_sum / served
        self._rtt_sum = 0.0
        long = self._long_rtt
        if not long:
            self._long_rtt = short
            return 1.0
        self._rising = short / long
        # Slow to follow (about 100 updates), so a rise under load shows; quick to come down
        # once latency has fallen well below it.
        long += (short - long) / 100
        if long > 2 * short:
            long *= 0.95
        self._long_rtt = long
        return max(0.5, min(1.0, self.rtt_tolerance * long / short))

    def update(self, lag_s: float, waiting: int = 0) -> None:
        """Move the limit after a tick of the loop that woke `lag_s` late (its own work's part),
        with `waiting` requests in the admission queue.

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
                new = limit + self.smoothing * (limit * gradient - limit)
            elif waiting and lag_s < self.target_lag_s / 4 and self._rising < _STEADY:
                # Demand waits, and neither the loop nor the requests slow down: open up by a
                # share of the limit, not a step of its root (from 32, to 200 in ten ticks).
                new = limit * (1 + self.smoothing)
            elif peak * 2 >= limit:
                new = limit + self.smoothing * math.sqrt(limit)
            else:
                return
            self._limit = min(max(new, float(self.min_limit)), float(self.max_limit))


class AdmissionQueue:
    """Requests waiting for a slot under `limit`, on the worker's loop (module docs).

    `enter` admits at once when there is room; otherwise the request waits here, as a future,
    until a finishing request hands it its slot (`leave`), in `order`, or until it can no
    longer meet its deadline. `adaptive` (Facebook's adaptive LIFO) hands slots first in,
    first out while the queue drains a burst, and last in, first out once it has not been
    empty for a whole deadline: under sustained overload the oldest waiting requests are the
    ones that would be served with the least of their deadline left, so the newest go first,
    with the whole of theirs, and the oldest are shed when their time is up. Not thread-safe: it
    lives on the loop that serves the requests.
    """

    def __init__(
        self,
        limit: AdaptiveLimit,
        size: int,
        deadline_s: float,
        wait_share: float = 0.8,
        order: Literal["adaptive", "fifo", "lifo"] = "adaptive",
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if size < 0 or not 0 < wait_share <= 1 or deadline_s <= 0:
            raise ValueError("need size >= 0, 0 < wait_share <= 1 and deadline_s > 0")
        self.limit = limit
        self.size = size
        # What the waiting requests' bodies may hold at once: a queue of large bodies is full
        # before it holds `size` of them.
        self.max_bytes = max_bytes
        self._bytes = 0
        self.deadline_s = deadline_s
        self.max_wait_s = wait_share * deadline_s
        self.order = order
        # When the queue last held nobody (its first waiter came then): a queue that has not
        # emptied for a whole deadline is no burst draining but a standing queue (CoDel's
        # signal, over the deadline).
        self._empty_at = clock()
        self._clock = clock
        # Each waiter's future is set True when handed a slot, False when its turn came late.
        self._waiters: deque[tuple[asyncio.Future[bool], float]] = deque()

    def __len__(self) -> int:
        """Requests waiting now."""
        return len(self._waiters)

    def turn_away(self, size_bytes: int = 0) -> ShedReason | None:
        """Why a request arriving now is shed at once (counted as shed), if it is: no slot, and
        no place to wait (`size_bytes`: what its body would add to the queue's)."""
        if not self.limit.full:
            return None
        if self.size == 0:
            refusal: ShedReason = "limit"
        elif len(self._waiters) >= self.size or self._bytes + size_bytes > self.max_bytes:
            refusal = "queue_full"
        else:
            return None
        self.limit.count_shed()
        return refusal

    def _give_up_at(self, arrived: float) -> float:
        """When a request that arrived at `arrived` stops waiting: after that, it would be late."""
        return arrived + min(self.max_wait_s, self.deadline_s - self.limit.latency_s)

    async def enter(self, arrived: float, size_bytes: int = 0) -> tuple[ShedReason | None, float]:
        """Take a slot for a request that arrived at `arrived` (the clock's time).

        Returns why it was shed (None: admitted, and `leave` must follow) and the seconds it
        waited. Cancelled while waiting (the client left, the worker stops), it takes no slot.
        `size_bytes`: what it holds while it waits (its body).
        """
        if self.limit.try_enter():
            return None, 0.0
        refusal = self.turn_away(size_bytes)
        if refusal is not None:
            return refusal, 0.0
        now = self._clock()
        give_up_at = self._give_up_at(arrived)
        if now >= give_up_at:
            self.limit.count_shed()
            return "deadline", 0.0
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry = (waiter, arrived)
        if not self._waiters:
            self._empty_at = now
        self._waiters.append(entry)
        self._bytes += size_bytes
        try:
            async with asyncio.timeout_at(_loop_time(give_up_at - now)):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                return None, self._clock() - now  # handed a slot as its time ran out: served
            self._forget(entry)
            self.limit.count_shed()
            return "deadline", self._clock() - now
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.limit.give_back()  # handed a slot just as it was cancelled: pass it on
                self._hand_on()
            else:
                self._forget(entry)
            raise
        finally:
            self._bytes -= size_bytes
        # Handed a slot by `_hand_on` (already counted in flight), or refused there as late.
        if not waiter.result():
            self.limit.count_shed()
            return "deadline", self._clock() - now
        return None, self._clock() - now

    def leave(self, latency_s: float) -> None:
        """An admitted request finished, `latency_s` after it was admitted: its slot moves on."""
        self.limit.leave(latency_s)
        self._hand_on()

    def _forget(self, entry: tuple[asyncio.Future[bool], float]) -> None:
        with contextlib.suppress(ValueError):  # already taken off by `_hand_on`
            self._waiters.remove(entry)

    def _hand_on(self) -> None:
        """Give free slots to waiting requests; one that could no longer be on time is shed."""
        waiters = self._waiters
        limit = self.limit
        lifo = self.order == "lifo" or (
            self.order == "adaptive" and self._clock() - self._empty_at > self.deadline_s
        )
        while waiters and not limit.full:
            waiter, arrived = waiters.pop() if lifo else waiters.popleft()
            if waiter.done():
                continue
            if self._clock() >= self._give_up_at(arrived):
                waiter.set_result(False)
                continue
            limit.try_enter()
            waiter.set_result(True)


def _loop_time(after_s: float) -> float:
    """The running loop's time `after_s` from now (`asyncio.timeout_at` takes loop time)."""
    return asyncio.get_running_loop().time() + after_s

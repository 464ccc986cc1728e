"""Events from concurrent `/feedback` requests judged together: one thread, one transaction.

A request's events used to be judged in a thread of the loop's executor, one store transaction
per request: with one click per request, the worker spent more on the hop and on `BEGIN
IMMEDIATE` ... `COMMIT` than on the click, and its threads queued for the store's write lock.
`EventJudge` is group commit, as databases do it for their log: a request hands its events to
the worker's one judging thread and awaits them; what arrives while the store is busy with one
group is judged as the next, in one `store.record` call (one transaction, or one Redis
script), and each request gets its own events' results back, in order.

What does not change: the events of a request are judged in the order sent and in one
transaction; events of requests judged together are judged in the order the requests arrived,
exactly as if their transactions had run one after another (a duplicate `event_id` in two of
them is accepted once). When the store fails, every request of the group gets the error and
nothing of the group is counted.

Every answer is true. A request that waited `patience_s` without its events being taken to the
store withdraws them (`FeedbackNotTaken`: nothing of them is or will be counted); one whose
events were taken waits for the store's answer, which the store's own timeout bounds. So a
request is never told "failed" about events that are counted later.

Bounded: at most `limit` events wait (a request beyond it is refused with
`FeedbackStoreBusy`, 503, unless nothing waits), and a group holds at most `group_limit`
events (a larger request is judged alone), so one transaction never holds the store's write
lock for more than the largest request the gateway accepts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

from gateway.feedback.impressions import FeedbackEvent
from gateway.feedback.records import EventResult, FeedbackStoreBusy, FeedbackStoreError

__all__ = ["EventJudge", "FeedbackNotTaken"]


class FeedbackNotTaken(FeedbackStoreBusy):
    """A request's events waited their time and were withdrawn, never judged: none counted."""


_Outcome = list[EventResult] | BaseException
_Settled = tuple["asyncio.Future[list[EventResult]]", _Outcome]


class _Waiting(NamedTuple):
    """A request's events, and where its results go."""

    events: Sequence[FeedbackEvent]
    future: asyncio.Future[list[EventResult]]
    loop: asyncio.AbstractEventLoop


class EventJudge:
    """One worker's judging thread: the events that wait are judged together (module docs).

    `record` is the store call, and blocks: it judges a sequence of events atomically, one
    result each (`FeedbackService` passes its own, which writes this worker's waiting
    impressions first).
    """

    def __init__(
        self,
        record: Callable[[Sequence[FeedbackEvent]], list[EventResult]],
        limit: int,
        group_limit: int,
    ):
        self._record = record
        self.limit = limit
        self.group_limit = group_limit
        self._ready = threading.Condition()
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._waiting_events = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        # Groups taken to the store so far, and their events: how much grouping happens.
        self.groups = 0
        self.judged = 0

    @property
    def waiting(self) -> int:
        """Events handed over and not yet taken into a group."""
        return self._waiting_events

    @property
    def closed(self) -> bool:
        """Whether `close` was called: new events are refused."""
        return self._closed

    async def judge(
        self, events: Sequence[FeedbackEvent], patience_s: float | None = None
    ) -> list[EventResult]:
        """Judge `events` with whatever else waits; their results, in order.

        `FeedbackStoreBusy` when `limit` events already wait; `FeedbackNotTaken` when they
        waited `patience_s` without being taken to the store (withdrawn: never counted); the
        store's error (`FeedbackStoreError`) when the group's call failed. On the loop: never
        blocks. A cancelled caller withdraws its events too, if they were not taken yet.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[EventResult]] = loop.create_future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the feedback event judge is closed")
            if self._waiting and self._waiting_events + len(events) > self.limit:
                raise FeedbackStoreBusy(
                    f"events waiting to be judged in this worker: {self._waiting_events} "
                    f"(the limit is {self.limit}); retry in a moment"
                )
            waiting = _Waiting(events, future, loop)
            self._waiting.append(waiting)
            self._waiting_events += len(events)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="gateway-feedback-events", daemon=True
                )
                self._thread.start()
            else:
                self._ready.notify()
        try:
            if patience_s is None:
                return await asyncio.shield(future)
            try:
                return await asyncio.wait_for(asyncio.shield(future), patience_s)
            except TimeoutError:
                if self._withdraw(waiting):
                    raise FeedbackNotTaken(
                        f"the events waited {patience_s * 1000:.0f} ms in this worker without "
                        "reaching the store, and were withdrawn: none was counted; retry"
                    ) from None
                return await future  # taken: the store's answer comes within its timeout
        except asyncio.CancelledError:
            self._withdraw(waiting)
            raise

    def _withdraw(self, waiting: _Waiting) -> bool:
        """Take `waiting` out of the queue if no group has taken it yet; whether it was."""
        with self._ready:
            try:
                self._waiting.remove(waiting)
            except ValueError:
                return False
            self._waiting_events -= len(waiting.events)
            return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Judge what waits, then stop the thread (blocks); `judge` refuses afterwards."""
        with self._ready:
            self._closed = True
            self._ready.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._waiting and not self._closed:
                    self._ready.wait()
                if not self._waiting:
                    return  # closed, and nothing left
                group = self._take_group()
            self._settle(group)

    def _take_group(self) -> list[_Waiting]:
        """The requests waiting longest, up to `group_limit` events (at least one request)."""
        group = [self._waiting.popleft()]
        size = len(group[0].events)
        while self._waiting and size + len(self._waiting[0].events) <= self.group_limit:
            waiting = self._waiting.popleft()
            group.append(waiting)
            size += len(waiting.events)
        self._waiting_events -= size
        self.groups += 1
        self.judged += size
        return group

    def _settle(self, group: list[_Waiting]) -> None:
        events = [event for waiting in group for event in waiting.events]
        outcomes: list[_Outcome]
        try:
            results = self._record(events)
        except Exception as exc:
            outcomes = [_for_each(exc) for _ in group]
        else:
            outcomes, start = [], 0
            for waiting in group:
                end = start + len(waiting.events)
                outcomes.append(results[start:end])
                start = end
        # One wake-up of each loop per group, not one per request.
        by_loop: dict[asyncio.AbstractEventLoop, list[_Settled]] = {}
        for waiting, outcome in zip(group, outcomes, strict=True):
            by_loop.setdefault(waiting.loop, []).append((waiting.future, outcome))
        for loop, settled in by_loop.items():
            # A closed loop has nobody left to answer.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_hand_over, settled)


def _for_each(exc: Exception) -> Exception:
    """The store's error, one instance per request: each is raised, and keeps its traceback."""
    if not isinstance(exc, FeedbackStoreError):
        return exc
    copy = type(exc)(*exc.args)
    copy.__cause__ = exc.__cause__
    return copy


def _hand_over(settled: list[_Settled]) -> None:
    """On the loop: each request's results, or the group's error."""
    for future, outcome in settled:
        if future.done():
            continue  # its request was cancelled (a deadline): its events were judged all the same
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

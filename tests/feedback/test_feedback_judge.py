"""Tests of `gateway.feedback.judge.EventJudge`: group commit of `/feedback` events.

The judging thread is held on a gate while requests pile up, so which events are judged
together is decided by the test, not by the machine's speed; every wait is bounded by seconds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from gateway.feedback.impressions import FeedbackEvent, Impression, ShownItem
from gateway.feedback.judge import EventJudge, FeedbackNotTaken
from gateway.feedback.records import EventResult, FeedbackStoreBusy, FeedbackStoreError
from gateway.feedback.sqlite_store import SQLiteStore

WAIT_S = 10.0


class GatedJudge:
    """A judge function whose first call waits on a gate; it records every call's events."""

    def __init__(self, judge: Callable[[Sequence[FeedbackEvent]], list[EventResult]]):
        self.judge = judge
        self.calls: list[list[FeedbackEvent]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, events: Sequence[FeedbackEvent]) -> list[EventResult]:
        self.calls.append(list(events))
        self.entered.set()
        assert self.gate.wait(WAIT_S), "the test never opened the gate"
        return self.judge(events)


def by_item(events: Sequence[FeedbackEvent]) -> list[EventResult]:
    """A stand-in store: item "gone" is not shown, request "none" unknown, the rest accepted."""
    return [
        EventResult.UNKNOWN_REQUEST
        if event.request_id == "none"
        else EventResult.ITEM_NOT_SHOWN
        if event.item_id == "gone"
        else EventResult.ACCEPTED
        for event in events
    ]


def click(request_id: str, item_id: str = "i1", event_id: str | None = None) -> FeedbackEvent:
    return FeedbackEvent(request_id, item_id, "click", event_id)


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition` holds (within seconds)."""
    give_up = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < give_up, "condition never held"
        await asyncio.sleep(0.005)


async def held(
    judge: EventJudge, gated: GatedJudge
) -> tuple[
    asyncio.Task[list[EventResult]],
    Callable[[list[FeedbackEvent]], asyncio.Task[list[EventResult]]],
]:
    """A first request the thread is stuck judging, and a way to queue more behind it."""
    first = asyncio.ensure_future(judge.judge([click("first")]))
    await until(gated.entered.is_set)

    def queue(events: list[FeedbackEvent]) -> asyncio.Task[list[EventResult]]:
        return asyncio.ensure_future(judge.judge(events))

    return first, queue


@pytest.fixture
def gated() -> Iterator[GatedJudge]:
    gated = GatedJudge(by_item)
    yield gated
    gated.gate.set()


async def test_requests_that_wait_are_judged_together_each_getting_its_own_results(
    gated: GatedJudge,
) -> None:
    judge = EventJudge(gated, limit=100, group_limit=100)
    first, queue = await held(judge, gated)
    waiting = [
        queue([click("a")]),
        queue([click("b", "gone"), click("b")]),
        queue([click("none")]),
        queue([click("d")]),
    ]
    await until(lambda: judge.waiting == 5)
    gated.gate.set()

    assert await first == [EventResult.ACCEPTED]
    assert await asyncio.gather(*waiting) == [
        [EventResult.ACCEPTED],
        [EventResult.ITEM_NOT_SHOWN, EventResult.ACCEPTED],
        [EventResult.UNKNOWN_REQUEST],
        [EventResult.ACCEPTED],
    ]
    # The four that waited went to the store in one call, in the order they came.
    assert [[e.request_id for e in call] for call in gated.calls] == [
        ["first"],
        ["a", "b", "b", "none", "d"],
    ]
    assert (judge.groups, judge.judged) == (2, 6)
    judge.close()


async def test_a_group_in_one_sqlite_transaction_judges_as_one_after_another_would(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "feedback.db", retention_s=3600)
    items = (ShownItem("i1", 1, None, ("sml",)), ShownItem("i2", 2, None, ("asc",)))
    store.save_impressions([Impression(f"r{n}", time.time(), None, items) for n in range(3)])
    gated = GatedJudge(store.record)
    judge = EventJudge(gated, limit=100, group_limit=100)
    try:
        first, queue = await held(judge, gated)
        waiting = [
            queue([click("r0", event_id="e1")]),
            queue([click("r0", event_id="e1")]),  # the same event again: a duplicate
            queue([click("r1", "i9")]),
            queue([click("r2", "i2"), click("r9")]),
        ]
        await until(lambda: judge.waiting == 5)
        gated.gate.set()

        assert await first == [EventResult.UNKNOWN_REQUEST]
        assert await asyncio.gather(*waiting) == [
            [EventResult.ACCEPTED],
            [EventResult.DUPLICATE],
            [EventResult.ITEM_NOT_SHOWN],
            [EventResult.ACCEPTED, EventResult.UNKNOWN_REQUEST],
        ]
        assert len(gated.calls) == 2
        stats = store.stats()
        assert stats.events == {"click": 2}
        assert (stats.recommenders["sml"].clicks, stats.recommenders["asc"].clicks) == (1, 1)
    finally:
        judge.close()
        store.close()


async def test_a_store_failure_is_every_waiting_requests_error(gated: GatedJudge) -> None:
    calls = 0

    def failing(events: Sequence[FeedbackEvent]) -> list[EventResult]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return by_item(events)
        raise FeedbackStoreError("feedback store (SQLite): database is locked")

    gated.judge = failing
    judge = EventJudge(gated, limit=100, group_limit=100)
    first, queue = await held(judge, gated)
    waiting = [queue([click(f"r{n}")]) for n in range(3)]
    await until(lambda: judge.waiting == 3)
    gated.gate.set()

    assert await first == [EventResult.ACCEPTED]
    errors = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(error, FeedbackStoreError) for error in errors)
    assert {str(error) for error in errors} == {"feedback store (SQLite): database is locked"}
    assert len({id(error) for error in errors}) == 3  # one each: each is raised on its own
    judge.close()


async def test_the_queue_is_bounded_and_refuses_with_busy_until_it_drains(
    gated: GatedJudge,
) -> None:
    judge = EventJudge(gated, limit=3, group_limit=100)
    first, queue = await held(judge, gated)
    admitted = [queue([click("a"), click("b")]), queue([click("c")])]
    await until(lambda: judge.waiting == 3)

    with pytest.raises(FeedbackStoreBusy, match="waiting to be judged in this worker: 3 "):
        await judge.judge([click("d")])
    assert judge.waiting == 3
    gated.gate.set()
    await asyncio.gather(first, *admitted)

    assert await judge.judge([click("d")]) == [EventResult.ACCEPTED]
    # With nothing waiting, a request larger than the limit is still taken (alone).
    assert await judge.judge([click(f"e{n}") for n in range(5)]) == [EventResult.ACCEPTED] * 5
    judge.close()


async def test_a_group_holds_at_most_group_limit_events_and_a_large_request_goes_alone(
    gated: GatedJudge,
) -> None:
    judge = EventJudge(gated, limit=100, group_limit=3)
    first, queue = await held(judge, gated)
    waiting = [
        queue([click("a")]),
        queue([click("b"), click("b")]),
        queue([click("c")]),
        queue([click(f"big{n}") for n in range(5)]),
        queue([click("d")]),
    ]
    await until(lambda: judge.waiting == 10)
    gated.gate.set()
    await asyncio.gather(first, *waiting)

    assert [len(call) for call in gated.calls] == [1, 3, 1, 5, 1]
    judge.close()


async def test_a_cancelled_request_leaves_the_others_their_results(gated: GatedJudge) -> None:
    judge = EventJudge(gated, limit=100, group_limit=100)
    first, queue = await held(judge, gated)
    gone, kept = queue([click("gone-away")]), queue([click("kept")])
    await until(lambda: judge.waiting == 2)
    gone.cancel()
    # The withdrawal runs when the cancelled task next runs on the loop; the judge's thread
    # may take a group at any moment after the gate opens, so the gate waits for it.
    await until(lambda: judge.waiting == 1)
    gated.gate.set()

    assert await kept == [EventResult.ACCEPTED]
    assert await first == [EventResult.ACCEPTED]
    # Not taken yet when it was cancelled: its events were withdrawn, never judged (its caller
    # got no answer, so none of it may be counted).
    assert [e.request_id for e in gated.calls[1]] == ["kept"]
    assert judge.waiting == 0
    judge.close()


async def test_close_judges_what_waits_then_refuses(gated: GatedJudge) -> None:
    judge = EventJudge(gated, limit=100, group_limit=100)
    first, queue = await held(judge, gated)
    waiting = queue([click("last")])
    await until(lambda: judge.waiting == 1)
    closing = asyncio.ensure_future(asyncio.to_thread(judge.close, WAIT_S))
    with pytest.raises(RuntimeError, match="closed"):
        await until_refused(judge)
    gated.gate.set()
    await closing

    assert await waiting == [EventResult.ACCEPTED]
    assert await first == [EventResult.ACCEPTED]
    assert [e.request_id for e in gated.calls[1]] == ["last"]


async def until_refused(judge: EventJudge) -> None:
    """Offer an event until the closing judge refuses it (RuntimeError)."""
    give_up = time.monotonic() + WAIT_S
    while time.monotonic() < give_up:
        if judge.closed:  # set by close(), in its thread
            await judge.judge([click("late")])
        await asyncio.sleep(0.005)


async def test_events_not_taken_within_their_patience_are_withdrawn_never_judged() -> None:
    gated = GatedJudge(by_item)
    judge = EventJudge(gated, limit=100, group_limit=100)
    first = asyncio.ensure_future(judge.judge([click("r1")]))
    await until(gated.entered.is_set)  # taken: the store has it

    with pytest.raises(FeedbackNotTaken, match="withdrawn: none was counted"):
        await judge.judge([click("r2"), click("r3")], patience_s=0.05)

    assert judge.waiting == 0
    gated.gate.set()
    assert await asyncio.wait_for(first, WAIT_S) == [EventResult.ACCEPTED]
    judge.close(WAIT_S)
    assert gated.calls == [[click("r1")]]  # the withdrawn never reached the store


async def test_events_taken_before_their_patience_ran_out_wait_for_their_fate() -> None:
    gated = GatedJudge(by_item)
    judge = EventJudge(gated, limit=100, group_limit=100)
    taken = asyncio.ensure_future(judge.judge([click("r1")], patience_s=0.05))
    await until(gated.entered.is_set)
    await asyncio.sleep(0.1)  # past its patience, but in the store's hands

    assert not taken.done()
    gated.gate.set()
    assert await asyncio.wait_for(taken, WAIT_S) == [EventResult.ACCEPTED]
    judge.close(WAIT_S)

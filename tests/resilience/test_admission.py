"""Admission that follows capacity (`gateway.resilience.admission`), and breakers that blame the
right party.

The limit and the lag meter are driven by hand (lags given, clocks injected); the served tests
stall the serving loop for real, with a blocking sleep of a known length, and read what the
gateway reports.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import requests

from gateway.core.errors import CircuitOpen
from gateway.core.outcome import Deadline
from gateway.fanout.strategies import AsyncFanOut
from gateway.recommenders.clients import RecommenderClient, Replicas
from gateway.resilience.admission import AdaptiveLimit, LoopLag
from gateway.resilience.policies import CircuitBreaker, Guard, Hedger, RetryPolicy
from gateway.web.app import create_app
from mock_recommenders import MockFleet
from tests.helpers import ScriptedNetwork, Serve, recommend, sample, settings_for, wait_until

# --- The limit ------------------------------------------------------------------------------


def fill(limit: AdaptiveLimit, count: int) -> int:
    """Admit up to `count` requests, the rest shed (no queue); return how many got in."""
    admitted = 0
    for _ in range(count):
        if limit.try_enter():
            admitted += 1
        else:
            limit.count_shed()
    return admitted


def test_the_limit_grows_while_it_is_used_and_the_loop_keeps_up() -> None:
    limit = AdaptiveLimit(initial=16, min_limit=4, max_limit=100, target_lag_s=0.01)
    assert fill(limit, 50) == 16  # the rest would be shed

    grown = []
    for _ in range(10):
        limit.update(0.002)
        grown.append(limit.limit)

    assert grown == sorted(grown) and grown[-1] > 16
    # Each step is a fifth of sqrt(limit): it grows in steps, never in a leap.
    assert grown[0] == 16  # 16 + 0.2 * 4 = 16.8
    assert fill(limit, 50) == grown[-1] - 16


def test_an_idle_worker_does_not_drift_to_the_ceiling() -> None:
    limit = AdaptiveLimit(initial=16, min_limit=4, max_limit=100, target_lag_s=0.01)
    fill(limit, 3)  # under half the limit: the limit is not what holds requests back

    for _ in range(100):
        limit.update(0.0)

    assert limit.limit == 16


def test_the_limit_shrinks_with_the_lag_down_to_its_floor() -> None:
    limit = AdaptiveLimit(initial=100, min_limit=4, max_limit=100, target_lag_s=0.01)

    limit.update(0.02)  # twice the target: halfway to half
    assert limit.limit == 90  # 100 + 0.2 * (50 - 100)
    limit.update(0.0125)  # a little over: a little down (gradient 0.8)
    assert limit.limit == 86  # 90 + 0.2 * (72 - 90) = 86.4
    for _ in range(100):
        limit.update(1.0)  # far over: at most halved per step, never below the floor
    assert limit.limit == 4


def test_the_limit_never_passes_the_hard_ceiling() -> None:
    limit = AdaptiveLimit(initial=8, min_limit=1, max_limit=10, target_lag_s=0.01)
    for _ in range(100):
        fill(limit, 100)
        limit.update(0.0)
    assert limit.limit == 10
    assert limit.in_flight == 10
    for _ in range(10):
        limit.leave()
    assert limit.in_flight == 0
    assert fill(limit, 100) == 10


def test_a_shrunk_limit_admits_nobody_until_enough_have_left() -> None:
    limit = AdaptiveLimit(initial=10, min_limit=1, max_limit=10, target_lag_s=0.01)
    assert fill(limit, 10) == 10
    for _ in range(20):
        limit.update(0.1)
    assert limit.limit < 5

    for _ in range(5):
        limit.leave()
    assert not limit.try_enter()  # still 5 in flight, above the limit now


# --- The lag meter ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_only_lag_beyond_the_tolerance_counts_as_stalled() -> None:
    lag = LoopLag(interval_s=0.025, stall_tolerance_s=0.01, clock=Clock())
    mark = lag.mark()
    lag.record(0.004)  # normal: nothing stalled
    lag.record(0.25)
    lag.record(0.06)

    assert lag.stalled_since(mark) == pytest.approx(0.24 + 0.05)
    assert lag.take_max() == 0.25
    assert lag.take_max() == 0.0  # taken


def test_a_stall_under_way_counts_before_its_tick_reports_it() -> None:
    clock = Clock()
    lag = LoopLag(interval_s=0.025, stall_tolerance_s=0.01, clock=clock)

    async def stalled_tick() -> float:
        task = asyncio.ensure_future(lag.run(lambda *_: None))
        await asyncio.sleep(0)  # the tick is due at 100.025
        clock.now = 100.5  # the loop is stalled: its timer is 475 ms late, so far
        stalled = lag.stalled_since(0.0)
        task.cancel()
        return stalled

    assert asyncio.run(stalled_tick()) == pytest.approx(0.475 - 0.01)


def test_a_blocked_loop_shows_as_lag() -> None:
    seen: list[tuple[float, float]] = []

    async def main() -> None:
        lag = LoopLag(interval_s=0.01)
        task = asyncio.ensure_future(lag.run(lambda *lags: seen.append(lags)))
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # noqa: ASYNC251 - the point: the loop can run nothing meanwhile
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(main())
    # The tick pending during the block woke at least 300 - 10 ms late, however busy the
    # machine (a lower bound: a busy machine only adds).
    assert max(lag for lag, _ in seen) >= 0.29
    # A sleeping thread uses no CPU: none of that lag was the loop's own work.
    assert max(own for _, own in seen) < 0.29


def test_the_loops_own_lag_is_the_lag_its_work_accounts_for() -> None:
    seen: list[tuple[float, float]] = []

    async def main() -> None:
        lag = LoopLag(interval_s=0.01)
        task = asyncio.ensure_future(lag.run(lambda *lags: seen.append(lags)))
        await asyncio.sleep(0.05)
        spin_until = time.thread_time() + 0.3
        while time.thread_time() < spin_until:  # 300 ms of this thread's own CPU
            pass
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(main())
    assert max(own for _, own in seen) >= 0.29


# --- Whom the breaker blames -----------------------------------------------------------------


def guarded(stalls: LoopLag | None) -> tuple[Guard, CircuitBreaker]:
    breaker = CircuitBreaker("slow", threshold=2)
    return Guard(RetryPolicy(attempts=1), breaker, Hedger(), stalls, 0.2), breaker


async def call_silent(network: ScriptedNetwork, guard: Guard, deadline: Deadline) -> Any:
    """One call to a recommender that never answers (timeout 100 ms), under `deadline`."""
    network.add("http://slow.test/p", payload={}, delay_s=30)
    pooled = network.session
    client = RecommenderClient("slow", "http://slow.test/p", pooled, timeout_s=0.1)
    fan_out = AsyncFanOut([Replicas([client])], {"slow": guard})
    [outcome] = await fan_out.fan_out(b"{}", {}, deadline)
    return outcome


async def call_slow(network: ScriptedNetwork, guard: Guard, stall_s: float | None) -> Any:
    if stall_s is not None:
        assert guard.stalls is not None
        # The loop "stalled" while the call was in flight (recorded as its tick would).
        asyncio.get_running_loop().call_later(0.01, guard.stalls.record, stall_s)
    return await call_silent(network, guard, Deadline.after(5000))


async def test_a_timeout_while_the_worker_stalled_is_not_the_recommenders_failure(
    network: ScriptedNetwork,
) -> None:
    guard, breaker = guarded(LoopLag())

    excused = [await call_slow(network, guard, stall_s=0.08) for _ in range(3)]

    for outcome in excused:
        assert outcome.status == "timeout"
        assert outcome.overload is True
        assert "while this gateway worker was overloaded" in outcome.error
        assert "not counted against the recommender" in outcome.error
    assert breaker.state == "closed"  # three timeouts, none counted (threshold 2)

    # The same timeouts, with the loop keeping up, are the recommender's own.
    counted = [await call_slow(network, guard, stall_s=None) for _ in range(2)]
    assert [o.overload for o in counted] == [False, False]
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen):
        breaker.before_call()


async def call_after_queueing(network: ScriptedNetwork, guard: Guard, queued_s: float) -> Any:
    """A call to a silent recommender (timeout 100 ms) by a request that queued `queued_s`."""
    # 50 ms of the deadline left when the call starts, after `queued_s` in the queue.
    return await call_silent(network, guard, Deadline(time.perf_counter() + 0.05, 1000, queued_s))


async def test_a_timeout_cut_short_by_the_admission_queue_is_not_the_recommenders_failure(
    network: ScriptedNetwork,
) -> None:
    guard, breaker = guarded(None)

    # 50 ms left of a 100 ms timeout, the other 50 spent queueing: not the recommender's.
    excused = [await call_after_queueing(network, guard, queued_s=0.5) for _ in range(3)]

    for outcome in excused:
        assert outcome.status == "timeout"
        assert outcome.overload is True
        assert "admission queue" in outcome.error
        assert "not counted against the recommender" in outcome.error
    assert breaker.state == "closed"  # three timeouts, none counted (threshold 2)

    # The same short budgets, with no time queued, are the deadline's: they count.
    counted = [await call_after_queueing(network, guard, queued_s=0.0) for _ in range(2)]
    assert [o.overload for o in counted] == [False, False]
    assert breaker.state == "open"


async def test_a_short_stall_does_not_excuse_a_timeout(network: ScriptedNetwork) -> None:
    guard, breaker = guarded(LoopLag(stall_tolerance_s=0.01))

    # 15 ms stalled beyond the tolerance, of a 100 ms budget: under the 20% that excuses.
    outcomes = [await call_slow(network, guard, stall_s=0.025) for _ in range(2)]

    assert [o.overload for o in outcomes] == [False, False]
    assert breaker.state == "open"


async def test_without_a_lag_meter_every_timeout_counts(network: ScriptedNetwork) -> None:
    guard, breaker = guarded(None)
    outcomes = [await call_slow(network, guard, stall_s=None) for _ in range(2)]
    assert [o.status for o in outcomes] == ["timeout", "timeout"]
    assert breaker.state == "open"


# --- Served ----------------------------------------------------------------------------------


def spin(seconds: float) -> None:
    """Use `seconds` of this thread's CPU."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


def stall_serving_loop(app: Any, seconds: float) -> None:
    """Block the loop that serves `app` for `seconds`, as a burst of CPU work would."""
    app.runtime.loop.call_soon_threadsafe(time.sleep, seconds)


def test_a_worker_stalled_under_its_calls_does_not_open_the_breaker(
    fleet: MockFleet, serve: Serve
) -> None:
    settings = settings_for(
        fleet,
        deadline_ms=10_000,
        timeout_ms=250,
        breaker={"failure_threshold": 2, "cooldown_s": 600},
        retry={"initial_wait_ms": 0, "max_wait_ms": 0, "jitter_ms": 0},
    )
    once = [r.model_copy(update={"attempts": 1}) for r in settings.recommenders]
    settings = settings.model_copy(update={"recommenders": once})
    app = create_app(settings)
    url = serve(app)
    fleet.set_behaviour("trd", hang=True)

    def stalled_request(stall_s: float) -> dict[str, Any]:
        before = fleet.stats("trd")["hangs"]
        answer: dict[str, Any] = {}

        def send() -> None:
            answer.update(recommend(url, {}).json())

        sender = threading.Thread(target=send)
        sender.start()
        # Once trd's call is in flight, the worker stalls past its whole 250 ms budget.
        wait_until(lambda: fleet.stats("trd")["hangs"] > before, 30, "trd was never called")
        stall_serving_loop(app, stall_s)
        sender.join(30)
        return answer

    def excused_so_far() -> float:
        text = requests.get(f"{url}/metrics", timeout=30).text
        return sample(text, "gateway_overload_timeouts_total", recommender="trd")

    before = excused_so_far()
    excused = [stalled_request(0.4)["sources"]["trd"] for _ in range(3)]
    for source in excused:
        assert source["status"] == "timeout"
        assert "while this gateway worker was overloaded" in source["error"]

    # Without the stall, trd's timeouts are its own: the second opens its breaker.
    counted = [recommend(url, {}).json()["sources"]["trd"] for _ in range(3)]
    assert [s["status"] for s in counted] == ["timeout", "timeout", "circuit_open"]
    assert "overloaded" not in counted[0]["error"]

    metrics = requests.get(f"{url}/metrics", timeout=30).text
    assert sample(metrics, "gateway_overload_timeouts_total", recommender="trd") == before + 3
    # The lag was measured: at least one tick saw the 400 ms stall.
    assert sample(metrics, "gateway_event_loop_lag_seconds_count") > 0
    assert sample(metrics, "gateway_event_loop_lag_seconds_bucket", le="0.25") < sample(
        metrics, "gateway_event_loop_lag_seconds_count"
    )
    assert sample(metrics, "gateway_concurrency_limit") == settings.max_in_flight


def test_the_adaptive_limit_is_served_and_reported(fleet: MockFleet, serve: Serve) -> None:
    settings = settings_for(fleet, admission={"adaptive": True, "initial_limit": 8, "min_limit": 2})
    app = create_app(settings)
    url = serve(app)
    assert recommend(url, {}).status_code == 200

    # A loop busy with its own work lags far above the 10 ms target: the limit comes down.
    for _ in range(3):
        app.runtime.loop.call_soon_threadsafe(spin, 0.2)
        time.sleep(0.25)
    wait_until(lambda: app.runtime.admission.limit < 8, 30, "the limit did not come down")

    def reported() -> float:
        return sample(requests.get(f"{url}/metrics", timeout=30).text, "gateway_concurrency_limit")

    # Published once a second.
    wait_until(lambda: 2 <= reported() < 8, 30, lambda: f"reported limit {reported()}")


def test_the_lag_of_shedding_does_not_shrink_the_limit_further() -> None:
    # Clients that retry at once come back as fast as they are shed: when most of the loop's
    # work is shedding them, its lag is theirs, and a smaller limit would only shed more.
    storm = AdaptiveLimit(initial=32, min_limit=4, max_limit=100, target_lag_s=0.01)
    calm = AdaptiveLimit(initial=32, min_limit=4, max_limit=100, target_lag_s=0.01)
    for _ in range(50):
        for limit, bounced in ((storm, 500), (calm, 0)):
            fill(limit, 32 + bounced)  # all 32 slots taken; the rest shed
            for _ in range(2):
                limit.leave()  # two served a tick
            limit.update(0.03)  # three times the target
    assert calm.limit == 4  # its own work: shrunk to the floor
    assert storm.limit > 16  # the sheds' lag: a tenth of it is the served requests'


def serve_ticks(limit: AdaptiveLimit, latency_s: float, ticks: int) -> list[int]:
    """`ticks` ticks, each serving the whole limit at `latency_s`, the loop keeping up."""
    seen = []
    for _ in range(ticks):
        admitted = fill(limit, limit.limit + 5)  # demand beyond the limit
        for _ in range(admitted):
            limit.leave(latency_s)
        limit.update(0.0)
        seen.append(limit.limit)
    return seen


def test_requests_slowing_down_under_load_bring_the_limit_down() -> None:
    limit = AdaptiveLimit(initial=32, min_limit=4, max_limit=200, target_lag_s=0.01)
    calm = serve_ticks(limit, 0.025, 20)
    assert calm[-1] > 32  # latency steady: the limit grows with demand

    # Four times slower at once (the gateway or its recommenders queueing): it comes down.
    slowed = serve_ticks(limit, 0.1, 10)
    assert slowed[-1] < calm[-1] / 2

    # A slowness that lasts becomes the norm: the limit grows again.
    later = serve_ticks(limit, 0.1, 400)
    assert later[-1] > slowed[-1]


def test_a_latency_within_the_tolerance_does_not_shrink_the_limit() -> None:
    limit = AdaptiveLimit(initial=32, min_limit=4, max_limit=200, target_lag_s=0.01)
    serve_ticks(limit, 0.02, 20)
    grown = limit.limit
    assert serve_ticks(limit, 0.028, 5)[-1] >= grown  # 1.4x: within the tolerance of 2


# --- The queue in front of the limit --------------------------------------------------------


class FakeClock:
    """A clock the test moves; the queue's own timers still run on the loop's clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def waiting_in(queue: Any, count: int) -> None:
    """Until `count` requests wait in `queue` (the tasks that enter it run first)."""
    while len(queue) < count:  # noqa: ASYNC110 - the queue has no event to wait on
        await asyncio.sleep(0)


def one_slot(size: int = 10, order: str = "fifo", deadline_s: float = 30.0, **kw: Any) -> Any:
    from gateway.resilience.admission import AdmissionQueue

    limit = AdaptiveLimit(initial=1, min_limit=1, max_limit=1)
    return AdmissionQueue(limit, size=size, deadline_s=deadline_s, order=order, **kw)  # type: ignore[arg-type]


async def test_a_burst_above_the_limit_waits_and_is_served_in_order() -> None:
    queue = one_slot(size=100)
    served: list[int] = []
    most_at_once = 0

    async def request(number: int) -> str | None:
        nonlocal most_at_once
        refusal: str | None
        refusal, _ = await queue.enter(time.perf_counter())
        if refusal is None:
            most_at_once = max(most_at_once, queue.limit.in_flight)
            served.append(number)
            await asyncio.sleep(0)
            queue.leave(0.001)
        return refusal

    async with asyncio.timeout(30):
        refusals = await asyncio.gather(*(request(n) for n in range(20)))

    assert refusals == [None] * 20  # every one served, none refused
    assert served == list(range(20))  # first in, first out
    assert most_at_once == 1  # never above the limit
    assert len(queue) == 0 and queue.limit.in_flight == 0


async def test_lifo_gives_a_free_slot_to_the_newest_waiting_request() -> None:
    queue = one_slot(order="lifo")
    assert await queue.enter(time.perf_counter()) == (None, 0.0)  # holds the one slot
    order: list[int] = []

    async def request(number: int) -> None:
        refusal, _ = await queue.enter(time.perf_counter())
        assert refusal is None
        order.append(number)
        queue.leave(0.001)

    async with asyncio.timeout(30):
        waiting = [asyncio.create_task(request(n)) for n in range(3)]
        await waiting_in(queue, 3)
        queue.leave(0.001)
        await asyncio.gather(*waiting)

    assert order == [2, 1, 0]


async def test_adaptive_order_is_fifo_for_a_burst_and_lifo_for_a_standing_queue() -> None:
    clock = FakeClock()
    queue = one_slot(order="adaptive", deadline_s=10.0, wait_share=1.0, clock=clock)
    assert (await queue.enter(clock()))[0] is None  # holds the one slot
    served: list[str] = []

    async def request(name: str) -> str | None:
        refusal: str | None
        refusal, _ = await queue.enter(clock())
        if refusal is None:
            served.append(name)
            queue.leave(0.001)
        return refusal

    async with asyncio.timeout(30):
        burst = [asyncio.create_task(request(name)) for name in ("a", "b")]
        await waiting_in(queue, 2)
        clock.now += 9  # not empty for 9 s of a 10 s deadline: a burst draining
        queue.leave(0.001)
        await asyncio.gather(*burst)
        assert served == ["a", "b"]  # the oldest first

        assert (await queue.enter(clock()))[0] is None  # the slot held again
        oldest = asyncio.create_task(request("old"))  # the queue stands from now on
        await waiting_in(queue, 1)
        clock.now += 9
        newer = [asyncio.create_task(request(name)) for name in ("x", "y", "z")]
        await waiting_in(queue, 4)
        clock.now += 1.5  # not empty for 10.5 s: a standing queue
        queue.leave(0.001)
        await asyncio.gather(*newer)
        # The newest first, with the whole of their deadline; the oldest's time is up.
        assert served == ["a", "b", "z", "y", "x"]
        assert await oldest == "deadline"


async def test_a_full_queue_sheds_at_once() -> None:
    queue = one_slot(size=2)
    assert (await queue.enter(time.perf_counter()))[0] is None
    async with asyncio.timeout(30):
        waiting = [asyncio.create_task(queue.enter(time.perf_counter())) for _ in range(2)]
        await waiting_in(queue, 2)

        assert queue.turn_away() == "queue_full"
        assert await queue.enter(time.perf_counter()) == ("queue_full", 0.0)

        queue.leave(0.001)
        assert (await waiting[0])[0] is None  # the queue still serves those it holds
        queue.leave(0.001)
        assert (await waiting[1])[0] is None
        queue.leave(0.001)


async def test_a_queue_holds_no_more_body_bytes_than_its_budget() -> None:
    queue = one_slot(size=100, max_bytes=1000)
    assert (await queue.enter(time.perf_counter(), 900))[0] is None  # admitted: not counted
    async with asyncio.timeout(30):
        waiting = asyncio.create_task(queue.enter(time.perf_counter(), 600))
        await waiting_in(queue, 1)

        assert await queue.enter(time.perf_counter(), 500) == ("queue_full", 0.0)
        small = asyncio.create_task(queue.enter(time.perf_counter(), 400))  # fits beside it
        await waiting_in(queue, 2)
        queue.leave(0.001)
        assert (await waiting)[0] is None
        queue.leave(0.001)
        assert (await small)[0] is None

    assert await queue.enter(time.perf_counter(), 1001) == ("queue_full", 0.0)  # past it alone


async def test_without_a_queue_the_limit_sheds() -> None:
    queue = one_slot(size=0)
    assert (await queue.enter(time.perf_counter()))[0] is None
    assert queue.turn_away() == "limit"
    assert await queue.enter(time.perf_counter()) == ("limit", 0.0)


async def test_a_request_that_could_not_be_answered_in_time_is_not_queued() -> None:
    clock = FakeClock()
    queue = one_slot(deadline_s=1.0, clock=clock)
    assert (await queue.enter(clock()))[0] is None
    queue.limit.latency_s = 0.3  # what requests take now

    # Arrived 0.75 s ago (its body was slow): 0.75 + 0.3 would pass its 1 s deadline.
    assert await queue.enter(clock.now - 0.75) == ("deadline", 0.0)
    assert len(queue) == 0


async def test_a_waiting_request_gives_up_when_its_deadline_share_is_spent() -> None:
    queue = one_slot(deadline_s=0.2, wait_share=0.5)
    assert (await queue.enter(time.perf_counter()))[0] is None

    async with asyncio.timeout(30):
        refusal, waited = await queue.enter(time.perf_counter())

    assert refusal == "deadline"
    assert waited >= 0.099  # half of 0.2 s, by the loop's timer
    assert len(queue) == 0
    queue.leave(0.001)
    assert queue.limit.in_flight == 0  # it took no slot


async def test_a_turn_that_comes_too_late_for_the_deadline_is_shed() -> None:
    clock = FakeClock()
    queue = one_slot(deadline_s=30.0, clock=clock)
    assert (await queue.enter(clock()))[0] is None
    async with asyncio.timeout(30):
        late = asyncio.create_task(queue.enter(clock()))
        on_time = asyncio.create_task(queue.enter(clock.now + 20))
        await waiting_in(queue, 2)
        clock.now += 25  # the first waited 25 s of its 30 (share 0.8: 24 s): too late

        queue.leave(0.001)

        assert (await late)[0] == "deadline"
        assert (await on_time)[0] is None  # the slot went on to the next one
    assert queue.limit.in_flight == 1


@pytest.mark.parametrize("handed_its_slot", [False, True])
async def test_a_request_cancelled_while_waiting_takes_no_slot(handed_its_slot: bool) -> None:
    queue = one_slot()
    assert (await queue.enter(time.perf_counter()))[0] is None
    async with asyncio.timeout(30):
        gone = asyncio.create_task(queue.enter(time.perf_counter()))
        nxt = asyncio.create_task(queue.enter(time.perf_counter()))
        await waiting_in(queue, 2)
        if handed_its_slot:
            queue.leave(0.001)  # hands the slot to `gone`, cancelled before it runs
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        if not handed_its_slot:
            assert len(queue) == 1
            queue.leave(0.001)

        assert (await nxt)[0] is None  # the slot went on to the next one
    assert queue.limit.in_flight == 1


def test_waiting_demand_opens_the_limit_quickly_when_nothing_queues() -> None:
    limit = AdaptiveLimit(initial=8, min_limit=4, max_limit=512, target_lag_s=0.01)
    fill(limit, 8)
    for _ in range(10):
        limit.update(0.0, waiting=100)
    assert limit.limit == int(8 * 1.2**10)  # 49: by a fifth of itself a tick

    grown = limit.limit
    limit.update(0.05, waiting=100)  # the worker's own queueing: it shrinks instead
    assert limit.limit < grown
    shrunk = limit.limit
    limit.update(0.005, waiting=100)  # lag under the target, not under a quarter: no faster
    assert limit.limit < shrunk * 1.2


async def _post_all(url: str, count: int) -> list[tuple[int, dict[str, Any], Any]]:
    """`count` requests at once, each on a connection of its own."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(number: int) -> tuple[int, dict[str, Any], Any]:
            body = {"user_id": f"burst-{number}"}
            async with session.post(f"{url}/recommendation", json=body) as response:
                return response.status, await response.json(), response.headers

        return await asyncio.gather(*(one(n) for n in range(count)))


def test_a_burst_above_the_limit_is_served_not_shed(fleet: MockFleet, serve: Serve) -> None:
    admission = {"adaptive": False, "queue_size": 100}
    app = create_app(settings_for(fleet, max_in_flight=2, deadline_ms=30_000, admission=admission))
    url = serve(app)
    fleet.set_behaviour(delay_ms=20)
    # The counters are the process's: what earlier tests in this process counted is left out.
    before = requests.get(f"{url}/metrics", timeout=30).text

    answers = asyncio.run(_post_all(url, 40))

    assert [status for status, _, _ in answers] == [200] * 40
    assert all(body["complete"] for _, body, _ in answers)
    assert fleet.peak_in_flight() <= 2 * 4  # two requests at a time, four calls each
    metrics = requests.get(f"{url}/metrics", timeout=30).text
    waits = "gateway_admission_queue_wait_seconds_count"
    assert sample(metrics, waits, outcome="admitted") > sample(before, waits, outcome="admitted")
    assert sample(metrics, "gateway_admission_queue_capacity") == 100
    for reason in ("queue_full", "deadline", "limit"):
        shed = "gateway_shed_requests_total"
        assert sample(metrics, shed, reason=reason) == sample(before, shed, reason=reason)


async def test_a_full_queue_sheds_at_once_saying_so(fleet: MockFleet, serve: Serve) -> None:
    admission = {"adaptive": False, "queue_size": 2}
    settings = settings_for(fleet, max_in_flight=1, deadline_ms=20_000, admission=admission)
    url = serve(create_app(settings))
    before = (await asyncio.to_thread(requests.get, f"{url}/metrics", timeout=30)).text
    await asyncio.to_thread(fleet.set_behaviour, hang=True)
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one() -> tuple[int, dict[str, Any], Any]:
            async with session.post(f"{url}/recommendation", json={}) as response:
                return response.status, await response.json(), response.headers

        held = asyncio.create_task(one())
        while sum(fleet.stats(n)["hangs"] for n in ("sml", "asc", "trd", "psn")) < 4:  # noqa: ASYNC110 - counted in another thread
            await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(one()) for _ in range(2)]
        await asyncio.sleep(0.5)  # both in the queue (a longer wait would only shed the same)
        shed = await asyncio.gather(*(one() for _ in range(3)))
        # Answered while the held one hangs and the two wait: at once, not after them.
        assert not held.done() and not any(task.done() for task in waiting)
        await asyncio.to_thread(fleet.set_behaviour, hang=False)
        served = await asyncio.gather(held, *waiting)

    assert [status for status, _, _ in served] == [200] * 3
    assert [status for status, _, _ in shed] == [503] * 3
    for _, body, headers in shed:
        assert headers["Retry-After"] == "1"
        assert "2 more wait for a slot (its queue is full)" in body["error"]["message"]
    metrics = await asyncio.to_thread(requests.get, f"{url}/metrics", timeout=30)
    shed_total = "gateway_shed_requests_total"
    assert sample(metrics.text, shed_total, reason="queue_full") == 3 + sample(
        before, shed_total, reason="queue_full"
    )


async def test_a_request_that_waits_past_its_share_of_the_deadline_is_shed_saying_so(
    fleet: MockFleet, serve: Serve
) -> None:
    # The one slot held by a hanging request; the next waits its share of 2 s, then is shed.
    admission = {"adaptive": False, "queue_size": 10, "queue_wait_share": 0.25}
    settings = settings_for(fleet, max_in_flight=1, deadline_ms=2000, admission=admission)
    url = serve(create_app(settings))
    before = (await asyncio.to_thread(requests.get, f"{url}/metrics", timeout=30)).text
    await asyncio.to_thread(fleet.set_behaviour, hang=True)
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one() -> tuple[int, dict[str, Any]]:
            async with session.post(f"{url}/recommendation", json={}) as response:
                return response.status, await response.json()

        held = asyncio.create_task(one())
        while sum(fleet.stats(n)["hangs"] for n in ("sml", "asc", "trd", "psn")) < 4:  # noqa: ASYNC110 - counted in another thread
            await asyncio.sleep(0.01)
        status, body = await one()
        await asyncio.to_thread(fleet.set_behaviour, hang=False)
        held_status, _ = await held

    assert status == 503
    assert (
        "no slot came free in time to answer within the deadline of 2000 ms"
        in (body["error"]["message"])
    )
    assert held_status == 200  # its calls timed out at the deadline; the answer says which
    metrics = await asyncio.to_thread(requests.get, f"{url}/metrics", timeout=30)
    counted = {
        (name, value): sample(metrics.text, name, **{label: value})
        - sample(before, name, **{label: value})
        for name, label, value in (
            ("gateway_shed_requests_total", "reason", "deadline"),
            ("gateway_admission_queue_wait_seconds_count", "outcome", "shed"),
            ("gateway_admission_queue_wait_seconds_sum", "outcome", "shed"),
        )
    }
    assert counted[("gateway_shed_requests_total", "deadline")] == 1
    assert counted[("gateway_admission_queue_wait_seconds_count", "shed")] == 1
    # It waited its 0.5 s share: the histogram's sum holds what the gateway measured.
    assert counted[("gateway_admission_queue_wait_seconds_sum", "shed")] >= 0.49


async def test_a_request_whose_calls_the_queue_left_no_time_for_is_a_503_not_a_502(
    fleet: MockFleet, serve: Serve
) -> None:
    # One slot, held 2 s by the first request; the second waits for it, then has about 1 s of
    # its 3 s for calls that take 2 s: they time out for the gateway's queueing, not the
    # recommenders' fault, and with no answer at all the gateway says it was overloaded.
    admission = {"adaptive": False, "queue_size": 10, "queue_wait_share": 1.0}
    settings = settings_for(fleet, max_in_flight=1, deadline_ms=3000, admission=admission)
    url = serve(create_app(settings))
    await asyncio.to_thread(fleet.set_behaviour, delay_ms=2000)
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one() -> tuple[int, dict[str, Any], Any]:
            async with session.post(f"{url}/recommendation", json={}) as response:
                return response.status, await response.json(), response.headers

        held = asyncio.create_task(one())
        while fleet.stats("sml")["requests"] < 1:  # noqa: ASYNC110 - counted in another thread
            await asyncio.sleep(0.01)
        status, body, headers = await one()
        held_status, _, _ = await held

    assert held_status == 200
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert body["error"]["message"].startswith("gateway overloaded: no recommender answered")
    for report in body["sources"].values():
        assert report["status"] == "timeout"
        assert "admission queue" in report["error"]
    metrics = await asyncio.to_thread(requests.get, f"{url}/metrics", timeout=30)
    for name in ("sml", "asc", "trd", "psn"):
        assert sample(metrics.text, "gateway_circuit_breaker_open", recommender=name) == 0

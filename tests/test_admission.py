"""Admission that follows capacity (`gateway.admission`), and breakers that blame the right party.

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

from gateway import create_app
from gateway.admission import AdaptiveLimit, LoopLag
from gateway.clients import RecommenderClient, Replicas
from gateway.errors import CircuitOpen
from gateway.fanout import AsyncFanOut
from gateway.outcome import Deadline
from gateway.resilience import CircuitBreaker, Guard, Hedger, RetryPolicy
from mock_recommenders import MockFleet
from tests.helpers import ScriptedPool, Serve, recommend, sample, settings_for, wait_until

# --- The limit ------------------------------------------------------------------------------


def fill(limit: AdaptiveLimit, count: int) -> int:
    """Admit up to `count` requests; return how many got in."""
    return sum(limit.try_enter() for _ in range(count))


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


async def call_slow(pool: ScriptedPool, guard: Guard, stall_s: float | None) -> Any:
    pool.add("http://slow.test/p", payload={}, delay_s=30)
    pooled: Any = pool
    client = RecommenderClient("slow", "http://slow.test/p", pooled, timeout_s=0.1)
    fan_out = AsyncFanOut([Replicas([client])], {"slow": guard})
    if stall_s is not None:
        assert guard.stalls is not None
        # The loop "stalled" while the call was in flight (recorded as its tick would).
        asyncio.get_running_loop().call_later(0.01, guard.stalls.record, stall_s)
    [outcome] = await fan_out.fan_out(b"{}", {}, Deadline.after(5000))
    return outcome


async def test_a_timeout_while_the_worker_stalled_is_not_the_recommenders_failure(
    pool: ScriptedPool,
) -> None:
    guard, breaker = guarded(LoopLag())

    excused = [await call_slow(pool, guard, stall_s=0.08) for _ in range(3)]

    for outcome in excused:
        assert outcome.status == "timeout"
        assert outcome.overload is True
        assert "while this gateway worker was overloaded" in outcome.error
        assert "not counted against the recommender" in outcome.error
    assert breaker.state == "closed"  # three timeouts, none counted (threshold 2)

    # The same timeouts, with the loop keeping up, are the recommender's own.
    counted = [await call_slow(pool, guard, stall_s=None) for _ in range(2)]
    assert [o.overload for o in counted] == [False, False]
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen):
        breaker.before_call()


async def test_a_short_stall_does_not_excuse_a_timeout(pool: ScriptedPool) -> None:
    guard, breaker = guarded(LoopLag(stall_tolerance_s=0.01))

    # 15 ms stalled beyond the tolerance, of a 100 ms budget: under the 20% that excuses.
    outcomes = [await call_slow(pool, guard, stall_s=0.025) for _ in range(2)]

    assert [o.overload for o in outcomes] == [False, False]
    assert breaker.state == "open"


async def test_without_a_lag_meter_every_timeout_counts(pool: ScriptedPool) -> None:
    guard, breaker = guarded(None)
    outcomes = [await call_slow(pool, guard, stall_s=None) for _ in range(2)]
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

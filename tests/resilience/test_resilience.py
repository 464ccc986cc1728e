"""Tests of `gateway.resilience.policies`: retries within the deadline, and circuit breakers."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp.client_reqrep import ConnectionKey

from gateway.config.settings import Settings
from gateway.core.errors import CircuitOpen
from gateway.core.outcome import Deadline, Outcome
from gateway.fanout.strategies import AsyncFanOut
from gateway.recommenders.clients import RecommenderClient, Replicas, parse_retry_after
from gateway.resilience.policies import CircuitBreaker, Guard, Hedger, RetryPolicy
from gateway.web.app import create_app
from mock_recommenders import DEFAULT_NAMES, MockFleet
from tests.helpers import ScriptedNetwork, Serve, settings_for

URL = "http://rec.test/p"


# --- Retry-After ---------------------------------------------------------------------------


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("0.25") == 0.25
    now = time.time()
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# --- Circuit breaker -----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_consecutive_failures_and_probes_after_the_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker("trd", threshold=3, cooldown_s=10, clock=clock)

    for _ in range(2):
        breaker.before_call()
        breaker.failed()
    breaker.before_call()
    breaker.succeeded()  # a success in between resets the count
    for _ in range(3):
        breaker.before_call()
        breaker.failed()

    assert breaker.state == "open"
    with pytest.raises(CircuitOpen, match=r"after 3 consecutive failures; next probe in 10\.0 s"):
        breaker.before_call()

    clock.now += 10
    assert breaker.state == "half_open"
    breaker.before_call()  # the one probe
    with pytest.raises(CircuitOpen, match="a probe call is under way"):
        breaker.before_call()
    breaker.failed()  # the probe failed: open again, for a whole cool-down
    assert breaker.state == "open"

    clock.now += 10
    breaker.before_call()
    breaker.succeeded()
    assert breaker.state == "closed"
    breaker.before_call()


def test_a_cancelled_probe_frees_the_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker("trd", threshold=1, cooldown_s=1, clock=clock)
    breaker.failed()
    clock.now += 1
    breaker.before_call()

    breaker.released()

    breaker.before_call()  # another probe may go


# --- Retries, with the network faked ---------------------------------------------------------


class Waits:
    """Records the waits tenacity asks for instead of sleeping."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seen.append(seconds)


async def call_once(
    network: ScriptedNetwork,
    waits: Waits,
    deadline_ms: float = 1000,
    attempts: int = 3,
    breaker: CircuitBreaker | None = None,
) -> Outcome:
    pooled = network.session
    client = RecommenderClient("rec", URL, pooled, timeout_s=0.5)
    policy = RetryPolicy(attempts=attempts, initial_wait_s=0.01, jitter_s=0, async_sleep=waits)
    guard = Guard(policy, breaker or CircuitBreaker("rec"), Hedger())
    fan_out = AsyncFanOut([Replicas([client])], {"rec": guard})
    (outcome,) = await fan_out.fan_out(b"{}", {}, Deadline.after(deadline_ms))
    return outcome


async def test_a_503_is_retried_and_the_attempts_reported(network: ScriptedNetwork) -> None:
    network.add(URL, status=503)
    network.add(URL, status=503)
    network.add(URL, payload={"items": []})
    waits = Waits()

    outcome = await call_once(network, waits)

    assert outcome.status == "ok"
    assert outcome.attempts == 3
    assert outcome.prediction == {"items": []}
    assert waits.seen == [0.01, 0.02]  # exponential


async def test_retry_after_is_honoured(network: ScriptedNetwork) -> None:
    network.add(URL, status=503, headers={"Retry-After": "0"})
    network.add(URL, status=502, headers={"Retry-After": "1"})
    network.add(URL, payload={})
    waits = Waits()

    outcome = await call_once(network, waits, deadline_ms=5000)

    assert outcome.attempts == 3
    assert waits.seen == [0.01, 1.0]


async def test_no_retry_whose_wait_would_pass_the_deadline(network: ScriptedNetwork) -> None:
    network.add(URL, status=503, headers={"Retry-After": "5"})
    waits = Waits()

    outcome = await call_once(network, waits, deadline_ms=1000)

    assert outcome.status == "error"
    assert outcome.error == "answered HTTP 503"
    assert outcome.attempts == 1
    assert waits.seen == []


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 500},
        {"status": 404},
        {"status": 200, "body": b"not json", "headers": {"Content-Type": "text/plain"}},
    ],
)
async def test_what_is_not_retried(network: ScriptedNetwork, fault: dict[str, Any]) -> None:
    network.add(URL, **fault)
    waits = Waits()

    outcome = await call_once(network, waits)

    assert outcome.status == "error"
    assert outcome.attempts == 1
    assert waits.seen == []


async def test_connection_errors_are_retried(network: ScriptedNetwork) -> None:
    network.add(URL, error=aiohttp.ServerDisconnectedError())
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    key = ConnectionKey("rec.test", 80, False, True, None, None, None)
    network.add(URL, error=aiohttp.ClientConnectorError(key, refused))
    network.add(URL, payload={"ok": True})
    waits = Waits()

    outcome = await call_once(network, waits)

    assert (outcome.status, outcome.attempts) == ("ok", 3)


async def test_an_open_breaker_calls_nobody(network: ScriptedNetwork) -> None:
    breaker = CircuitBreaker("rec", threshold=1, cooldown_s=60)
    breaker.failed()

    outcome = await call_once(network, Waits(), breaker=breaker)

    assert outcome.status == "circuit_open"
    assert outcome.attempts == 0
    assert outcome.error is not None and outcome.error.startswith("circuit open after 1")
    assert network.calls == []


# --- Against the real mocks ------------------------------------------------------------------


def recommend(url: str) -> dict[str, Any]:
    response = requests.post(f"{url}/recommendation", json={"user_id": "r"}, timeout=30)
    body: dict[str, Any] = response.json()
    return body


def test_retries_are_counted_at_the_mock(fleet: MockFleet, serve: Serve) -> None:
    url = serve(create_app(settings_for(fleet)))
    fleet.set_behaviour("asc", status=503)

    body = recommend(url)

    assert body["sources"]["asc"] == {
        "status": "error",
        "latency_ms": body["sources"]["asc"]["latency_ms"],
        "attempts": 2,
        "error": "answered HTTP 503",
    }
    assert fleet.stats("asc")["requests"] == 2
    assert fleet.stats("sml")["requests"] == 1
    assert body["sources"]["sml"]["attempts"] == 1


def test_the_breaker_stops_calls_to_a_hanging_recommender(fleet: MockFleet, serve: Serve) -> None:
    settings = settings_for(
        fleet, deadline_ms=150, breaker={"failure_threshold": 3, "cooldown_s": 0.5}
    )
    url = serve(create_app(settings))
    fleet.set_behaviour("trd", hang=True)

    sources = [recommend(url)["sources"]["trd"] for _ in range(6)]

    assert [s["status"] for s in sources] == ["timeout"] * 3 + ["circuit_open"] * 3
    # Open, it calls nobody, so nobody is waited for.
    assert [s["attempts"] for s in sources] == [1] * 3 + [0] * 3
    assert fleet.stats("trd")["requests"] == 3

    time.sleep(0.5)  # the cool-down: never shorter than asked
    fleet.set_behaviour("trd", hang=False)
    assert recommend(url)["sources"]["trd"]["status"] == "ok"  # the probe closes it
    assert recommend(url)["sources"]["trd"]["status"] == "ok"
    assert fleet.stats("trd")["requests"] == 5


def test_a_switched_off_breaker_calls_every_time(fleet: MockFleet, serve: Serve) -> None:
    breaker = {"enabled": False, "failure_threshold": 1}
    url = serve(create_app(settings_for(fleet, deadline_ms=150, breaker=breaker)))
    fleet.set_behaviour("trd", hang=True)

    sources = [recommend(url)["sources"]["trd"] for _ in range(4)]

    assert [s["status"] for s in sources] == ["timeout"] * 4
    assert fleet.stats("trd")["hangs"] == 4


# --- Load shedding ---------------------------------------------------------------------------


async def test_without_a_queue_requests_above_the_limit_are_shed_at_once(
    fleet: MockFleet, serve: Serve
) -> None:
    admission = {"adaptive": False, "queue_size": 0}
    settings = settings_for(fleet, max_in_flight=2, deadline_ms=20_000, admission=admission)
    url = serve(create_app(settings))
    fleet.set_behaviour(hang=True)

    async def one(session: aiohttp.ClientSession) -> tuple[int, dict[str, Any], Any]:
        async with session.post(f"{url}/recommendation", json={"user_id": "s"}) as response:
            return response.status, await response.json(), response.headers

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        admitted = [asyncio.create_task(one(session)) for _ in range(2)]
        # Both are in, each holding a slot while its four calls hang at the mocks.
        for _ in range(3000):
            if sum(fleet.stats(name)["hangs"] for name in DEFAULT_NAMES) == 8:
                break
            await asyncio.sleep(0.01)
        shed = await asyncio.gather(*(one(session) for _ in range(4)))
        # Answered while the admitted ones still wait: at once, not after the recommenders.
        assert not any(task.done() for task in admitted)
        await asyncio.to_thread(fleet.set_behaviour, hang=False)
        served = await asyncio.gather(*admitted)
        # The slots are given back: the next request is served.
        status, _, _ = await one(session)
        assert status == 200

    assert [status for status, _, _ in served] == [200, 200]
    assert [status for status, _, _ in shed] == [503] * 4
    for _, body, headers in shed:
        assert headers["Retry-After"] == "1"
        assert headers["X-Fusion-Complete"] == "false"
        assert body["error"]["message"].startswith(
            "gateway overloaded: this worker already serves its limit of 2 requests at once"
        )
        assert {r["status"] for r in body["sources"].values()} == {"shed"}
    assert fleet.stats("sml")["requests"] == 3
    assert fleet.stats("sml")["hangs"] == 2


# --- Hedged calls ----------------------------------------------------------------------------


def test_the_hedge_delay_is_the_recent_p95_once_enough_answers_were_seen() -> None:
    hedger = Hedger(min_samples=20, window=100)
    for latency in range(1, 20):
        hedger.record(latency / 1000)
    assert hedger.delay_s() is None  # 19 answers: not enough to know

    for latency in range(20, 101):
        hedger.record(latency / 1000)

    assert hedger.delay_s() == pytest.approx(0.095, abs=0.005)
    assert Hedger(after_s=0.05).delay_s() == 0.05


def test_hedges_are_capped_at_a_share_of_the_calls() -> None:
    hedger = Hedger(after_s=0.01, max_extra_ratio=0.1)
    granted = 0
    for _ in range(100):
        hedger.count_call()
        granted += hedger.try_hedge()

    assert granted == 10


@pytest.fixture
def second_psn() -> Iterator[MockFleet]:
    """A second replica of `psn`: same rankings, another port."""
    with MockFleet(("psn",)) as replica:
        yield replica


def with_replicas(fleet: MockFleet, replica: MockFleet, **fields: Any) -> Settings:
    settings = settings_for(fleet, **fields).model_dump(mode="json")
    psn = settings["recommenders"][3]
    psn["urls"] = [replica.url("psn")]
    psn["hedge_after_ms"] = 40
    return Settings.model_validate(settings)


def test_a_hedge_recovers_a_slow_replica(
    fleet: MockFleet, second_psn: MockFleet, serve: Serve
) -> None:
    hedging = {"max_extra_ratio": 1.0}
    url = serve(create_app(with_replicas(fleet, second_psn, hedging=hedging, deadline_ms=5000)))
    fleet.set_behaviour("psn", hang=True)  # the first replica never answers

    sources = [recommend(url)["sources"]["psn"] for _ in range(6)]

    # Without the hedge, its turns would have timed out at the deadline.
    assert [s["status"] for s in sources] == ["ok"] * 6
    assert [s["attempts"] for s in sources] == [1] * 6
    # Turns alternate: 3 calls went first to the hanging replica, each hedged to the other (on
    # a loaded machine, a slow answer of the other may be hedged to the hanging one too).
    assert fleet.stats("psn")["hangs"] >= 3
    assert second_psn.stats("psn")["requests"] == 6


def test_without_budget_left_there_is_no_hedge(
    fleet: MockFleet, second_psn: MockFleet, serve: Serve
) -> None:
    # At most 25% extra calls: of 8 calls, 4 (every other one) go first to the slow replica,
    # and the budget grants a hedge to the first of them from the 4th call on: the 5th.
    hedging = {"max_extra_ratio": 0.25}
    url = serve(create_app(with_replicas(fleet, second_psn, hedging=hedging, deadline_ms=5000)))
    fleet.set_behaviour("psn", delay_ms=300)  # far above the 40 ms hedge delay

    for _ in range(8):
        assert recommend(url)["sources"]["psn"]["status"] == "ok"

    assert fleet.stats("psn")["requests"] == 4
    assert second_psn.stats("psn")["requests"] - 4 == 1


def test_hedges_cut_a_slow_tail(fleet: MockFleet, second_psn: MockFleet, serve: Serve) -> None:
    hedging = {"max_extra_ratio": 1.0}
    url = serve(create_app(with_replicas(fleet, second_psn, hedging=hedging, deadline_ms=20_000)))
    # Half the calls to the first replica take 10 s more: a slow tail, not a slow replica.
    fleet.set_behaviour("psn", slow_rate=0.5, slow_ms=10_000)

    sources = [recommend(url)["sources"]["psn"] for _ in range(20)]

    assert [s["status"] for s in sources] == ["ok"] * 20
    # The tail never reaches the frontend: no answer took even half of it.
    assert max(s["latency_ms"] for s in sources) < 5000
    assert second_psn.stats("psn")["requests"] > 10  # its own turns, and the hedges

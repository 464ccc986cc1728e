"""Unit tests of `gateway.fanout.strategies`: the async strategy over a network faked by
aioresponses, the blocking ones (over requests) against the mock recommenders on loopback."""

from __future__ import annotations

import time

import pytest

from gateway.core.outcome import Deadline, Outcome
from gateway.fanout.strategies import AsyncFanOut, SequentialFanOut, build_guards
from gateway.recommenders.clients import RecommenderClient, Replicas
from gateway.resilience.policies import CircuitBreaker, Guard, Hedger, RetryPolicy
from mock_recommenders import MockFleet
from tests.helpers import ScriptedNetwork, settings_for


def clients(network: ScriptedNetwork, *names: str) -> list[RecommenderClient]:
    pooled = network.session
    return [RecommenderClient(n, f"http://{n}.test/p", pooled, timeout_s=1.0) for n in names]


def single_attempt(clients: list[RecommenderClient]) -> dict[str, Guard]:
    return {
        c.name: Guard(RetryPolicy(attempts=1), CircuitBreaker(c.name), Hedger()) for c in clients
    }


def each_alone(clients: list[RecommenderClient]) -> list[Replicas[RecommenderClient]]:
    return [Replicas([client]) for client in clients]


async def fan_out(
    clients: list[RecommenderClient], body: bytes, headers: dict[str, str], deadline: Deadline
) -> list[Outcome]:
    fan_out = AsyncFanOut(each_alone(clients), single_attempt(clients))
    return await fan_out.fan_out(body, headers, deadline)


async def test_outcomes_keep_the_order_of_the_clients_not_of_the_answers(
    network: ScriptedNetwork,
) -> None:
    network.add("http://a.test/p", payload={"from": "a"}, delay_s=0.06)
    network.add("http://b.test/p", payload={"from": "b"}, delay_s=0.0)
    network.add("http://c.test/p", status=503)

    outcomes = await fan_out(clients(network, "a", "b", "c"), b"{}", {}, Deadline.after(1000))

    assert [o.name for o in outcomes] == ["a", "b", "c"]
    assert [o.prediction for o in outcomes] == [{"from": "a"}, {"from": "b"}, None]
    assert [o.status for o in outcomes] == ["ok", "ok", "error"]
    assert outcomes[2].error == "answered HTTP 503"
    assert outcomes[0].latency_ms >= 50


async def test_each_call_is_cut_at_the_deadline(network: ScriptedNetwork) -> None:
    network.add("http://a.test/p", payload={}, delay_s=30)
    network.add("http://b.test/p", payload={"fast": True})

    started = time.perf_counter()
    outcomes = await fan_out(clients(network, "a", "b"), b"{}", {}, Deadline.after(100))

    assert time.perf_counter() - started < 10  # a third of the slow answer's 30 s
    assert outcomes[0].status == "timeout"
    assert outcomes[0].error == "no answer within the 100 ms deadline"
    assert outcomes[1] == Outcome(
        "b", "ok", outcomes[1].latency_ms, prediction={"fast": True}, attempts=1
    )


async def test_a_spent_deadline_calls_nobody(network: ScriptedNetwork) -> None:
    outcomes = await fan_out(clients(network, "a"), b"{}", {}, Deadline.after(-10))

    assert outcomes == [Outcome("a", "timeout", 0.0, error="deadline already passed")]
    assert network.calls == []


async def test_a_bug_in_one_call_is_that_source_s_error_not_the_request_s(
    network: ScriptedNetwork,
    caplog: pytest.LogCaptureFixture,
) -> None:
    network.add("http://a.test/p", error=ZeroDivisionError("bug"))
    network.add("http://b.test/p", payload={"fine": 1})

    outcomes = await fan_out(clients(network, "a", "b"), b"{}", {}, Deadline.after(1000))

    assert outcomes[0].status == "error"
    assert outcomes[0].error == "gateway error during the call"
    assert outcomes[1].ok
    assert "unexpected error calling recommender a" in caplog.text


async def test_sequential_calls_one_after_another_and_the_deadline_cuts_the_rest(
    fleet: MockFleet,
) -> None:
    settings = settings_for(fleet, ("sml", "asc", "trd"), strategy="sequential")
    fleet.set_behaviour("asc", hang=True)
    fan_out = SequentialFanOut.from_settings(settings, [], build_guards(settings))
    try:
        outcomes = await fan_out.fan_out(b'{"user_id": "u1"}', {}, Deadline.after(500))
    finally:
        await fan_out.close()

    # asc held the rest up until the deadline: called at once, trd would have answered.
    assert [o.status for o in outcomes] == ["ok", "timeout", "timeout"]
    assert outcomes[1].error == "no answer within the 500 ms deadline"
    assert outcomes[2] == Outcome("trd", "timeout", 0.0, error="deadline already passed")
    assert [fleet.stats(name)["requests"] for name in ("sml", "asc", "trd")] == [1, 1, 0]

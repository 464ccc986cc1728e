"""Unit tests of `gateway.fanout`, the network a scripted stand-in for the connection pool."""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway.clients import RecommenderClient, Replicas
from gateway.fanout import AsyncFanOut, SequentialFanOut
from gateway.outcome import Deadline, Outcome
from gateway.resilience import CircuitBreaker, Guard, Hedger, RetryPolicy
from tests.helpers import ScriptedPool


def clients(pool: ScriptedPool, *names: str) -> list[RecommenderClient]:
    pooled: Any = pool  # a stand-in for gateway.upstream.ConnectionPool
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
    pool: ScriptedPool,
) -> None:
    pool.add("http://a.test/p", payload={"from": "a"}, delay_s=0.06)
    pool.add("http://b.test/p", payload={"from": "b"}, delay_s=0.0)
    pool.add("http://c.test/p", status=503)

    outcomes = await fan_out(clients(pool, "a", "b", "c"), b"{}", {}, Deadline.after(1000))

    assert [o.name for o in outcomes] == ["a", "b", "c"]
    assert [o.prediction for o in outcomes] == [{"from": "a"}, {"from": "b"}, None]
    assert [o.status for o in outcomes] == ["ok", "ok", "error"]
    assert outcomes[2].error == "answered HTTP 503"
    assert outcomes[0].latency_ms >= 50


async def test_each_call_is_cut_at_the_deadline(pool: ScriptedPool) -> None:
    pool.add("http://a.test/p", payload={}, delay_s=30)
    pool.add("http://b.test/p", payload={"fast": True})

    started = time.perf_counter()
    outcomes = await fan_out(clients(pool, "a", "b"), b"{}", {}, Deadline.after(100))

    assert time.perf_counter() - started < 10  # a third of the slow answer's 30 s
    assert outcomes[0].status == "timeout"
    assert outcomes[0].error == "no answer within the 100 ms deadline"
    assert outcomes[1] == Outcome(
        "b", "ok", outcomes[1].latency_ms, prediction={"fast": True}, attempts=1
    )


async def test_a_spent_deadline_calls_nobody(pool: ScriptedPool) -> None:
    outcomes = await fan_out(clients(pool, "a"), b"{}", {}, Deadline.after(-10))

    assert outcomes == [Outcome("a", "timeout", 0.0, error="deadline already passed")]
    assert pool.calls == []


async def test_a_bug_in_one_call_is_that_source_s_error_not_the_request_s(
    pool: ScriptedPool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool.add("http://a.test/p", error=ZeroDivisionError("bug"))
    pool.add("http://b.test/p", payload={"fine": 1})

    outcomes = await fan_out(clients(pool, "a", "b"), b"{}", {}, Deadline.after(1000))

    assert outcomes[0].status == "error"
    assert outcomes[0].error == "gateway error during the call"
    assert outcomes[1].ok
    assert "unexpected error calling recommender a" in caplog.text


async def test_sequential_calls_one_after_another_and_the_deadline_cuts_the_rest(
    pool: ScriptedPool,
) -> None:
    pool.add("http://a.test/p", payload={"from": "a"})
    pool.add("http://b.test/p", payload={"from": "b"}, delay_s=30)
    pool.add("http://c.test/p", payload={"from": "c"})

    three = clients(pool, "a", "b", "c")
    outcomes = await SequentialFanOut(each_alone(three), single_attempt(three)).fan_out(
        b"{}", {}, Deadline.after(500)
    )

    # b held the rest up until the deadline: called at once, c would have answered.
    assert [o.status for o in outcomes] == ["ok", "timeout", "timeout"]
    assert outcomes[1].error == "no answer within the 500 ms deadline"
    assert outcomes[2] == Outcome("c", "timeout", 0.0, error="deadline already passed")

"""Unit tests of `gateway.fanout` with aiohttp's network faked by aioresponses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aioresponses import CallbackResult
from yarl import URL

from gateway.clients import RecommenderClient, Replicas
from gateway.fanout import AsyncFanOut, Deadline, Outcome, SequentialFanOut
from gateway.resilience import CircuitBreaker, Guard, Hedger, RetryPolicy
from tests.helpers import CompatAioresponses


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def clients(session: aiohttp.ClientSession, *names: str) -> list[RecommenderClient]:
    return [RecommenderClient(n, f"http://{n}.test/p", session, timeout_s=1.0) for n in names]


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


def delayed(seconds: float, payload: dict[str, Any]) -> Any:
    async def answer(url: URL, **kwargs: Any) -> CallbackResult:
        await asyncio.sleep(seconds)
        return CallbackResult(payload=payload)

    return answer


async def test_outcomes_keep_the_order_of_the_clients_not_of_the_answers(
    session: aiohttp.ClientSession, fake_network: CompatAioresponses
) -> None:
    fake_network.post("http://a.test/p", callback=delayed(0.06, {"from": "a"}))
    fake_network.post("http://b.test/p", callback=delayed(0.0, {"from": "b"}))
    fake_network.post("http://c.test/p", status=503)

    outcomes = await fan_out(clients(session, "a", "b", "c"), b"{}", {}, Deadline.after(1000))

    assert [o.name for o in outcomes] == ["a", "b", "c"]
    assert [o.prediction for o in outcomes] == [{"from": "a"}, {"from": "b"}, None]
    assert [o.status for o in outcomes] == ["ok", "ok", "error"]
    assert outcomes[2].error == "answered HTTP 503"
    assert outcomes[0].latency_ms >= 50


async def test_each_call_is_cut_at_the_deadline(
    session: aiohttp.ClientSession, fake_network: CompatAioresponses
) -> None:
    fake_network.post("http://a.test/p", callback=delayed(30, {}))
    fake_network.post("http://b.test/p", payload={"fast": True})

    started = time.perf_counter()
    outcomes = await fan_out(clients(session, "a", "b"), b"{}", {}, Deadline.after(100))

    assert time.perf_counter() - started < 10  # a third of the slow answer's 30 s
    assert outcomes[0].status == "timeout"
    assert outcomes[0].error == "no answer within the 100 ms deadline"
    assert outcomes[1] == Outcome(
        "b", "ok", outcomes[1].latency_ms, prediction={"fast": True}, attempts=1
    )


async def test_a_spent_deadline_calls_nobody(
    session: aiohttp.ClientSession, fake_network: CompatAioresponses
) -> None:
    outcomes = await fan_out(clients(session, "a"), b"{}", {}, Deadline.after(-10))

    assert outcomes == [Outcome("a", "timeout", 0.0, error="deadline already passed")]
    assert fake_network.requests == {}


async def test_a_bug_in_one_call_is_that_source_s_error_not_the_request_s(
    session: aiohttp.ClientSession,
    fake_network: CompatAioresponses,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake_network.post("http://a.test/p", exception=ZeroDivisionError("bug"))
    fake_network.post("http://b.test/p", payload={"fine": 1})

    outcomes = await fan_out(clients(session, "a", "b"), b"{}", {}, Deadline.after(1000))

    assert outcomes[0].status == "error"
    assert outcomes[0].error == "gateway error during the call"
    assert outcomes[1].ok
    assert "unexpected error calling recommender a" in caplog.text


async def test_sequential_calls_one_after_another_and_the_deadline_cuts_the_rest(
    session: aiohttp.ClientSession, fake_network: CompatAioresponses
) -> None:
    fake_network.post("http://a.test/p", payload={"from": "a"})
    fake_network.post("http://b.test/p", callback=delayed(30, {"from": "b"}))
    fake_network.post("http://c.test/p", payload={"from": "c"})

    three = clients(session, "a", "b", "c")
    outcomes = await SequentialFanOut(each_alone(three), single_attempt(three)).fan_out(
        b"{}", {}, Deadline.after(500)
    )

    # b held the rest up until the deadline: called at once, c would have answered.
    assert [o.status for o in outcomes] == ["ok", "timeout", "timeout"]
    assert outcomes[1].error == "no answer within the 500 ms deadline"
    assert outcomes[2] == Outcome("c", "timeout", 0.0, error="deadline already passed")

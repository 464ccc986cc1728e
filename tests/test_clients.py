"""Unit tests of `gateway.clients`: what a recommender's answer, or its failure, becomes.

The network is a scripted stand-in for the connection pool (`tests.helpers.ScriptedPool`);
`tests/test_upstream.py` tests the pool itself on real sockets.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.clients import AnswerLimits, BlockingRecommenderClient, RecommenderClient
from gateway.errors import (
    BadRecommenderResponse,
    ClientClosedError,
    GatewayError,
    RecommenderError,
    RecommenderTimeout,
    RecommenderUnavailable,
)
from gateway.upstream import (
    ConnectFailed,
    Disconnected,
    Malformed,
    PoolClosed,
    TooLarge,
    Truncated,
    UpstreamError,
)
from tests.helpers import ScriptedPool

URL = "http://recommender.test/test"
BODY = json.dumps({"resultSize": 2, "user_id": "u1"}).encode()


def client_of(pool: ScriptedPool, idempotent: bool = True) -> RecommenderClient:
    pooled: Any = pool  # a stand-in for gateway.upstream.ConnectionPool
    return RecommenderClient("sml", URL, pooled, timeout_s=0.25, idempotent=idempotent)


async def test_returns_the_parsed_json_and_sends_body_and_headers(pool: ScriptedPool) -> None:
    pool.add(URL, payload={"items": [{"id": "i1", "score": 0.9}]})

    prediction = await client_of(pool).recommend(BODY, {"X-Request-ID": "r-1"})

    assert prediction == {"items": [{"id": "i1", "score": 0.9}]}
    assert pool.calls == [(URL, BODY, {"X-Request-ID": "r-1"})]


async def test_a_slow_answer_is_cut_at_the_budget(pool: ScriptedPool) -> None:
    pool.add(URL, payload={}, delay_s=30)

    with pytest.raises(RecommenderTimeout) as caught:
        await client_of(pool).recommend(BODY, {}, timeout_s=0.05)

    assert (caught.value.recommender, caught.value.status) == ("sml", "timeout")
    assert caught.value.reason == "no answer within 50 ms"


@pytest.mark.parametrize(
    ("error", "reason", "retryable"),
    [
        (
            ConnectFailed("recommender.test", 80, "Connection refused"),
            "cannot connect to recommender.test:80: Connection refused",
            True,
        ),
        (
            Disconnected("closed before answering"),
            "connection closed by the recommender before it answered",
            True,
        ),
        (Truncated("the answer was cut off"), "answer cut off before its end", True),
        (
            Malformed("not an HTTP answer: invalid constant string"),
            "answered something unreadable: not an HTTP answer: invalid constant string",
            False,
        ),
    ],
)
async def test_each_failure_of_the_call_is_unavailable_with_its_reason(
    pool: ScriptedPool, error: UpstreamError, reason: str, retryable: bool
) -> None:
    pool.add(URL, error=error)

    with pytest.raises(RecommenderUnavailable) as caught:
        await client_of(pool).recommend(BODY, {})

    assert (caught.value.status, caught.value.reason) == ("error", reason)
    assert caught.value.retryable is retryable


@pytest.mark.parametrize("error", [Disconnected("x"), Truncated("x")])
async def test_a_call_that_may_have_reached_a_non_idempotent_recommender_is_not_repeated(
    pool: ScriptedPool, error: UpstreamError
) -> None:
    pool.add(URL, error=error)

    with pytest.raises(RecommenderError) as caught:
        await client_of(pool, idempotent=False).recommend(BODY, {})

    assert caught.value.retryable is False


@pytest.mark.parametrize("status", [500, 502, 503, 404, 302])
async def test_error_status_is_unavailable(pool: ScriptedPool, status: int) -> None:
    pool.add(URL, status=status, payload={"error": "boom"}, headers={"Retry-After": "2"})

    with pytest.raises(RecommenderUnavailable) as caught:
        await client_of(pool).recommend(BODY, {})

    assert caught.value.reason == f"answered HTTP {status}"
    assert caught.value.retryable is (status in (502, 503, 504))
    assert caught.value.retry_after_s == 2.0


@pytest.mark.parametrize("body", [b"this is not json", b"", b'{"items": [', b'{"score": NaN}'])
async def test_body_that_is_not_json_is_a_bad_response(pool: ScriptedPool, body: bytes) -> None:
    pool.add(URL, body=body, headers={"Content-Type": "text/plain"})

    with pytest.raises(BadRecommenderResponse) as caught:
        await client_of(pool).recommend(BODY, {})

    assert caught.value.status == "error"
    assert caught.value.reason == "answered a body that is not JSON"


async def test_a_closed_pool_refuses_calls(pool: ScriptedPool) -> None:
    client = client_of(pool)
    await pool.close()

    with pytest.raises(ClientClosedError, match="sml"):
        await client.recommend(BODY, {})
    assert pool.calls == []


class FailingBlockingPool:
    """A stand-in for `gateway.blocking.BlockingPool` whose every call raises `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def post(self, url: str, body: bytes, headers: Any, timeout_s: float, max_bytes: int) -> Any:
        raise self.error


def as_seen(error: GatewayError) -> tuple[type[GatewayError], str, bool | None]:
    return type(error), str(error), getattr(error, "retryable", None)


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError(),
        PoolClosed("the connection pool is closed"),
        ConnectFailed("recommender.test", 80, "Connection refused"),
        Disconnected("closed before answering"),
        Truncated("the answer was cut off"),
        Malformed("not an HTTP answer"),
        TooLarge("answer above 10 bytes"),
    ],
)
@pytest.mark.parametrize("idempotent", [True, False])
async def test_both_clients_make_one_failure_the_same_error(
    pool: ScriptedPool, error: Exception, idempotent: bool
) -> None:
    pool.add(URL, error=error)
    blocking_pool: Any = FailingBlockingPool(error)
    blocking = BlockingRecommenderClient("sml", URL, blocking_pool, 0.25, idempotent)

    with pytest.raises(GatewayError) as from_async:
        await client_of(pool, idempotent).recommend(BODY, {})
    with pytest.raises(GatewayError) as from_blocking:
        blocking.recommend(BODY, {})

    assert as_seen(from_blocking.value) == as_seen(from_async.value)


# --- Bounded answers ------------------------------------------------------------------------


async def test_the_answers_byte_cap_goes_to_the_pool_and_an_answer_over_it_is_an_error(
    pool: ScriptedPool,
) -> None:
    pool.add(URL, payload={"items": []})
    pool.add(URL, error=TooLarge("answer larger than the limit of 2048 bytes"))
    limits = AnswerLimits(max_bytes=2048)

    assert await client_of(pool).recommend(BODY, {}, limits=limits) == {"items": []}
    with pytest.raises(BadRecommenderResponse) as caught:
        await client_of(pool).recommend(BODY, {}, limits=limits)

    assert pool.caps == [2048, 2048]
    assert (caught.value.status, caught.value.reason) == (
        "error",
        "answer larger than the limit of 2048 bytes",
    )
    assert caught.value.retryable is False


async def test_more_items_than_the_limit_is_an_error_naming_it(pool: ScriptedPool) -> None:
    items = [{"id": f"i{i}", "score": 1.0} for i in range(11)]
    pool.add(URL, payload={"items": items[:10]})
    pool.add(URL, payload={"items": items})
    limits = AnswerLimits(max_items=10)

    assert len((await client_of(pool).recommend(BODY, {}, limits=limits))["items"]) == 10
    with pytest.raises(BadRecommenderResponse) as caught:
        await client_of(pool).recommend(BODY, {}, limits=limits)

    assert caught.value.reason == "answered 11 items, above the limit of 10"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"items": ' + b"[" * 70 + b"]" * 70 + b"}", "nested deeper than 64 levels"),
        (b'{"items": [], "deep": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper than 64"),
        (b'{"items": [{"id": "a", "score": 1e999}]}', "a number too large for a float (1e999)"),
        (b'{"items": [], "n": ' + b"7" * 4299 + b"}", "an integer of 4299 digits (at most 100)"),
        (b'{"items": [{"id": "\\udc00"}]}', "a string with an unpaired surrogate escape"),
    ],
    ids=["deep", "very deep", "overflow", "long integer", "lone surrogate"],
)
async def test_json_beyond_the_limits_is_an_error_saying_which(
    pool: ScriptedPool, body: bytes, problem: str
) -> None:
    pool.add(URL, body=body)

    with pytest.raises(BadRecommenderResponse) as caught:
        await client_of(pool).recommend(BODY, {})

    assert caught.value.status == "error"
    assert caught.value.reason.startswith("answered JSON beyond the limits: ")
    assert problem in caught.value.reason


async def test_an_answer_at_the_limits_is_taken(pool: ScriptedPool) -> None:
    nested: Any = 1
    for _ in range(63):  # inside the answer object: 64 levels
        nested = [nested]
    answer = {"items": [{"id": "a", "score": 1e308}], "n": -int("9" * 100), "deep": nested}
    pool.add(URL, payload=answer)

    assert await client_of(pool).recommend(BODY, {}) == answer

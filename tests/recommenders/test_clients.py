"""Unit tests of `gateway.recommenders.clients`: what a recommender's answer, or its failure,
becomes.

The network is faked by aioresponses (`tests.helpers.ScriptedNetwork`), and the libraries'
failures are made as aiohttp, requests and urllib3 raise them;
`tests/recommenders/test_async_http.py` and `tests/recommenders/test_blocking_http.py` meet the real
ones on real sockets.
"""

from __future__ import annotations

import errno
import json
from typing import Any, cast

import aiohttp
import pytest
import requests
import urllib3.exceptions
from aiohttp.client_reqrep import ConnectionKey

from gateway.core.errors import (
    BadRecommenderResponse,
    ClientClosedError,
    GatewayError,
    RecommenderError,
    RecommenderTimeout,
    RecommenderUnavailable,
)
from gateway.recommenders.bodies import Malformed, TooLarge, Truncated
from gateway.recommenders.clients import AnswerLimits, BlockingRecommenderClient, RecommenderClient
from tests.helpers import ScriptedNetwork

URL = "http://recommender.test/test"
BODY = json.dumps({"resultSize": 2, "user_id": "u1"}).encode()


def client_of(network: ScriptedNetwork, idempotent: bool = True) -> RecommenderClient:
    pooled = network.session
    return RecommenderClient("sml", URL, pooled, timeout_s=0.25, idempotent=idempotent)


async def test_returns_the_parsed_json_and_sends_body_and_headers(network: ScriptedNetwork) -> None:
    network.add(URL, payload={"items": [{"id": "i1", "score": 0.9}]})

    prediction = await client_of(network).recommend(BODY, {"X-Request-ID": "r-1"})

    assert prediction == {"items": [{"id": "i1", "score": 0.9}]}
    sent = {
        "User-Agent": "fusion-gateway/test",
        "Accept": "application/json",
        "Accept-Encoding": "gzip, deflate",
        "Content-Type": "application/json",
        "X-Request-ID": "r-1",
    }
    assert network.calls == [(URL, BODY, sent)]


async def test_a_slow_answer_is_cut_at_the_budget(network: ScriptedNetwork) -> None:
    network.add(URL, payload={}, delay_s=30)

    with pytest.raises(RecommenderTimeout) as caught:
        await client_of(network).recommend(BODY, {}, timeout_s=0.05)

    assert (caught.value.recommender, caught.value.status) == ("sml", "timeout")
    assert caught.value.reason == "no answer within 50 ms"


# The same failures as aiohttp raises them on the loop, and as requests (over urllib3 and
# http.client) raises them in a thread, wrapped as they come.
KEY = ConnectionKey("recommender.test", 80, False, True, None, None, None)


def refused() -> OSError:
    return ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")


def aiohttp_refused() -> Exception:
    failure = aiohttp.ClientConnectorError(KEY, refused())
    failure.__cause__ = failure.os_error
    return failure


def requests_refused() -> Exception:
    connection: Any = None
    made = urllib3.exceptions.NewConnectionError(
        connection, "Failed to establish a new connection: [Errno 111] Connection refused"
    )
    made.__cause__ = refused()
    return requests.ConnectionError(urllib3.exceptions.MaxRetryError(cast(Any, None), URL, made))


def requests_closed() -> Exception:
    import http.client

    closed = http.client.RemoteDisconnected("Remote end closed connection without response")
    return requests.ConnectionError(urllib3.exceptions.ProtocolError("Connection aborted.", closed))


def requests_unreadable() -> Exception:
    import http.client

    line = http.client.BadStatusLine("HTTP/1.1 2x0 OK")
    return requests.ConnectionError(urllib3.exceptions.ProtocolError("Connection aborted.", line))


FAILURES = [
    # (as aiohttp raises it, as requests does, the reason, whether it may be retried)
    pytest.param(
        aiohttp_refused(),
        requests_refused(),
        "cannot connect to recommender.test:80: Connection refused",
        True,
        id="refused",
    ),
    pytest.param(
        aiohttp.ServerDisconnectedError(),
        requests_closed(),
        "connection closed by the recommender before it answered",
        True,
        id="closed before answering",
    ),
    pytest.param(
        Truncated("the answer was cut off"),
        Truncated("the answer was cut off"),
        "answer cut off before its end",
        True,
        id="cut off",
    ),
    pytest.param(
        aiohttp.ClientResponseError(
            cast(Any, None), (), status=400, message="Invalid response status"
        ),
        requests_unreadable(),
        "answered something unreadable: ",
        False,
        id="not HTTP",
    ),
]


@pytest.mark.parametrize(("error", "_", "reason", "retryable"), FAILURES)
async def test_each_failure_of_the_call_is_unavailable_with_its_reason(
    network: ScriptedNetwork, error: Exception, _: Exception, reason: str, retryable: bool
) -> None:
    network.add(URL, error=error)

    with pytest.raises(RecommenderUnavailable) as caught:
        await client_of(network).recommend(BODY, {})

    assert caught.value.status == "error"
    assert caught.value.reason.startswith(reason)
    assert caught.value.retryable is retryable


@pytest.mark.parametrize(
    "error", [aiohttp.ServerDisconnectedError(), Truncated("x")], ids=["closed", "cut off"]
)
async def test_a_call_that_may_have_reached_a_non_idempotent_recommender_is_not_repeated(
    network: ScriptedNetwork, error: Exception
) -> None:
    network.add(URL, error=error)

    with pytest.raises(RecommenderError) as caught:
        await client_of(network, idempotent=False).recommend(BODY, {})

    assert caught.value.retryable is False


async def test_a_failure_of_no_library_is_the_gateway_s_own_and_raised_as_it_is(
    network: ScriptedNetwork,
) -> None:
    network.add(URL, error=ZeroDivisionError("a bug"))

    with pytest.raises(ZeroDivisionError):
        await client_of(network).recommend(BODY, {})


@pytest.mark.parametrize("status", [500, 502, 503, 404, 302])
async def test_error_status_is_unavailable(network: ScriptedNetwork, status: int) -> None:
    network.add(URL, status=status, payload={"error": "boom"}, headers={"Retry-After": "2"})

    with pytest.raises(RecommenderUnavailable) as caught:
        await client_of(network).recommend(BODY, {})

    assert caught.value.reason == f"answered HTTP {status}"
    assert caught.value.retryable is (status in (502, 503, 504))
    assert caught.value.retry_after_s == 2.0


@pytest.mark.parametrize("body", [b"this is not json", b"", b'{"items": [', b'{"score": NaN}'])
async def test_body_that_is_not_json_is_a_bad_response(
    network: ScriptedNetwork, body: bytes
) -> None:
    network.add(URL, body=body, headers={"Content-Type": "text/plain"})

    with pytest.raises(BadRecommenderResponse) as caught:
        await client_of(network).recommend(BODY, {})

    assert caught.value.status == "error"
    assert caught.value.reason == "answered a body that is not JSON"


class FailingSessions:
    """A stand-in for `gateway.recommenders.blocking_http.ThreadSessions` whose every call raises
    `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def post(self, url: str, body: bytes, headers: Any, timeout_s: float, max_bytes: int) -> Any:
        raise self.error


def as_seen(error: GatewayError) -> tuple[type[GatewayError], str, bool | None]:
    return type(error), str(error), getattr(error, "retryable", None)


@pytest.mark.parametrize(
    ("from_aiohttp", "from_requests"),
    [
        pytest.param(TimeoutError(), TimeoutError(), id="timeout"),
        *[pytest.param(p.values[0], p.values[1], id=p.id) for p in FAILURES[:3]],
        pytest.param(Malformed("gzip body"), Malformed("gzip body"), id="malformed"),
        pytest.param(TooLarge("answer above 10"), TooLarge("answer above 10"), id="too large"),
    ],
)
@pytest.mark.parametrize("idempotent", [True, False])
async def test_both_clients_make_one_failure_the_same_error(
    network: ScriptedNetwork, from_aiohttp: Exception, from_requests: Exception, idempotent: bool
) -> None:
    network.add(URL, error=from_aiohttp)
    sessions: Any = FailingSessions(from_requests)
    blocking = BlockingRecommenderClient("sml", URL, sessions, 0.25, idempotent)

    with pytest.raises(GatewayError) as from_async:
        await client_of(network, idempotent).recommend(BODY, {})
    with pytest.raises(GatewayError) as from_blocking:
        blocking.recommend(BODY, {})

    assert as_seen(from_blocking.value) == as_seen(from_async.value)


async def test_both_clients_refuse_calls_once_closed(network: ScriptedNetwork) -> None:
    client = client_of(network)
    sessions: Any = FailingSessions(AssertionError("called"))
    blocking = BlockingRecommenderClient("sml", URL, sessions, 0.25)
    await network.close()
    blocking.close()

    with pytest.raises(ClientClosedError, match="sml") as from_async:
        await client.recommend(BODY, {})
    with pytest.raises(ClientClosedError, match="sml") as from_blocking:
        blocking.recommend(BODY, {})
    assert str(from_async.value) == str(from_blocking.value)
    assert network.calls == []


# --- Bounded answers ------------------------------------------------------------------------


async def test_an_answer_over_its_byte_cap_is_an_error_naming_the_cap(
    network: ScriptedNetwork,
) -> None:
    fits = json.dumps({"items": [], "pad": "x" * 2000}).encode()
    network.add(URL, body=fits)
    network.add(URL, body=fits + b" " * (2049 - len(fits)))
    limits = AnswerLimits(max_bytes=2048)

    assert (await client_of(network).recommend(BODY, {}, limits=limits))["items"] == []
    with pytest.raises(BadRecommenderResponse) as caught:
        await client_of(network).recommend(BODY, {}, limits=limits)

    assert (caught.value.status, caught.value.reason) == (
        "error",
        "answer larger than the limit of 2048 bytes (Content-Length: 2049)",
    )
    assert caught.value.retryable is False


async def test_more_items_than_the_limit_is_an_error_naming_it(network: ScriptedNetwork) -> None:
    items = [{"id": f"i{i}", "score": 1.0} for i in range(11)]
    network.add(URL, payload={"items": items[:10]})
    network.add(URL, payload={"items": items})
    limits = AnswerLimits(max_items=10)

    assert len((await client_of(network).recommend(BODY, {}, limits=limits))["items"]) == 10
    with pytest.raises(BadRecommenderResponse) as caught:
        await client_of(network).recommend(BODY, {}, limits=limits)

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
    network: ScriptedNetwork, body: bytes, problem: str
) -> None:
    network.add(URL, body=body)

    with pytest.raises(BadRecommenderResponse) as caught:
        await client_of(network).recommend(BODY, {})

    assert caught.value.status == "error"
    assert caught.value.reason.startswith("answered JSON beyond the limits: ")
    assert problem in caught.value.reason


async def test_an_answer_at_the_limits_is_taken(network: ScriptedNetwork) -> None:
    nested: Any = 1
    for _ in range(63):  # inside the answer object: 64 levels
        nested = [nested]
    answer = {"items": [{"id": "a", "score": 1e308}], "n": -int("9" * 100), "deep": nested}
    network.add(URL, payload=answer)

    assert await client_of(network).recommend(BODY, {}) == answer

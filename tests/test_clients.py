"""Unit tests of `gateway.clients` with aiohttp's network faked by aioresponses."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aioresponses import CallbackResult
from yarl import URL

from gateway.clients import RecommenderClient, parse_json
from gateway.errors import (
    BadRecommenderResponse,
    ClientClosedError,
    RecommenderTimeout,
    RecommenderUnavailable,
)
from tests.helpers import CompatAioresponses

URL_ = "http://recommender.test/test"
BODY = json.dumps({"resultSize": 2, "user_id": "u1"}).encode()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def client(session: aiohttp.ClientSession) -> RecommenderClient:
    return RecommenderClient("sml", URL_, session, timeout_s=0.25)


async def test_returns_the_parsed_json_and_sends_body_and_headers(
    client: RecommenderClient, fake_network: CompatAioresponses
) -> None:
    fake_network.post(URL_, payload={"items": [{"id": "i1", "score": 0.9}]})

    prediction = await client.recommend(BODY, {"X-Request-ID": "r-1"})

    assert prediction == {"items": [{"id": "i1", "score": 0.9}]}
    (call,) = fake_network.requests[("POST", URL(URL_))]
    sent = call.kwargs["data"]
    assert isinstance(sent, aiohttp.BytesPayload)
    assert sent.decode() == BODY.decode()
    assert sent.content_type == "application/json"
    assert call.kwargs["headers"]["X-Request-ID"] == "r-1"
    assert call.kwargs["allow_redirects"] is False


async def test_timeout_names_the_budget(
    client: RecommenderClient, fake_network: CompatAioresponses
) -> None:
    fake_network.post(URL_, timeout=True)

    with pytest.raises(RecommenderTimeout) as caught:
        await client.recommend(BODY, {}, timeout_s=0.12)

    assert caught.value.recommender == "sml"
    assert caught.value.status == "timeout"
    assert caught.value.reason == "no answer within 120 ms"


async def test_a_slow_answer_is_cut_at_the_budget(
    client: RecommenderClient, fake_network: CompatAioresponses
) -> None:
    import asyncio

    async def slow(url: URL, **kwargs: object) -> CallbackResult:
        await asyncio.sleep(5)
        return CallbackResult(payload={})

    fake_network.post(URL_, callback=slow)

    with pytest.raises(RecommenderTimeout, match="no answer within 50 ms"):
        await client.recommend(BODY, {}, timeout_s=0.05)


async def test_connection_error_is_unavailable(
    client: RecommenderClient, fake_network: CompatAioresponses
) -> None:
    fake_network.post(URL_, exception=aiohttp.ClientOSError(104, "Connection reset by peer"))

    with pytest.raises(RecommenderUnavailable) as caught:
        await client.recommend(BODY, {})

    assert caught.value.status == "error"
    assert caught.value.reason == "call failed: ClientOSError"


async def test_server_disconnect_is_unavailable(
    client: RecommenderClient, fake_network: CompatAioresponses
) -> None:
    fake_network.post(URL_, exception=aiohttp.ServerDisconnectedError())

    with pytest.raises(RecommenderUnavailable, match="connection closed by the recommender"):
        await client.recommend(BODY, {})


@pytest.mark.parametrize("status", [500, 502, 503, 404, 302])
async def test_error_status_is_unavailable(
    client: RecommenderClient, fake_network: CompatAioresponses, status: int
) -> None:
    fake_network.post(URL_, status=status, payload={"error": "boom"})

    with pytest.raises(RecommenderUnavailable) as caught:
        await client.recommend(BODY, {})

    assert caught.value.reason == f"answered HTTP {status}"


@pytest.mark.parametrize("body", [b"this is not json", b"", b'{"items": [', b'{"score": NaN}'])
async def test_body_that_is_not_json_is_a_bad_response(
    client: RecommenderClient, fake_network: CompatAioresponses, body: bytes
) -> None:
    fake_network.post(URL_, body=body, content_type="text/plain")

    with pytest.raises(BadRecommenderResponse) as caught:
        await client.recommend(BODY, {})

    assert caught.value.status == "error"
    assert caught.value.reason == "answered a body that is not JSON"


async def test_a_closed_session_refuses_calls(
    session: aiohttp.ClientSession, fake_network: CompatAioresponses
) -> None:
    client = RecommenderClient("asc", URL_, session, timeout_s=0.25)
    await session.close()

    with pytest.raises(ClientClosedError, match="asc"):
        await client.recommend(BODY, {})


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"a": -Infinity}', "[" * 100_000])
def test_parse_json_rejects_what_json_does_not_allow(text: str) -> None:
    with pytest.raises(ValueError):
        parse_json(text)

"""The recommenders' client on the worker loop (aiohttp, `gateway.recommenders.async_http`) on real
sockets.

A server scripted byte by byte (`tests.scripted`) answers each call as the test says; what the
gateway makes of it is read where a user meets it: the answer `post` returns, or the error
`RecommenderClient` raises, with its reason. The server counts connections, so a test sees the
client keep one, or drop one rather than reuse it half-read.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from gateway.config.settings import PoolSettings
from gateway.core.errors import (
    BadRecommenderResponse,
    GatewayError,
    RecommenderError,
    RecommenderTimeout,
)
from gateway.recommenders import async_http
from gateway.recommenders.blocking_http import ThreadSessions
from gateway.recommenders.bodies import Answer, TooLarge
from gateway.recommenders.clients import AnswerLimits, BlockingRecommenderClient, RecommenderClient
from tests.helpers import closed_port
from tests.hostile import gzip_bomb
from tests.scripted import (
    CAP,
    OVERSIZED,
    Action,
    Scripted,
    answer,
    chunked_forever,
    close,
    compressed,
    reset,
    scripted_server,
    self_signed,
    then,
    tls_url,
    trickle,
    wait,
)

BODY = b'{"user_id": "u1"}'


@pytest.fixture
async def server() -> AsyncIterator[Scripted]:
    async with scripted_server() as scripted:
        yield scripted


async def session_of(**pool: float | str) -> aiohttp.ClientSession:
    return async_http.open_session(PoolSettings.model_validate(pool), "fusion-gateway/test")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    opened = await session_of(keepalive_timeout_s=5.0)
    yield opened
    await opened.close()


async def post(session: aiohttp.ClientSession, url: str, max_bytes: int = CAP) -> Answer:
    return await async_http.post(session, URL(url), BODY, {"X-Request-ID": "req-1"}, max_bytes)


async def until(condition: Callable[[], bool]) -> bool:
    """Whether `condition` holds within 5 s (the server sees a close a moment after it is made)."""
    for _ in range(100):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


# --- Requests and answers --------------------------------------------------------------------


async def test_the_request_and_a_keep_alive_connection_for_the_next(
    server: Scripted, session: aiohttp.ClientSession
) -> None:
    server.script = [answer(b'{"items": []}'), answer(b'{"n": 2}')]

    first = await post(session, server.url)
    second = await post(session, server.url)

    assert (first.status, first.body, second.body) == (200, b'{"items": []}', b'{"n": 2}')
    assert server.connections == 1
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /test HTTP/1.1"
    sent = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines[1:])}
    assert sent["host"] == server.url.split("/")[2]
    assert sent["user-agent"] == "fusion-gateway/test"
    assert sent["accept"] == "application/json"
    assert sent["accept-encoding"] == "gzip, deflate"
    assert sent["content-type"] == "application/json"
    assert sent["x-request-id"] == "req-1"
    assert "cookie" not in sent
    assert body == BODY


async def test_answers_chunked_compressed_or_ended_by_the_close_are_read_whole(
    server: Scripted, session: aiohttp.ClientSession
) -> None:
    data = b'{"items": [1, 2, 3]}'
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += (
        b"3\r\n" + data[:3] + b"\r\n" + b"%x\r\n" % (len(data) - 3) + data[3:] + b"\r\n0\r\n\r\n"
    )
    server.script = [
        chunked,
        answer(gzip.compress(data), 200, "Content-Encoding: gzip"),
        answer(compressed("deflate", data), 200, "Content-Encoding: deflate"),
        answer(compressed("raw deflate", data), 200, "Content-Encoding: deflate"),
        then(b"HTTP/1.1 200 OK\r\n\r\n" + data, close),
    ]

    bodies = [(await post(session, server.url)).body for _ in range(5)]

    assert bodies == [data] * 5
    assert server.connections == 1  # the one ended by its close was the last


async def test_an_answer_that_says_close_is_not_kept(
    server: Scripted, session: aiohttp.ClientSession
) -> None:
    server.script = [answer(b"{}", 200, "Connection: close"), answer()]

    await post(session, server.url)
    await post(session, server.url)

    assert server.connections == 2


async def test_status_and_headers_come_back_in_any_case(
    server: Scripted, session: aiohttp.ClientSession
) -> None:
    server.script = [answer(b"{}", 503, "Retry-After: 7", "X-Thing: a")]

    got = await post(session, server.url)

    assert (got.status, got.header("retry-after"), got.header("X-THING")) == (503, "7", "a")


async def test_cookies_are_never_kept(server: Scripted, session: aiohttp.ClientSession) -> None:
    server.script = [answer(b"{}", 200, "Set-Cookie: who=user-1; Path=/"), answer()]

    await post(session, server.url)
    await post(session, server.url)

    assert b"cookie:" not in server.requests[1].lower()


# --- Failures, as the gateway reports them ---------------------------------------------------


def client_of(
    session: aiohttp.ClientSession, url: str, timeout_s: float = 5.0
) -> RecommenderClient:
    return RecommenderClient("rec", url, session, timeout_s)


FAILURES = pytest.mark.parametrize(
    ("step", "reason"),
    [
        (close, "connection closed by the recommender before it answered"),
        (then(answer(b"x" * 100)[:-90], close), "answer cut off before its end"),
        (then(answer(b"x" * 100)[:-90], reset), "answer cut off before its end"),
        (b"SMTP ready\r\n\r\n", "answered something unreadable: "),
        (
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n",
            "answered something unreadable",
        ),
        (
            answer(b"\x01\x02", 200, "Content-Encoding: br"),
            "Content-Encoding 'br' is not supported",
        ),
        (answer(b"not gzip", 200, "Content-Encoding: gzip"), "gzip body that does not decompress"),
        (
            answer(gzip.compress(b'{"a": 1}')[:-8], 200, "Content-Encoding: gzip"),
            "gzip body that does not decompress",
        ),
    ],
    ids=[
        "closed",
        "cut off",
        "reset",
        "not http",
        "huge headers",
        "brotli",
        "bad gzip",
        "short gzip",
    ],
)


@FAILURES
async def test_each_failure_is_its_own_error_and_the_connection_is_not_reused(
    server: Scripted, session: aiohttp.ClientSession, step: bytes | Action, reason: str
) -> None:
    server.script = [step, answer()]
    client = client_of(session, server.url)

    with pytest.raises(RecommenderError) as caught:
        await client.recommend(BODY, {})

    assert caught.value.reason.startswith(reason), caught.value.reason
    assert await client.recommend(BODY, {}) == {"ok": True}
    # A connection whose answer came whole (its body refused) may carry the next call; one
    # whose answer is in doubt may not.
    whole = reason.startswith(("Content-Encoding", "gzip"))
    assert server.connections == (1 if whole else 2)
    assert await until(lambda: server.open == 1)


@FAILURES
async def test_both_clients_make_one_failure_on_the_wire_the_same_error(
    server: Scripted, session: aiohttp.ClientSession, step: bytes | Action, reason: str
) -> None:
    server.script = [step, step]
    sessions = ThreadSessions(keepalive_timeout_s=5.0, user_agent="fusion-gateway/test")
    blocking = BlockingRecommenderClient("rec", server.url, sessions, 5.0)
    try:
        with pytest.raises(GatewayError) as from_async:
            await client_of(session, server.url).recommend(BODY, {})
        with pytest.raises(GatewayError) as from_blocking:
            await asyncio.to_thread(blocking.recommend, BODY, {})
    finally:
        sessions.close()

    errors = [from_async.value, from_blocking.value]
    assert len({(type(e), getattr(e, "retryable", None)) for e in errors}) == 1
    # The reasons' own words may differ past the kind (each library names a parse error its way).
    reasons = [getattr(e, "reason", "") for e in errors]
    assert all(r.startswith(reason) for r in reasons), reasons


async def test_a_refused_connection_says_where_and_why(session: aiohttp.ClientSession) -> None:
    with closed_port() as port:
        client = client_of(session, f"http://127.0.0.1:{port}/test")
        with pytest.raises(RecommenderError) as caught:
            await client.recommend(BODY, {})

    assert caught.value.reason == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    assert caught.value.retryable is True


async def test_an_unknown_host_says_so(session: aiohttp.ClientSession) -> None:
    client = client_of(session, "http://no-such-host.invalid:8080/test")

    with pytest.raises(RecommenderError) as caught:
        await client.recommend(BODY, {})

    assert (
        caught.value.reason == "cannot connect to no-such-host.invalid:8080: host name not resolved"
    )


async def test_a_call_cut_short_drops_its_connection(
    server: Scripted, session: aiohttp.ClientSession
) -> None:
    server.script = [wait(30, answer()), answer()]
    client = client_of(session, server.url, timeout_s=0.2)

    with pytest.raises(RecommenderTimeout, match="no answer within 200 ms"):
        await client.recommend(BODY, {})

    # Reused, the first connection would carry the next request to a server still waiting.
    assert await client_of(session, server.url).recommend(BODY, {}) == {"ok": True}
    assert server.connections == 2


@pytest.mark.parametrize("part", ["head", "body"])
async def test_a_trickling_answer_is_cut_at_the_call_s_budget(
    server: Scripted, session: aiohttp.ClientSession, part: str
) -> None:
    whole = answer(b'{"items": []}' + b" " * 200)
    head, _, body = whole.partition(b"\r\n\r\n")
    sent = [0]
    if part == "head":
        server.script = [trickle(whole, 0.02, sent)]
    else:
        server.script = [then(head + b"\r\n\r\n", trickle(body, 0.02, sent))]
    client = client_of(session, server.url, timeout_s=0.5)

    started = time.perf_counter()
    with pytest.raises(RecommenderTimeout):
        await client.recommend(BODY, {})
    elapsed = time.perf_counter() - started

    # Each byte came well within any read timeout; only the call's total budget cut it.
    assert 0.5 <= elapsed < 1.5
    assert sent[0] > 5
    assert await until(lambda: server.open == 0)


# --- Bounded answers -------------------------------------------------------------------------


@OVERSIZED
async def test_an_answer_over_its_cap_fails_and_its_connection_is_dropped(
    server: Scripted, session: aiohttp.ClientSession, step: bytes | Action, message: str
) -> None:
    server.script = [step, answer()]
    client = client_of(session, server.url)

    with pytest.raises(BadRecommenderResponse) as caught:
        await client.recommend(BODY, {}, limits=AnswerLimits(max_bytes=CAP))
    assert message in caught.value.reason
    assert caught.value.retryable is False
    assert await client.recommend(BODY, {}) == {"ok": True}

    # Not read on past the cap, the rest of the answer is in doubt: its connection is dropped
    # (a compressed answer that arrived whole, and only decompressed too far, may be kept).
    whole = "decompresses" in message
    assert server.connections == (1 if whole else 2)
    assert await until(lambda: server.open == 1)


async def test_a_gzip_bomb_is_not_decompressed_past_the_cap(
    server: Scripted, session: aiohttp.ClientSession
) -> None:
    # 1,000 MiB of zeros in 1 MB: decompressed whole, this process would grow by as much.
    server.script = [answer(b"".join(gzip_bomb(1000 << 20)), 200, "Content-Encoding: gzip")]

    with pytest.raises(TooLarge, match="decompresses to more than the limit of 1048576"):
        await post(session, server.url, max_bytes=1 << 20)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw deflate"])
async def test_an_answer_at_its_cap_is_read_whole(
    server: Scripted, session: aiohttp.ClientSession, coding: str
) -> None:
    body = b"[" + b"0," * ((CAP - 3) // 2) + b"0]"
    body += b" " * (CAP - len(body))
    header = "Content-Encoding: " + coding.split()[-1]
    server.script = [answer(body), answer(compressed(coding, body), 200, header)]

    plain = await post(session, server.url)
    decoded = await post(session, server.url)

    assert plain.body == decoded.body == body
    assert server.connections == 1


# --- The session's pool ----------------------------------------------------------------------


async def test_connections_per_host_are_capped_and_calls_wait_for_one(server: Scripted) -> None:
    server.script = [wait(0.1, answer()) for _ in range(4)]
    session = await session_of(limit_per_host=1)
    try:
        answers = await asyncio.gather(*(post(session, server.url) for _ in range(4)))
    finally:
        await session.close()

    assert [a.status for a in answers] == [200] * 4
    assert (server.connections, server.most_open) == (1, 1)


async def test_idle_connections_close_after_the_keep_alive(server: Scripted) -> None:
    server.script = [answer()]
    session = await session_of(keepalive_timeout_s=0.2)
    try:
        await post(session, server.url)
        assert server.open == 1
        assert await until(lambda: server.open == 0)
    finally:
        await session.close()


async def test_a_closed_session_closes_its_connections(server: Scripted) -> None:
    server.script = [answer()]
    session = await session_of(keepalive_timeout_s=30)
    await post(session, server.url)

    await session.close()

    assert await until(lambda: server.open == 0)


# --- HTTPS -----------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path)


async def test_https_is_verified_and_an_untrusted_certificate_refused_by_both_clients(
    server: Scripted, session: aiohttp.ClientSession, certificate: tuple[Path, Path]
) -> None:
    sessions = ThreadSessions()
    async with tls_url(server, certificate) as url:
        blocking = BlockingRecommenderClient("rec", url, sessions, 5.0)
        try:
            with pytest.raises(RecommenderError) as from_async:
                await client_of(session, url).recommend(BODY, {})
            with pytest.raises(RecommenderError) as from_blocking:
                await asyncio.to_thread(blocking.recommend, BODY, {})
        finally:
            sessions.close()

    port = url.rsplit(":", 1)[1].split("/")[0]
    for caught in (from_async, from_blocking):
        assert caught.value.reason.startswith(
            f"cannot connect to 127.0.0.1:{port}: TLS certificate not trusted: "
        ), caught.value.reason
    assert server.requests == []


async def test_https_with_the_configured_ca_file_is_read_over_one_connection(
    server: Scripted, certificate: tuple[Path, Path]
) -> None:
    server.script = [answer(b'{"over": "tls"}'), answer(b'{"again": true}')]
    trusting = await session_of(ca_file=str(certificate[0]))
    try:
        async with tls_url(server, certificate) as url:
            first = await post(trusting, url)
            second = await post(trusting, url)
    finally:
        await trusting.close()

    assert (first.body, second.body) == (b'{"over": "tls"}', b'{"again": true}')
    assert server.connections == 1


async def test_a_refused_answer_is_not_kept_by_the_error_s_traceback(
    server: Scripted, session: aiohttp.ClientSession
) -> None:
    server.script = [chunked_forever()]

    with pytest.raises(BadRecommenderResponse) as caught:
        await client_of(session, server.url).recommend(BODY, {}, limits=AnswerLimits(max_bytes=CAP))

    # The error keeps its cause and where it failed, but no frame on the way holds the answer
    # (an aiohttp response and its buffered body), which a cycle would keep until a collection.
    cause = caught.value.__cause__
    assert isinstance(cause, TooLarge)
    frames = []
    trace = cause.__traceback__
    while trace is not None:
        frames.append(trace.tb_frame)
        trace = trace.tb_next
    assert frames
    held = [type(v).__name__ for frame in frames for v in frame.f_locals.values()]
    assert "ClientResponse" not in held and "BodyReader" not in held, held

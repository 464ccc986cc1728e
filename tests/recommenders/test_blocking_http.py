"""The threads' HTTP client (`gateway.recommenders.blocking_http`, on requests) against a scripted
server.

Real sockets on loopback (`tests.scripted`): every kind of answer, each failure, the caps, a
call's connection dropped when it fails and kept when it does not, and every call held to its
budget however slowly the recommender sends. The calls are made from one thread of their own
(`caller`), as the `threads` fan-out makes them: a thread keeps its session, and with it its
connections, from one call to the next.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar, cast

import pytest
import requests

from gateway.recommenders.blocking_http import SessionClosed, ThreadSessions, _Connection, _Watchdog
from gateway.recommenders.bodies import Answer, TooLarge
from tests.helpers import closed_port
from tests.hostile import gzip_bomb
from tests.scripted import (
    BODY_FAILURES,
    CAP,
    OVERSIZED,
    Action,
    Scripted,
    answer,
    bomb,
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

T = TypeVar("T")


@pytest.fixture
async def server() -> AsyncIterator[Scripted]:
    async with scripted_server() as scripted:
        yield scripted


@pytest.fixture
def caller() -> Iterator[ThreadPoolExecutor]:
    """One thread that makes a test's calls, one after another."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="caller") as executor:
        yield executor


@pytest.fixture
def sessions() -> Iterator[ThreadSessions]:
    client = ThreadSessions(keepalive_timeout_s=5.0, user_agent="fusion-gateway/test")
    yield client
    client.close()


class Calls:
    """A test's calls through `sessions`, made in `caller`'s thread (the server is on the loop)."""

    def __init__(self, sessions: ThreadSessions, caller: ThreadPoolExecutor):
        self.sessions = sessions
        self.caller = caller

    async def run(self, function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.caller, function)

    async def post(
        self,
        url: str,
        timeout_s: float = 10.0,
        max_bytes: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sessions = self.sessions
        return await self.run(
            lambda: sessions.post(url, b"{}", headers or {}, timeout_s, max_bytes)
        )


@pytest.fixture
def calls(sessions: ThreadSessions, caller: ThreadPoolExecutor) -> Calls:
    return Calls(sessions, caller)


async def eventually(condition: Callable[[], bool], within_s: float = 5.0) -> bool:
    """Whether `condition` comes true within `within_s` (the server sees a close a bit later)."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def chain_of(error: BaseException) -> list[BaseException]:
    """`error` and what it wraps, as `gateway.recommenders.clients` walks it: causes, reasons,
    arguments."""
    found: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(found) < 10:
        found.append(current)
        inner = current.__cause__ or current.__context__ or getattr(current, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in current.args if isinstance(a, BaseException)), None)
        current = inner
    return found


def headers_of(request: bytes) -> dict[bytes, bytes]:
    head = request.partition(b"\r\n\r\n")[0]
    return dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])


# --- Answers, and the connection kept ------------------------------------------------------


async def test_every_kind_of_answer_is_read_whole_on_one_kept_connection(
    server: Scripted, calls: Calls
) -> None:
    chunked = (
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{"a\r\n5\r\n": 1}\r\n0\r\n\r\n'
    )
    server.script = [
        answer(b'{"length": 1}'),
        chunked,
        answer(gzip.compress(b'{"z": "gzip"}'), 200, "Content-Encoding: gzip"),
        answer(compressed("deflate", b'{"z": "zlib"}'), 200, "Content-Encoding: deflate"),
        answer(compressed("raw deflate", b'{"z": "raw"}'), 200, "Content-Encoding: deflate"),
        b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b'{"after": "interim"}', 503, "Retry-After: 3"),
        then(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"until": "the end"}', close),
    ]

    answers = [await calls.post(server.url) for _ in range(7)]

    assert [a.body for a in answers] == [
        b'{"length": 1}',
        b'{"a": 1}',
        b'{"z": "gzip"}',
        b'{"z": "zlib"}',
        b'{"z": "raw"}',
        b'{"after": "interim"}',
        b'{"until": "the end"}',
    ]
    assert (answers[5].status, answers[5].header("retry-after")) == (503, "3")
    assert answers[5].header("RETRY-AFTER") == "3"
    assert server.connections == 1


async def test_the_request_sent_is_a_json_post_with_the_gateways_headers(
    server: Scripted, calls: Calls
) -> None:
    server.script = [answer()]

    await calls.post(server.url, headers={"X-Request-ID": "req-1"})

    request = server.requests[0]
    assert request.split(b"\r\n")[0] == b"POST /test HTTP/1.1"
    assert request.partition(b"\r\n\r\n")[2] == b"{}"
    assert headers_of(request) == {
        b"Host": server.url.split("/")[2].encode(),
        b"User-Agent": b"fusion-gateway/test",
        b"Accept": b"application/json",
        b"Accept-Encoding": b"gzip, deflate",  # what `gateway.recommenders.bodies` decompresses
        b"Content-Type": b"application/json",
        b"Content-Length": b"2",
        b"X-Request-ID": b"req-1",
    }


async def test_an_answer_that_says_close_is_not_kept(server: Scripted, calls: Calls) -> None:
    server.script = [answer(b"{}", 200, "Connection: close"), answer(b"{}")]

    await calls.post(server.url)
    await calls.post(server.url)

    assert server.connections == 2


async def test_a_redirect_is_the_answer_and_its_body_is_capped(
    server: Scripted, calls: Calls
) -> None:
    server.script = [
        answer(b"{}", 302, "Location: /elsewhere"),
        # requests reads a redirect's body whole to look ahead, unless told there is none.
        answer(bomb("gzip", 10 * CAP), 302, "Location: /elsewhere", "Content-Encoding: gzip"),
    ]

    redirect = await calls.post(server.url)
    with pytest.raises(TooLarge, match="decompresses to more than"):
        await calls.post(server.url, max_bytes=CAP)

    assert (redirect.status, redirect.header("location")) == (302, "/elsewhere")
    assert len(server.requests) == 2  # nothing followed


async def test_no_cookie_is_kept_or_sent(
    server: Scripted, calls: Calls, sessions: ThreadSessions
) -> None:
    server.script = [answer(b"{}", 200, "Set-Cookie: session=abc; Path=/"), answer()]

    await calls.post(server.url)
    await calls.post(server.url)

    assert b"Cookie" not in headers_of(server.requests[1])
    # The calling thread's session, looked into: a recommender that set a new cookie on each
    # answer would otherwise grow its jar as long as the thread lives.
    kept = await calls.run(lambda: len(sessions._local.session.cookies))
    assert kept == 0


async def test_nothing_is_taken_from_the_environment(
    server: Scripted, calls: Calls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    server.script = [answer()]

    with closed_port() as port:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
        assert (await calls.post(server.url)).status == 200  # straight, not through the proxy

    assert b"Authorization" not in headers_of(server.requests[0])


async def test_each_thread_has_its_own_session_closed_once_the_thread_has_ended(
    server: Scripted, sessions: ThreadSessions
) -> None:
    server.script = [answer(), answer()]

    def call_from_a_thread_of_its_own() -> None:
        thread = threading.Thread(target=sessions.post, args=(server.url, b"{}", {}, 10.0))
        thread.start()
        thread.join()

    await asyncio.to_thread(call_from_a_thread_of_its_own)
    assert await eventually(lambda: server.open == 1)  # the first thread's connection, kept
    await asyncio.to_thread(call_from_a_thread_of_its_own)

    assert server.connections == 2
    # The second thread's first call closed the session of the first, which had ended.
    assert await eventually(lambda: server.open == 1)


# --- Failures --------------------------------------------------------------------------------


async def test_a_refused_connection_is_requests_error_around_the_systems(calls: Calls) -> None:
    with closed_port() as port, pytest.raises(requests.ConnectionError) as caught:
        await calls.post(f"http://127.0.0.1:{port}/test")

    assert any(isinstance(error, ConnectionRefusedError) for error in chain_of(caught.value))


@pytest.mark.parametrize(
    ("step", "cause"),
    [
        (close, ConnectionError),  # http.client's RemoteDisconnected
        (reset, ConnectionResetError),
        (b"SMTP ready\r\n\r\n", Exception),  # http.client's BadStatusLine
    ],
    ids=["closed", "reset", "not http"],
)
async def test_a_connection_that_fails_before_the_answer_is_not_reused(
    server: Scripted, calls: Calls, step: bytes | Action, cause: type[BaseException]
) -> None:
    server.script = [step, answer()]

    with pytest.raises(requests.ConnectionError) as caught:
        await calls.post(server.url)
    assert (await calls.post(server.url)).status == 200

    assert any(isinstance(e, cause) for e in chain_of(caught.value)[1:])
    assert server.connections == 2


@BODY_FAILURES
async def test_a_body_that_cannot_be_read_fails_and_its_connection_is_dropped(
    server: Scripted, calls: Calls, step: bytes | Action, error: type, message: str
) -> None:
    server.script = [step, answer()]

    with pytest.raises(error, match=message):
        await calls.post(server.url)
    assert (await calls.post(server.url)).status == 200

    assert server.connections == 2


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(
    server: Scripted, calls: Calls
) -> None:
    with pytest.raises(ValueError, match="return character"):
        await calls.post(server.url, headers={"X-Evil": "a\r\nHost: b"})

    assert server.requests == []


# --- Bounded answers -------------------------------------------------------------------------


@OVERSIZED
async def test_an_answer_over_its_cap_fails_and_its_connection_is_dropped(
    server: Scripted, calls: Calls, step: bytes | Action, message: str
) -> None:
    server.script = [step, answer()]

    with pytest.raises(TooLarge, match=re.escape(message)):
        await calls.post(server.url, max_bytes=CAP)
    assert (await calls.post(server.url)).status == 200

    assert server.connections == 2
    assert await eventually(lambda: server.open == 1)


async def test_an_answer_over_its_cap_is_refused_at_the_byte_past_it(
    server: Scripted, calls: Calls
) -> None:
    # The cap and one byte at once, then more a byte at a time: a client that read on to fill
    # a larger buffer would wait for them, and run out of budget rather than refuse the answer.
    sent = [0]
    head = b"HTTP/1.1 200 OK\r\n\r\n"  # ended by the close: nothing says how much is to come
    server.script = [then(head + b"x" * (CAP + 1), trickle(b"x" * 200, 0.05, sent))]

    with pytest.raises(TooLarge, match=f"larger than the limit of {CAP} bytes"):
        await calls.post(server.url, timeout_s=5.0, max_bytes=CAP)

    assert sent[0] < 40
    assert await eventually(lambda: server.open == 0)


async def test_a_gzip_bomb_is_not_decompressed_past_the_cap(server: Scripted, calls: Calls) -> None:
    # 1,000 MiB of zeros in 1 MB: decompressed whole, this process would grow by as much.
    server.script = [answer(b"".join(gzip_bomb(1000 << 20)), 200, "Content-Encoding: gzip")]

    with pytest.raises(TooLarge, match="decompresses to more than the limit of 1048576"):
        await calls.post(server.url, max_bytes=1 << 20)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw deflate"])
async def test_an_answer_at_its_cap_is_read_whole(
    server: Scripted, calls: Calls, coding: str
) -> None:
    body = b"[" + b"0," * ((CAP - 3) // 2) + b"0]"
    body += b" " * (CAP - len(body))
    header = "Content-Encoding: " + coding.split()[-1]
    server.script = [answer(body), answer(compressed(coding, body), 200, header)]

    plain = await calls.post(server.url, max_bytes=CAP)
    decoded = await calls.post(server.url, max_bytes=CAP)

    assert plain.body == decoded.body == body
    assert server.connections == 1


# --- The budget ------------------------------------------------------------------------------

BUDGET_S = 0.5


async def test_headers_trickled_a_byte_at_a_time_are_cut_at_the_budget(
    server: Scripted, calls: Calls
) -> None:
    # 300 bytes at one every 50 ms: 15 s, each byte well within any per-read timeout.
    sent = [0]
    server.script = [trickle(answer(b'{"items": []}', 200, "X-Pad: " + "." * 250), 0.05, sent)]

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await calls.post(server.url, timeout_s=BUDGET_S)
    elapsed = time.monotonic() - started

    assert elapsed < BUDGET_S + 1.0
    assert await eventually(lambda: server.open == 0)  # the connection was dropped
    assert sent[0] < 100


async def test_a_body_trickled_a_byte_at_a_time_is_cut_at_the_budget(
    server: Scripted, calls: Calls
) -> None:
    sent = [0]
    body = b'{"items": [' + b" " * 300 + b"]}"
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    server.script = [then(head, trickle(body, 0.05, sent))]

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await calls.post(server.url, timeout_s=BUDGET_S)
    elapsed = time.monotonic() - started

    assert elapsed < BUDGET_S + 1.0
    assert await eventually(lambda: server.open == 0)
    assert sent[0] < 100


async def test_a_body_ended_by_the_close_and_cut_at_the_budget_is_not_an_answer(
    server: Scripted, calls: Calls
) -> None:
    # Cut by the watchdog, its end looks like the close that ends it: it must not pass for one.
    sent = [0]
    body = b'{"items": [' + b" " * 300 + b"]}"
    server.script = [then(b"HTTP/1.1 200 OK\r\n\r\n", trickle(body, 0.05, sent))]

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await calls.post(server.url, timeout_s=BUDGET_S)

    # http.client let go of the connection's socket (the answer ends with it): cut all the same.
    assert time.monotonic() - started < BUDGET_S + 1.0
    assert await eventually(lambda: server.open == 0)


async def test_a_tls_handshake_that_never_ends_is_cut_at_the_budget(
    server: Scripted, calls: Calls
) -> None:
    # The scripted server waits for a request's head; the client hello never gives it one.
    url = server.url.replace("http://", "https://")

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await calls.post(url, timeout_s=BUDGET_S)

    assert time.monotonic() - started < BUDGET_S + 1.0
    assert await eventually(lambda: server.open == 0)


async def test_calls_that_end_in_time_keep_their_connection_past_their_deadlines(
    server: Scripted, calls: Calls
) -> None:
    # Short budgets, each passing while later calls use the same connection: a watchdog that
    # cut an ended call's connection would fail one of them, and open another connection.
    budget_s = 0.3
    server.script = [answer() for _ in range(10_000)]

    def many() -> int:
        made = 0
        until = time.monotonic() + 4 * budget_s
        while made < 200 or time.monotonic() < until:
            assert calls.sessions.post(server.url, b"{}", {}, budget_s).status == 200
            made += 1
        return made

    made = await calls.run(many)

    assert len(server.requests) == made
    assert server.connections == 1


def test_the_watchdog_cuts_a_call_past_its_deadline_and_never_one_that_ended() -> None:
    class Connection:
        cuts = 0

        def cut(self) -> None:
            self.cuts += 1

    watchdog = _Watchdog()
    try:
        ended, running = Connection(), Connection()
        first = watchdog.watch(time.monotonic() + 0.05, 4.0)
        watchdog.attach(first, cast(_Connection, ended))
        assert watchdog.end(first) is False
        second = watchdog.watch(time.monotonic() + 0.1, 4.0)
        watchdog.attach(second, cast(_Connection, running))
        time.sleep(0.3)

        assert (ended.cuts, running.cuts) == (0, 1)
        assert watchdog.end(second) is True
        with pytest.raises(TimeoutError):
            watchdog.attach(second, cast(_Connection, running))
    finally:
        watchdog.stop()


# --- Keep-alive ------------------------------------------------------------------------------


async def test_an_idle_connection_the_server_closed_is_not_used(
    server: Scripted, calls: Calls
) -> None:
    server.script = [then(answer(), close), answer()]  # closes after answering, unannounced

    assert (await calls.post(server.url)).status == 200
    assert await eventually(lambda: server.open == 0)
    assert (await calls.post(server.url)).status == 200

    assert server.connections == 2


async def test_a_connection_idle_past_the_keep_alive_is_replaced(
    server: Scripted, caller: ThreadPoolExecutor
) -> None:
    brief = ThreadSessions(keepalive_timeout_s=0.2)
    calls = Calls(brief, caller)
    server.script = [answer(), answer(), answer()]
    try:
        await calls.post(server.url)
        await calls.post(server.url)  # at once: the same connection
        await asyncio.sleep(0.3)
        await calls.post(server.url)
    finally:
        brief.close()

    assert server.connections == 2
    assert await eventually(lambda: server.open == 0)  # the gateway closed the idle one


# --- Closing ---------------------------------------------------------------------------------


async def test_a_closed_client_closes_its_connections_and_refuses_calls(
    server: Scripted, calls: Calls, sessions: ThreadSessions
) -> None:
    server.script = [answer()]
    await calls.post(server.url)

    sessions.close()

    assert await eventually(lambda: server.open == 0)
    with pytest.raises(SessionClosed):
        await calls.post(server.url)
    assert len(server.requests) == 1


async def test_a_call_in_flight_as_the_client_closes_ends_and_its_connection_is_closed(
    server: Scripted, calls: Calls, sessions: ThreadSessions
) -> None:
    server.script = [answer(), wait(0.3, answer(b'{"late": true}'))]
    await calls.post(server.url)

    in_flight = asyncio.ensure_future(calls.post(server.url))
    await asyncio.sleep(0.1)
    sessions.close()

    assert (await in_flight).body == b'{"late": true}'
    assert await eventually(lambda: server.open == 0)
    assert await eventually(
        lambda: not any(t.name == "blocking-http-watchdog" for t in threading.enumerate())
    )


# --- HTTPS -----------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path)


@pytest.fixture
async def tls(server: Scripted, certificate: tuple[Path, Path]) -> AsyncIterator[str]:
    async with tls_url(server, certificate) as url:
        yield url


@pytest.fixture
def trusting(certificate: tuple[Path, Path], caller: ThreadPoolExecutor) -> Iterator[Calls]:
    """Calls through sessions that trust the self-signed certificate (`ca_file`)."""
    client = ThreadSessions(keepalive_timeout_s=5.0, ca_file=str(certificate[0]))
    yield Calls(client, caller)
    client.close()


async def test_https_is_verified_and_an_untrusted_certificate_refused(
    server: Scripted, calls: Calls, tls: str
) -> None:
    with pytest.raises(requests.exceptions.SSLError) as caught:
        await calls.post(tls)

    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in chain_of(caught.value))
    assert server.requests == []


async def test_https_answers_are_read_and_a_new_connection_made_once(
    server: Scripted, caller: ThreadPoolExecutor, tls: str, certificate: tuple[Path, Path]
) -> None:
    brief = ThreadSessions(keepalive_timeout_s=0.2, ca_file=str(certificate[0]))
    calls = Calls(brief, caller)
    server.script = [
        answer(b'{"over": "tls"}'),
        answer(b'{"again": true}', 200, "Connection: close"),
        answer(b'{"anew": true}'),
    ]
    try:
        first = await calls.post(tls)
        second = await calls.post(tls)  # the same connection, which the answer closes
        await asyncio.sleep(0.3)  # the connection's last answer is older than the keep-alive
        third = await calls.post(tls)
    finally:
        brief.close()

    assert [a.body for a in (first, second, third)] == [
        b'{"over": "tls"}',
        b'{"again": true}',
        b'{"anew": true}',
    ]
    # One connection for the third call: a new one is not idle, however old its last answer.
    assert server.connections == 2


async def test_a_body_trickled_over_tls_is_cut_at_the_budget(
    server: Scripted, trusting: Calls, tls: str
) -> None:
    sent = [0]
    body = b'{"items": [' + b" " * 300 + b"]}"
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    server.script = [then(head, trickle(body, 0.05, sent))]

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await trusting.post(tls, timeout_s=BUDGET_S)

    assert time.monotonic() - started < BUDGET_S + 1.0
    assert await eventually(lambda: server.open == 0)
    assert sent[0] < 100

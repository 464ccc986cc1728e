"""The recommenders' HTTP client (`gateway.upstream`) against a server scripted byte by byte.

Real sockets on loopback: the server reads each request and does what the test scripted for
it (answer these bytes, close, reset, wait), and counts connections.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway.blocking import BlockingPool
from gateway.upstream import (
    Answer,
    ConnectFailed,
    ConnectionPool,
    Disconnected,
    Malformed,
    PoolClosed,
    TooLarge,
    Truncated,
)
from tests.helpers import closed_port
from tests.hostile import gzip_bomb

Action = Callable[[asyncio.StreamWriter], Awaitable[None]]


def answer(body: bytes = b'{"ok": true}', status: int = 200, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Scripted:
    """A server on a free loopback port that answers each request as `script` says."""

    def __init__(self) -> None:
        self.script: list[bytes | Action] = []
        self.requests: list[bytes] = []
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/test"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.requests.append(head + await reader.readexactly(length))
                step = self.script.pop(0)
                if isinstance(step, bytes):
                    writer.write(step)
                    await writer.drain()
                else:
                    await step(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Scripted]:
    scripted = Scripted()
    scripted.server = await asyncio.start_server(scripted._serve, "127.0.0.1", 0)
    yield scripted
    scripted.server.close()


@pytest.fixture
async def connections() -> AsyncIterator[ConnectionPool]:
    pool = ConnectionPool(keepalive_timeout_s=5.0, user_agent="fusion-gateway/test")
    yield pool
    await pool.close()


async def post(pool: ConnectionPool, url: str) -> Any:
    return await pool.post(url, b'{"user_id": "u"}', {"X-Request-ID": "req-1"})


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()


async def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def then(data: bytes, after: Action) -> Action:
    async def act(writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        await after(writer)

    return act


def wait(seconds: float, data: bytes) -> Action:
    async def act(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(seconds)
        writer.write(data)
        await writer.drain()

    return act


# --- Requests and answers --------------------------------------------------------------------


async def test_the_request_and_a_keep_alive_connection_for_the_next(
    server: Scripted, connections: ConnectionPool
) -> None:
    server.script = [answer(b'{"n": %d}' % i) for i in range(5)]

    bodies = [(await post(connections, server.url)).body for _ in range(5)]

    assert bodies == [b'{"n": %d}' % i for i in range(5)]
    assert server.connections == 1
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /test HTTP/1.1"
    headers = dict(line.split(b": ", 1) for line in lines[1:])
    assert headers[b"Host"] == server.url.split("/")[2].encode()
    assert headers[b"Content-Type"] == b"application/json"
    assert headers[b"Content-Length"] == b"16"
    assert headers[b"X-Request-ID"] == b"req-1"
    assert headers[b"User-Agent"] == b"fusion-gateway/test"
    assert body == b'{"user_id": "u"}'


async def test_answers_chunked_compressed_or_ended_by_the_close_are_read_whole(
    server: Scripted, connections: ConnectionPool
) -> None:
    chunked = (
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{"a\r\n5\r\n": 1}\r\n0\r\n\r\n'
    )
    server.script = [
        chunked,
        answer(gzip.compress(b'{"z": "gzip"}'), 200, "Content-Encoding: gzip"),
        answer(zlib.compress(b'{"z": "deflate"}'), 200, "Content-Encoding: deflate"),
        b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b'{"after": "interim"}'),
        then(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"until": "the end"}', close),
    ]

    bodies = [(await post(connections, server.url)).body for _ in range(5)]

    assert bodies == [
        b'{"a": 1}',
        b'{"z": "gzip"}',
        b'{"z": "deflate"}',
        b'{"after": "interim"}',
        b'{"until": "the end"}',
    ]


async def test_an_answer_that_says_close_is_not_kept(
    server: Scripted, connections: ConnectionPool
) -> None:
    server.script = [answer(b"{}", 200, "Connection: close"), answer(b"{}")]

    await post(connections, server.url)
    await post(connections, server.url)

    assert server.connections == 2


async def test_status_and_headers_come_back(server: Scripted, connections: ConnectionPool) -> None:
    server.script = [answer(b'{"error": "busy"}', 503, "Retry-After: 3")]

    got = await post(connections, server.url)

    assert (got.status, got.header(b"retry-after"), got.header(b"x-missing")) == (503, "3", None)


# --- Failures --------------------------------------------------------------------------------


FAILURES = pytest.mark.parametrize(
    ("step", "error", "message"),
    [
        (close, Disconnected, "closed before answering"),
        (then(answer(b"x" * 100)[:-90], close), Truncated, "cut off"),
        (then(answer(b"x" * 100)[:-90], reset), Truncated, "cut off"),
        (b"SMTP ready\r\n\r\n", Malformed, "not an HTTP answer"),
        (
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n",
            Malformed,
            "answer headers larger than 65536 bytes",
        ),
        (answer(b"\x01\x02", 200, "Content-Encoding: br"), Malformed, "'br' is not supported"),
        (answer(b"not gzip", 200, "Content-Encoding: gzip"), Malformed, "does not decompress"),
    ],
    ids=["closed", "cut off", "reset", "not http", "huge headers", "brotli", "bad gzip"],
)


@FAILURES
async def test_each_failure_is_its_own_error_and_the_connection_is_not_reused(
    server: Scripted, connections: ConnectionPool, step: bytes | Action, error: type, message: str
) -> None:
    server.script = [step, answer()]

    with pytest.raises(error, match=message):
        await post(connections, server.url)
    assert (await post(connections, server.url)).status == 200

    assert server.connections == 2


async def test_a_refused_connection_says_where_and_why(connections: ConnectionPool) -> None:
    with closed_port() as port, pytest.raises(ConnectFailed) as caught:
        await post(connections, f"http://127.0.0.1:{port}/test")

    assert str(caught.value) == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    assert connections.open_connections == 0


async def test_a_call_cut_short_drops_its_connection(
    server: Scripted, connections: ConnectionPool
) -> None:
    server.script = [wait(30, answer()), answer()]

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await post(connections, server.url)
    assert (await post(connections, server.url)).status == 200

    assert server.connections == 2
    await asyncio.sleep(0.05)
    assert connections.open_connections == 1  # the aborted one is gone, the good one kept


# --- The pool --------------------------------------------------------------------------------


async def test_connections_per_host_are_capped_and_calls_wait_for_one(server: Scripted) -> None:
    capped = ConnectionPool(limit_per_host=2)
    server.script = [wait(0.2, answer()) for _ in range(6)]
    try:
        answers = await asyncio.gather(*(post(capped, server.url) for _ in range(6)))
    finally:
        await capped.close()

    assert [a.status for a in answers] == [200] * 6
    assert server.most_open == 2
    assert server.connections == 2


async def test_idle_connections_close_after_the_keep_alive(server: Scripted) -> None:
    brief = ConnectionPool(keepalive_timeout_s=0.1)
    server.script = [answer()]
    try:
        await post(brief, server.url)
        assert brief.open_connections == 1
        for _ in range(100):
            if brief.open_connections == 0 and server.open == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        await brief.close()

    assert (brief.open_connections, server.open) == (0, 0)


async def test_a_closed_pool_closes_its_connections_and_refuses_calls(server: Scripted) -> None:
    closing = ConnectionPool()
    server.script = [answer()]
    await post(closing, server.url)

    await closing.close()

    with pytest.raises(PoolClosed):
        await post(closing, server.url)
    for _ in range(100):
        if server.open == 0:
            break
        await asyncio.sleep(0.05)
    assert server.open == 0


async def test_a_line_break_in_a_header_is_refused(connections: ConnectionPool) -> None:
    with pytest.raises(ValueError, match="line break"):
        await connections.post("http://127.0.0.1:9/test", b"{}", {"X-Evil": "a\r\nHost: b"})


# --- Bounded answers -------------------------------------------------------------------------

CAP = 4096


def chunked_forever(chunk: bytes = b"x" * 1000) -> Action:
    """An answer whose chunks never end (until the client leaves)."""

    async def act(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while not writer.is_closing():
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()

    return act


def compressed(coding: str, data: bytes) -> bytes:
    """`data` compressed with `coding`: gzip, deflate (zlib's wrapping) or raw deflate."""
    wbits = {"gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}.get(coding, -zlib.MAX_WBITS)
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return packer.compress(data) + packer.flush()


def bomb(coding: str, size: int) -> bytes:
    """`size` zero bytes, compressed with `coding`."""
    return compressed(coding, bytes(size))


OVERSIZED = pytest.mark.parametrize(
    ("step", "message"),
    [
        (
            # Announced, and never sent: the call must fail on the headers alone.
            f"HTTP/1.1 200 OK\r\nContent-Length: {CAP + 1}\r\n\r\n".encode(),
            f"answer larger than the limit of {CAP} bytes (Content-Length: {CAP + 1})",
        ),
        (chunked_forever(), f"answer larger than the limit of {CAP} bytes"),
        (then(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * (CAP + 1), close), "larger than the limit"),
        (
            answer(bomb("gzip", 10 * CAP), 200, "Content-Encoding: gzip"),
            f"answer decompresses to more than the limit of {CAP} bytes",
        ),
        (
            answer(bomb("deflate", 10 * CAP), 200, "Content-Encoding: deflate"),
            "decompresses to more than",
        ),
        (
            answer(bomb("raw deflate", 10 * CAP), 200, "Content-Encoding: deflate"),
            "decompresses to more than",
        ),
    ],
    ids=["announced", "endless chunks", "until the close", "gzip", "deflate", "raw deflate"],
)


@OVERSIZED
async def test_an_answer_over_its_cap_fails_and_its_connection_is_dropped(
    server: Scripted, connections: ConnectionPool, step: bytes | Action, message: str
) -> None:
    server.script = [step, answer()]

    with pytest.raises(TooLarge, match=re.escape(message)):
        await connections.post(server.url, b"{}", {}, max_bytes=CAP)
    assert (await post(connections, server.url)).status == 200

    assert server.connections == 2
    for _ in range(100):  # the server sees the first connection closed
        if server.open == 1:
            break
        await asyncio.sleep(0.05)
    assert server.open == 1


async def test_a_gzip_bomb_is_not_decompressed_past_the_cap(
    server: Scripted, connections: ConnectionPool
) -> None:
    # 1,000 MiB of zeros in 1 MB: decompressed whole, this process would grow by as much.
    server.script = [answer(b"".join(gzip_bomb(1000 << 20)), 200, "Content-Encoding: gzip")]

    with pytest.raises(TooLarge, match="decompresses to more than the limit of 1048576"):
        await connections.post(server.url, b"{}", {}, max_bytes=1 << 20)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw deflate"])
async def test_an_answer_at_its_cap_is_read_whole(
    server: Scripted, connections: ConnectionPool, coding: str
) -> None:
    body = b"[" + b"0," * ((CAP - 3) // 2) + b"0]"
    body += b" " * (CAP - len(body))
    header = "Content-Encoding: " + coding.split()[-1]
    server.script = [answer(body), answer(compressed(coding, body), 200, header)]

    plain = await connections.post(server.url, b"{}", {}, max_bytes=CAP)
    decoded = await connections.post(server.url, b"{}", {}, max_bytes=CAP)

    assert plain.body == decoded.body == body
    assert server.connections == 1


async def test_a_compressed_answer_cut_short_is_malformed(
    server: Scripted, connections: ConnectionPool
) -> None:
    server.script = [answer(gzip.compress(b'{"a": 1}')[:-8], 200, "Content-Encoding: gzip")]

    with pytest.raises(Malformed, match="gzip body that does not decompress"):
        await post(connections, server.url)


# --- The blocking pool (gateway.blocking): the same answers, from threads --------------------


@pytest.fixture
async def blocking() -> AsyncIterator[BlockingPool]:
    pool = BlockingPool(keepalive_timeout_s=5.0, user_agent="fusion-gateway/test")
    yield pool
    pool.close()


async def post_blocking(
    pool: BlockingPool, url: str, timeout_s: float = 10.0, max_bytes: int | None = None
) -> Answer:
    # In a thread, as the `threads` fan-out calls it: the scripted server runs on this loop.
    return await asyncio.to_thread(pool.post, url, b"{}", {}, timeout_s, max_bytes)


async def test_the_blocking_pool_reads_every_kind_of_answer_and_keeps_its_connection(
    server: Scripted, blocking: BlockingPool
) -> None:
    chunked = (
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{"a\r\n5\r\n": 1}\r\n0\r\n\r\n'
    )
    server.script = [
        chunked,
        answer(gzip.compress(b'{"z": "gzip"}'), 200, "Content-Encoding: gzip"),
        answer(compressed("raw deflate", b'{"z": "raw"}'), 200, "Content-Encoding: deflate"),
        b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b'{"after": "interim"}', 503, "Retry-After: 3"),
        then(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"until": "the end"}', close),
    ]

    answers = [await post_blocking(blocking, server.url) for _ in range(5)]

    assert [a.body for a in answers] == [
        b'{"a": 1}',
        b'{"z": "gzip"}',
        b'{"z": "raw"}',
        b'{"after": "interim"}',
        b'{"until": "the end"}',
    ]
    assert (answers[3].status, answers[3].header(b"retry-after")) == (503, "3")
    assert server.connections == 1
    assert blocking.idle_connections == 0  # the last answer closed it
    assert server.requests[0].split(b"\r\n")[0] == b"POST /test HTTP/1.1"


@FAILURES
async def test_the_blocking_pool_fails_as_the_async_one_does(
    server: Scripted, blocking: BlockingPool, step: bytes | Action, error: type, message: str
) -> None:
    server.script = [step, answer()]

    with pytest.raises(error, match=message):
        await post_blocking(blocking, server.url)
    assert (await post_blocking(blocking, server.url)).status == 200

    assert server.connections == 2


@OVERSIZED
async def test_the_blocking_pool_reads_no_answer_past_its_cap(
    server: Scripted, blocking: BlockingPool, step: bytes | Action, message: str
) -> None:
    server.script = [step, answer()]

    with pytest.raises(TooLarge, match=re.escape(message)):
        await post_blocking(blocking, server.url, max_bytes=CAP)
    assert (await post_blocking(blocking, server.url)).status == 200

    assert server.connections == 2
    for _ in range(100):
        if server.open == 1:
            break
        await asyncio.sleep(0.05)
    assert server.open == 1


def trickle(data: bytes, every_s: float, sent: list[int]) -> Action:
    """Send `data` a byte at a time, counting in `sent`: each read waits less than a timeout."""

    async def act(writer: asyncio.StreamWriter) -> None:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            sent[0] += 1
            await asyncio.sleep(every_s)

    return act


async def test_a_trickling_answer_holds_a_blocking_call_no_longer_than_its_budget(
    server: Scripted, blocking: BlockingPool
) -> None:
    # 300 bytes at one every 100 ms: 30 s, each byte well within any per-read timeout.
    sent = [0]
    server.script = [trickle(answer(b'{"items": []}', 200, "X-Pad: " + "." * 200), 0.1, sent)]

    with pytest.raises(TimeoutError):
        await post_blocking(blocking, server.url, timeout_s=0.5)
    # The call returned with its connection closed: the server's next byte finds it gone.
    for _ in range(100):
        if server.open == 0:
            break
        await asyncio.sleep(0.05)

    assert server.open == 0
    assert sent[0] < 100  # at most a few seconds of the 30 on a busy machine, not all of them
    assert blocking.idle_connections == 0


async def test_an_idle_connection_the_server_closed_is_not_used(
    server: Scripted, blocking: BlockingPool
) -> None:
    server.script = [then(answer(), close), answer()]  # closes after answering, unannounced

    assert (await post_blocking(blocking, server.url)).status == 200
    for _ in range(100):
        if server.open == 0:
            break
        await asyncio.sleep(0.05)
    assert (await post_blocking(blocking, server.url)).status == 200

    assert server.connections == 2


async def test_the_blocking_pool_says_where_and_why_it_cannot_connect_and_refuses_once_closed(
    blocking: BlockingPool,
) -> None:
    with closed_port() as port, pytest.raises(ConnectFailed) as caught:
        await post_blocking(blocking, f"http://127.0.0.1:{port}/test")
    blocking.close()

    assert str(caught.value) == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    with pytest.raises(PoolClosed):
        await post_blocking(blocking, f"http://127.0.0.1:{port}/test")

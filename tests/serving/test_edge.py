"""The HTTP edge on the serving loop: limits, timeouts and errors of the HTTP layer itself.

Raw sockets, so that a test can send what no well-behaved client would: half a header block,
a body that never comes, a malformed chunk. Every error the edge answers is the gateway's JSON
error shape, with `X-Request-ID`, and the connection closed after it.
"""

from __future__ import annotations

import asyncio
import json
import resource
import select
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest

from gateway.web.app import create_app
from mock_recommenders import DEFAULT_NAMES, MockFleet, MockFleetProcess
from tests.helpers import (
    InProcessServer,
    Serve,
    port_is_open,
    post_concurrently,
    settings_for,
    wait_until,
)


class Answer:
    """An HTTP response read off a raw socket."""

    def __init__(self, raw: bytes):
        head, _, self.body = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split(" ")[1])
        self.headers = {
            name.strip().lower(): value.strip()
            for name, value in (line.split(":", 1) for line in header_lines)
        }

    def json(self) -> Any:
        return json.loads(self.body)


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


@contextmanager
def connection(url: str) -> Iterator[socket.socket]:
    with socket.create_connection(address(url), timeout=30) as sock:
        yield sock


def read_all(sock: socket.socket, timeout_s: float = 30) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout_s)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def assert_edge_error(raw: bytes, status: int, phrase: str, request_id: str | None = None) -> None:
    answer = Answer(raw)
    assert answer.status == status, raw[:500]
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["connection"] == "close"
    body = answer.json()
    assert body["error"]["status"] == status
    assert phrase in body["error"]["message"]
    assert body["request_id"] == answer.headers["x-request-id"]
    if request_id is not None:
        assert body["request_id"] == request_id


@pytest.fixture
def gateway(fleet: MockFleet, serve: Serve) -> str:
    http = {"header_timeout_s": 1.0, "body_timeout_s": 1.0}
    return serve(create_app(settings_for(fleet, http=http, max_body_bytes=1024 * 1024)))


HEAD = b"POST /recommendation HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"


# --- Limits on what is sent ------------------------------------------------------------------


def test_a_body_announced_over_the_limit_is_413_before_it_is_sent(
    fleet: MockFleet, gateway: str
) -> None:
    with connection(gateway) as sock:
        # 10 MiB announced, 1 KiB sent: the answer comes without the rest.
        sock.sendall(
            HEAD + b"X-Request-ID: big-1\r\nContent-Length: 10485760\r\n\r\n" + b"x" * 1024
        )
        raw = read_all(sock)

    assert_edge_error(raw, 413, "larger than the limit of 1048576 bytes", "big-1")
    assert fleet.stats("sml")["requests"] == 0


def test_a_chunked_body_over_the_limit_is_413_without_reading_it_whole(
    fleet: MockFleet, gateway: str
) -> None:
    chunk = b"x" * 65536
    offered = 64 * 1024 * 1024
    sent = 0
    with connection(gateway) as sock:
        sock.sendall(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        # 64 MiB offered, 64 KiB at a time, until the gateway's answer can be read.
        while sent < offered:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        try:
            raw = read_all(sock)
        except ConnectionResetError:
            pytest.fail("the connection was reset before the 413 could be read")

    assert_edge_error(raw, 413, "larger than the limit of 1048576 bytes")
    # The answer came long before the body's end: what was sent beyond the 1 MiB it read is
    # what the two sockets' buffers hold (a few MB on loopback).
    assert sent < offered / 2
    assert fleet.stats("sml")["requests"] == 0


def test_a_chunked_body_within_the_limit_is_served(fleet: MockFleet, gateway: str) -> None:
    body = json.dumps({"user_id": "chunky", "resultSize": 2}).encode()
    with connection(gateway) as sock:
        sock.sendall(HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        for piece in (body[:10], body[10:]):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.sendall(b"0\r\n\r\n")
        answer = Answer(read_all(sock))

    assert answer.status == 200
    assert answer.json()["complete"] is True
    seen = fleet.last_request("psn")
    assert seen is not None and seen["body"] == {"user_id": "chunky", "resultSize": 2}


def test_a_malformed_chunk_is_400(fleet: MockFleet, gateway: str) -> None:
    with connection(gateway) as sock:
        sock.sendall(
            HEAD + b"X-Request-ID: chunk-1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n"
        )
        raw = read_all(sock)

    assert_edge_error(raw, 400, "malformed HTTP request")
    assert fleet.stats("sml")["requests"] == 0


@pytest.mark.parametrize(
    ("request_bytes", "status", "phrase"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: g\r\n\r\n", 414, "longer than 8192 bytes"),
        (
            b"GET /healthz HTTP/1.1\r\nHost: g\r\nX-Big: " + b"b" * 65536 + b"\r\n\r\n",
            431,
            "headers larger than 32768 bytes",
        ),
        (
            b"POST /recommendation HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
            "Transfer-Encoding 'gzip' is not supported",
        ),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "malformed HTTP request"),
    ],
    ids=["414", "431", "501", "400"],
)
def test_what_the_http_layer_refuses_is_json(
    gateway: str, request_bytes: bytes, status: int, phrase: str
) -> None:
    with connection(gateway) as sock:
        sock.sendall(request_bytes)
        raw = read_all(sock)

    assert_edge_error(raw, status, phrase)


# --- Timeouts --------------------------------------------------------------------------------


def test_headers_that_stop_coming_are_408(gateway: str) -> None:
    with connection(gateway) as sock:
        sock.sendall(b"POST /recommendation HTTP/1.1\r\nHost: g\r\nX-Request-ID: slow-1\r\nCont")
        raw = read_all(sock)

    # The id was not read whole (its header block never ended): the 408 carries a new one.
    assert_edge_error(raw, 408, "request headers not received within 1 s")


def test_a_body_that_stops_coming_is_408(fleet: MockFleet, gateway: str) -> None:
    with connection(gateway) as sock:
        sock.sendall(HEAD + b"X-Request-ID: slow-2\r\nContent-Length: 20\r\n\r\n{")
        raw = read_all(sock)

    assert_edge_error(raw, 408, "request body not received within 1 s", "slow-2")
    assert fleet.stats("sml")["requests"] == 0


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(gateway: str) -> None:
    with connection(gateway) as sock:
        assert read_all(sock) == b""


# --- Capacity --------------------------------------------------------------------------------


def test_above_the_connection_cap_a_new_connection_is_503(fleet: MockFleet, serve: Serve) -> None:
    url = serve(create_app(settings_for(fleet, http={"max_connections": 3})))
    with ExitStack() as stack:
        idle = [stack.enter_context(connection(url)) for _ in range(3)]
        with connection(url) as extra:
            raw = read_all(extra)
        assert all(sock.fileno() != -1 for sock in idle)

    assert_edge_error(raw, 503, "serves at most 3 connections")


@pytest.mark.slow
def test_slow_clients_cost_a_socket_not_service_for_everyone_else(
    fleet_process: MockFleetProcess, serve: Serve
) -> None:
    fleet = fleet_process
    # 1,000 connections that stop halfway through their headers, and 600 that send their
    # headers and never their body: while they hang on, real requests are served.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # both ends are in this process
    settings = settings_for(
        fleet,
        deadline_ms=10_000,
        max_in_flight=20,  # a stalled body is not admitted: it would take all 20 slots
        http={"header_timeout_s": 4.0, "body_timeout_s": 4.0},
    )
    url = serve(create_app(settings))
    with ExitStack() as stack:
        half_headers = [stack.enter_context(connection(url)) for _ in range(1000)]
        for sock in half_headers:
            sock.sendall(b"POST /recommendation HTTP/1.1\r\nHost: g\r\nContent-Ty")
        stalled_bodies = [stack.enter_context(connection(url)) for _ in range(600)]
        for sock in stalled_bodies:
            sock.sendall(HEAD + b"Content-Length: 20\r\n\r\n")

        # Ten at a time, well within the 20 slots, which the stalled ones must not hold.
        answers = [
            answer
            for batch in range(4)
            for answer in asyncio.run(
                post_concurrently(url, [{"user_id": f"real-{batch}-{i}"} for i in range(10)])
            )
        ]

        assert [status for status, _ in answers] == [200] * 40
        assert all(body["complete"] for _, body in answers)
        assert all(
            source["latency_ms"] < 10_000
            for _, body in answers
            for source in body["sources"].values()
        )
        # Then each stalled connection is answered 408 and closed, or closed.
        statuses = [_status_or_closed(sock) for sock in half_headers + stalled_bodies]

    assert set(statuses[:1000]) <= {408, None}
    assert set(statuses[1000:]) == {408}
    assert {fleet.stats(name)["requests"] for name in DEFAULT_NAMES} == {40}


def _status_or_closed(sock: socket.socket) -> int | None:
    raw = read_all(sock, timeout_s=60)
    return Answer(raw).status if raw else None


# --- Draining, when the worker stops ---------------------------------------------------------


def read_answer(sock: socket.socket) -> Answer:
    """One response with a Content-Length, read off a connection that may stay open."""
    sock.settimeout(30)
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before an answer: {raw!r}"
        raw += chunk
    length = int(Answer(raw.partition(b"\r\n\r\n")[0] + b"\r\n\r\n").headers["content-length"])
    while len(raw.partition(b"\r\n\r\n")[2]) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of an answer"
        raw += chunk
    return Answer(raw)


def keep_alive_request(user_id: str) -> bytes:
    body = json.dumps({"user_id": user_id}).encode()
    return HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


def begin_stopping(server: InProcessServer) -> None:
    """Tell `server` to stop, as SIGTERM does; return once it has stopped accepting."""
    port = address(server.url)[1]
    server.server.should_exit = True
    # uvicorn stops accepting and asks every connection to shut down in one go.
    wait_until(lambda: not port_is_open(port), 30, "the server kept accepting connections")


def test_a_request_on_an_idle_connection_while_stopping_is_answered_with_close(
    fleet: MockFleet,
) -> None:
    # The client sends its next request on a keep-alive connection just as the worker stops
    # (a reload): it is served, and told the connection closes, instead of being lost.
    server = InProcessServer(create_app(settings_for(fleet, http={"drain_s": 30.0}))).start()
    try:
        with connection(server.url) as sock:
            sock.sendall(keep_alive_request("before"))
            first = read_answer(sock)
            begin_stopping(server)
            sock.sendall(keep_alive_request("during"))
            second = read_answer(sock)
            after = read_all(sock)
    finally:
        server.stop()

    assert first.status == 200
    # Kept open: no `close` option (uvicorn sends no Connection header here; another version
    # may send `keep-alive`, which HTTP/1.1 allows).
    assert "close" not in first.headers.get("connection", "").lower()
    assert second.status == 200
    assert second.json()["complete"] is True
    assert [e["prediction"]["user_id"] for e in second.json()["result"]] == ["during"] * 4
    assert second.headers["connection"] == "close"
    assert after == b""  # closed after the answer: the server stopped within the 30 s window


def test_an_idle_connection_is_closed_when_the_drain_ends(fleet: MockFleet) -> None:
    server = InProcessServer(create_app(settings_for(fleet, http={"drain_s": 0.2}))).start()
    try:
        with connection(server.url) as sock:
            sock.sendall(keep_alive_request("before"))
            assert read_answer(sock).status == 200
            begin_stopping(server)
            closed = read_all(sock)
    finally:
        server.stop()

    assert closed == b""  # nothing came on it: closed without a word

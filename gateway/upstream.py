"""The recommenders' HTTP client: keep-alive HTTP/1.1 POSTs over a pool of connections.

The fan-out's calls are the hottest code of the gateway: four or more per request. aiohttp's
client, which the gateway used for them, spent about three times the CPU of this one per call
(420 against 140 µs on the development machine, the same mock, the same loop), and with it
the gateway spent a third of its CPU in the client. What a recommender call needs is narrow:
POST a JSON body to a known origin, read a JSON answer, keep the connection for the next call.
This does that and no more, on asyncio's transports and httptools' parser (the one uvicorn
serves with):

- `ConnectionPool.post` takes an idle connection to the URL's origin, or opens one within
  `limit` connections in all and `limit_per_host` per origin (else waits for one to free);
  connections idle longer than `keepalive_timeout_s` are closed;
- a call that fails or is cancelled (a timeout, a lost hedge) aborts its connection, which is
  never reused with an answer half-read;
- answers with `Content-Length`, chunked, or delimited by the connection's end; gzip and
  deflate bodies are decompressed; answer headers are capped at `MAX_HEAD_BYTES`;
- errors are the few kinds a caller maps to reasons: `ConnectFailed`, `Disconnected` (closed
  before any answer), `Truncated` (cut off in the answer), `Malformed`, `PoolClosed`.

Time is the caller's: it wraps `post` in its own budget (`asyncio.timeout`), which covers
waiting for a connection, connecting, sending and reading.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import os
import socket
import ssl
import urllib.parse
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httptools

__all__ = [
    "MAX_HEAD_BYTES",
    "Answer",
    "ConnectFailed",
    "ConnectionPool",
    "Disconnected",
    "Malformed",
    "PoolClosed",
    "Truncated",
    "UpstreamError",
]

MAX_HEAD_BYTES = 64 * 1024

Headers = list[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """A call to a recommender that did not come to an answer."""


class ConnectFailed(UpstreamError):
    """No connection could be made: nothing was sent."""

    def __init__(self, host: str, port: int, reason: str):
        super().__init__(f"cannot connect to {host}:{port}: {reason}")
        self.host = host
        self.port = port
        self.reason = reason


class Disconnected(UpstreamError):
    """The connection closed before any of the answer came."""


class Truncated(UpstreamError):
    """The connection closed part-way through the answer."""


class Malformed(UpstreamError):
    """What came back is not an HTTP answer the client can read."""


class PoolClosed(UpstreamError):
    """The pool was closed: it makes no more calls."""


@dataclass(slots=True)
class Answer:
    """A recommender's answer: status, headers (names lower-cased) and body (decoded)."""

    status: int
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> str | None:
        """The first value of the header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> bytes:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.port == default else f"{host}:{self.port}").encode("idna")


@dataclass(frozen=True, slots=True)
class _Target:
    origin: _Origin
    path: bytes  # path and query, as sent


def _target(url: str) -> _Target:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(_Origin(parts.scheme, parts.hostname, port), path.encode("ascii"))


def _describe(error: OSError) -> str:
    # asyncio words a refused connection as "Connect call failed ('127.0.0.1', 5001)"; the
    # errno's own text is what an operator searches for.
    if isinstance(error, socket.gaierror):
        return "host name not resolved"
    if error.errno and error.errno > 0:
        return os.strerror(error.errno)
    return error.strerror or type(error).__name__


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one call at a time, its answer parsed as it arrives."""

    def __init__(self, pool: ConnectionPool, origin: _Origin):
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.closing = False  # closed or aborted by this side: never to be reused
        self.idle_timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[Answer] | None = None
        self._reset()

    def _reset(self) -> None:
        self._headers: Headers = []
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._started = False  # bytes of this answer have come
        self._sized = False  # its end is known from the headers (length or chunks)
        self._headers_done = False
        self._refused: Malformed | None = None  # why a parser callback stopped the parse

    # Calls

    async def exchange(self, request: bytes) -> Answer:
        """Send `request` and wait for the whole answer."""
        assert self.transport is not None and self._waiter is None
        self._reset()
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self._waiter

    def abort(self) -> None:
        """Drop the connection at once (a call was cut short: its state is unknown)."""
        self.closing = True
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def close(self) -> None:
        """Close the connection."""
        self.closing = True
        if self.transport is not None and not self.lost:
            self.transport.close()

    # Transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            # Nothing was asked: a server that speaks unasked cannot be trusted with the next.
            self.abort()
            return
        self._started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(self._refused or Malformed(f"not an HTTP answer: {exc}"))
            self.abort()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost settles the call

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._waiter is not None and not self._waiter.done():
            if self._headers_done and not self._sized:
                self._complete(keep_alive=False)  # an answer delimited by the connection's end
            elif self._started:
                self._fail(Truncated("the answer was cut off"))
            else:
                self._fail(Disconnected("closed before answering"))
        self.pool._lost(self)

    # Parser callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refused = Malformed(f"answer headers larger than {MAX_HEAD_BYTES} bytes")
            raise self._refused
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        for name, value in self._headers:
            if name == b"content-length" or (
                name == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                self._sized = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self._reset()  # an interim answer: the final one follows
            self._started = True
            return
        self._complete(self.parser.should_keep_alive())

    # Settling a call

    def _complete(self, keep_alive: bool) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        body = b"".join(self._body)
        try:
            body = _decoded(self._headers, body)
        except Malformed as exc:
            waiter.set_exception(exc)
            self.abort()
            return
        waiter.set_result(Answer(self.parser.get_status_code(), self._headers, body))
        if not keep_alive:
            self.close()

    def _fail(self, error: UpstreamError) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)


def _decoded(headers: Headers, body: bytes) -> bytes:
    for name, value in headers:
        if name != b"content-encoding":
            continue
        coding = value.strip().lower()
        try:
            if coding in (b"gzip", b"x-gzip"):
                return zlib.decompress(body, wbits=zlib.MAX_WBITS | 16)
            if coding == b"deflate":
                try:
                    return zlib.decompress(body)
                except zlib.error:
                    return zlib.decompress(body, wbits=-zlib.MAX_WBITS)  # raw deflate
        except zlib.error as exc:
            raise Malformed(f"{coding.decode('latin-1')} body that does not decompress") from exc
        if coding != b"identity":
            raise Malformed(f"Content-Encoding {coding.decode('latin-1')!r} is not supported")
    return body


class ConnectionPool:
    """Keep-alive connections to the recommenders, for the loop it is used on."""

    def __init__(
        self,
        limit: int = 1024,
        limit_per_host: int = 0,
        keepalive_timeout_s: float = 4.0,
        dns_cache_ttl_s: float = 300.0,
        user_agent: str = "fusion-gateway",
    ):
        self.limit = limit
        self.limit_per_host = limit_per_host  # 0: no limit but `limit`
        self.keepalive_timeout_s = keepalive_timeout_s
        self.dns_cache_ttl_s = dns_cache_ttl_s
        self._addresses: dict[_Origin, tuple[float, str]] = {}
        self._user_agent = user_agent.encode()
        self._targets: dict[str, _Target] = {}
        self._idle: dict[_Origin, collections.deque[_Connection]] = {}
        self._open: collections.Counter[_Origin] = collections.Counter()
        self._total = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ssl: ssl.SSLContext | None = None
        self.closed = False

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        """POST `body` as JSON to `url` with `headers`; the recommender's answer."""
        if self.closed:
            raise PoolClosed("the connection pool is closed")
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = _target(url)
        request = self._request(target, body, headers)
        connection = await self._acquire(target.origin)
        try:
            answer = await connection.exchange(request)
        except BaseException:
            connection.abort()
            raise
        self._release(connection)
        return answer

    async def close(self) -> None:
        """Close every connection; calls after this raise `PoolClosed`."""
        self.closed = True
        for idle in self._idle.values():
            while idle:
                connection = idle.pop()
                if connection.idle_timer is not None:
                    connection.idle_timer.cancel()
                connection.close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        await asyncio.sleep(0)  # let the transports report their ends

    @property
    def open_connections(self) -> int:
        """Connections open now, idle or in use."""
        return self._total

    # Connections

    def _request(self, target: _Target, body: bytes, headers: Mapping[str, str]) -> bytes:
        lines = [
            b"POST ",
            target.path,
            b" HTTP/1.1\r\nHost: ",
            target.origin.authority,
            b"\r\nUser-Agent: ",
            self._user_agent,
            b"\r\nAccept: application/json\r\nAccept-Encoding: gzip, deflate\r\n"
            b"Content-Type: application/json\r\nContent-Length: ",
            str(len(body)).encode(),
            b"\r\n",
        ]
        for name, value in headers.items():
            line = f"{name}: {value}\r\n"
            if "\r" in line[:-2] or "\n" in line[:-2]:
                raise ValueError(f"header {name!r} may not hold a line break")
            lines.append(line.encode("latin-1"))
        lines += [b"\r\n", body]
        return b"".join(lines)

    async def _acquire(self, origin: _Origin) -> _Connection:
        while True:
            if self.closed:
                raise PoolClosed("the connection pool is closed")
            idle = self._idle.get(origin)
            while idle:
                connection = idle.pop()  # the most recent: the likeliest to be alive
                if connection.idle_timer is not None:
                    connection.idle_timer.cancel()
                    connection.idle_timer = None
                if not (connection.lost or connection.closing):
                    return connection
            if self._total < self.limit and (
                not self.limit_per_host or self._open[origin] < self.limit_per_host
            ):
                return await self._connect(origin)
            await self._wait_for_a_slot()

    async def _connect(self, origin: _Origin) -> _Connection:
        self._total += 1
        self._open[origin] += 1
        loop = asyncio.get_running_loop()
        tls = origin.scheme == "https"
        try:
            address = await self._address(origin)
            _, connection = await loop.create_connection(
                lambda: _Connection(self, origin),
                address,
                origin.port,
                ssl=self._ssl_context() if tls else None,
                server_hostname=origin.host if tls else None,
            )
        except BaseException as exc:
            self._total -= 1
            self._open[origin] -= 1
            self._wake()
            if isinstance(exc, OSError):
                raise ConnectFailed(origin.host, origin.port, _describe(exc)) from exc
            raise
        return connection

    def _release(self, connection: _Connection) -> None:
        """A call on `connection` ended with a whole answer: keep it for the next one."""
        if connection.lost or connection.closing or self.closed:
            connection.close()
            return
        loop = asyncio.get_running_loop()
        connection.idle_timer = loop.call_later(self.keepalive_timeout_s, self._expire, connection)
        self._idle.setdefault(connection.origin, collections.deque()).append(connection)
        self._wake()

    def _expire(self, connection: _Connection) -> None:
        connection.idle_timer = None
        idle = self._idle.get(connection.origin)
        if idle is not None and connection in idle:
            idle.remove(connection)
        connection.close()

    def _lost(self, connection: _Connection) -> None:
        """`connection` has closed, whoever closed it: its slot is free."""
        if connection.idle_timer is not None:
            connection.idle_timer.cancel()
            connection.idle_timer = None
        idle = self._idle.get(connection.origin)
        if idle is not None and connection in idle:
            idle.remove(connection)
        self._total -= 1
        self._open[connection.origin] -= 1
        self._wake()

    async def _address(self, origin: _Origin) -> str:
        """The origin's address, looked up at most once per `dns_cache_ttl_s`."""
        try:
            ipaddress.ip_address(origin.host)
        except ValueError:
            pass
        else:
            return origin.host
        loop = asyncio.get_running_loop()
        cached = self._addresses.get(origin)
        if cached is not None and cached[0] > loop.time():
            return cached[1]
        found = await loop.getaddrinfo(
            origin.host, origin.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        if not found:
            raise socket.gaierror(socket.EAI_NONAME, "no address")
        address = str(found[0][4][0])
        self._addresses[origin] = (loop.time() + self.dns_cache_ttl_s, address)
        return address

    async def _wait_for_a_slot(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake()  # woken, then cancelled: the turn goes to the next waiter
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def __repr__(self) -> str:
        return f"{type(self).__name__}(open={self._total}, limit={self.limit})"

    def __getstate__(self) -> Any:
        raise TypeError("a connection pool belongs to its process and loop")

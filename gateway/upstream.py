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
  deflate bodies are decompressed as they come; answer headers are capped at
  `MAX_HEAD_BYTES`;
- an answer is read up to `max_bytes` (per call; the pool's `max_answer_bytes` by default),
  counted twice: the bytes that arrive and the bytes they decompress to. A `Content-Length`
  above it fails before the body is read, and a body that grows past it (endless chunks, a
  gzip bomb) fails at that byte: nothing beyond it is kept or decompressed, and the
  connection is dropped;
- errors are the few kinds a caller maps to reasons: `ConnectFailed`, `Disconnected` (closed
  before any answer), `Truncated` (cut off in the answer), `Malformed`, `TooLarge`,
  `PoolClosed`.

Time is the caller's: it wraps `post` in its own budget (`asyncio.timeout`), which covers
waiting for a connection, connecting, sending and reading.

The requests' bytes and the answers' parse (and the errors) are `gateway.http1`'s, shared
with `gateway.blocking.BlockingPool`, which makes the same calls from threads.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
from collections.abc import Mapping
from typing import Any

from gateway.http1 import (
    MAX_ANSWER_BYTES,
    MAX_HEAD_BYTES,
    Answer,
    AnswerReader,
    ConnectFailed,
    Disconnected,
    Malformed,
    Origin,
    PoolClosed,
    Target,
    TooLarge,
    Truncated,
    UpstreamError,
    describe,
    request_bytes,
    target_of,
    tls_context,
)

__all__ = [
    "MAX_ANSWER_BYTES",
    "MAX_HEAD_BYTES",
    "Answer",
    "ConnectFailed",
    "ConnectionPool",
    "Disconnected",
    "Malformed",
    "PoolClosed",
    "TooLarge",
    "Truncated",
    "UpstreamError",
]


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one call at a time, its answer parsed as it arrives."""

    def __init__(self, pool: ConnectionPool, origin: Origin):
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.reader = AnswerReader()
        self.lost = False
        self.closing = False  # closed or aborted by this side: never to be reused
        self.idle_timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[Answer] | None = None

    # Calls

    async def exchange(self, request: bytes, max_bytes: int) -> Answer:
        """Send `request` and wait for the whole answer, of at most `max_bytes`."""
        assert self.transport is not None and self._waiter is None
        self.reader.start(max_bytes)
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
        try:
            answer = self.reader.feed(data)
        except UpstreamError as exc:
            # Read no further (an answer over its cap is not read on): drop the connection.
            # The waiter is settled by another frame than this one, which the error's
            # traceback holds: no cycle through it, so it is freed as soon as it is handled.
            self._settle(exc)
            self.abort()
            return
        if answer is not None:
            self._settle(answer)
            if not self.reader.keep_alive:
                self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost settles the call

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._waiter is not None:
            try:
                self._settle(self.reader.end())
            except UpstreamError as error:
                self._settle(error)
        self.reader.drop()
        self.pool._lost(self)

    def _settle(self, outcome: Answer | UpstreamError) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if isinstance(outcome, Answer):
            waiter.set_result(outcome)
        else:
            waiter.set_exception(outcome)


class ConnectionPool:
    """Keep-alive connections to the recommenders, for the loop it is used on."""

    def __init__(
        self,
        limit: int = 1024,
        limit_per_host: int = 0,
        keepalive_timeout_s: float = 4.0,
        dns_cache_ttl_s: float = 300.0,
        user_agent: str = "fusion-gateway",
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ):
        self.limit = limit
        self.limit_per_host = limit_per_host  # 0: no limit but `limit`
        self.keepalive_timeout_s = keepalive_timeout_s
        self.dns_cache_ttl_s = dns_cache_ttl_s
        self.max_answer_bytes = max_answer_bytes  # a call's default cap
        self._addresses: dict[Origin, tuple[float, str]] = {}
        self._user_agent = user_agent.encode()
        self._targets: dict[str, Target] = {}
        self._idle: dict[Origin, collections.deque[_Connection]] = {}
        self._connections_per_origin: collections.Counter[Origin] = collections.Counter()
        self._total = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.closed = False

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        max_bytes: int | None = None,
    ) -> Answer:
        """POST `body` as JSON to `url` with `headers`; the recommender's answer.

        The answer is read up to `max_bytes` (default: the pool's `max_answer_bytes`), as
        sent and as decompressed; above it the call raises `TooLarge`.
        """
        if self.closed:
            raise PoolClosed("the connection pool is closed")
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = target_of(url)
        request = request_bytes(target, body, headers, self._user_agent)
        connection = await self._acquire(target.origin)
        try:
            answer = await connection.exchange(request, max_bytes or self.max_answer_bytes)
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

    async def _acquire(self, origin: Origin) -> _Connection:
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
                not self.limit_per_host
                or self._connections_per_origin[origin] < self.limit_per_host
            ):
                return await self._connect(origin)
            await self._wait_for_a_slot()

    async def _connect(self, origin: Origin) -> _Connection:
        self._total += 1
        self._connections_per_origin[origin] += 1
        loop = asyncio.get_running_loop()
        tls = origin.scheme == "https"
        try:
            address = await self._address(origin)
            _, connection = await loop.create_connection(
                lambda: _Connection(self, origin),
                address,
                origin.port,
                ssl=tls_context() if tls else None,
                server_hostname=origin.host if tls else None,
            )
        except BaseException as exc:
            self._total -= 1
            self._connections_per_origin[origin] -= 1
            self._wake()
            if isinstance(exc, OSError):
                raise ConnectFailed(origin.host, origin.port, describe(exc)) from exc
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
        self._connections_per_origin[connection.origin] -= 1
        self._wake()

    async def _address(self, origin: Origin) -> str:
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(open={self._total}, limit={self.limit})"

    def __getstate__(self) -> Any:
        raise TypeError("a connection pool belongs to its process and loop")

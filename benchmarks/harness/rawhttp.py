"""A lean HTTP/1.1 keep-alive client for load generation: httptools on asyncio (uvloop).

Driving 1,000 connections from one Python process, aiohttp's client spends ~0.3 ms of CPU per
request; on a machine the load generator shares with the gateway, that CPU is taken from the
gateway, and the load generator's own loop lag is added to every latency it measures. This
client writes a pre-built request and parses only what a load test needs (the status, the
`Retry-After`, the end of the body): a few tens of microseconds per request, like wrk.
"""

from __future__ import annotations

import asyncio
import collections
from types import TracebackType
from typing import cast

import httptools

__all__ = ["RawPool"]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, float]] | None = None
        self.retry_after = 0.0
        self.reusable = True
        self.body: list[bytes] | None = None  # the body's pieces, when asked for

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._fail(ConnectionError("connection closed before the response ended"))

    def _fail(self, error: Exception) -> None:
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after" and value.isdigit():
            self.retry_after = float(value)

    def on_body(self, body: bytes) -> None:
        if self.body is not None:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), self.retry_after))

    async def send(self, request: bytes, keep_body: bool = False) -> tuple[int, float]:
        assert self.transport is not None
        self.retry_after = 0.0
        self.body = [] if keep_body else None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


class RawPool:
    """Keep-alive connections to one ``host:port``, opened as needed and reused."""

    def __init__(self, host: str, port: int, timeout_s: float = 10.0):
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._idle: collections.deque[_Connection] = collections.deque()
        self._all: set[_Connection] = set()
        self._head = f"Host: {host}:{port}\r\nContent-Type: application/json\r\n".encode()

    async def post(self, path: str, body: bytes) -> tuple[int, float]:
        """POST `body` (JSON) to `path`; the status and the `Retry-After` seconds (0: none)."""
        status, retry_after, _ = await self._post(path, body, keep_body=False)
        return status, retry_after

    async def post_for_body(self, path: str, body: bytes) -> tuple[int, bytes]:
        """POST `body` (JSON) to `path`; the status and the response's body."""
        status, _, answer = await self._post(path, body, keep_body=True)
        return status, answer

    async def _post(self, path: str, body: bytes, keep_body: bool) -> tuple[int, float, bytes]:
        request = b"".join(
            (
                b"POST ",
                path.encode(),
                b" HTTP/1.1\r\n",
                self._head,
                b"Content-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            )
        )
        connection = self._idle.pop() if self._idle else await self._open()
        try:
            async with asyncio.timeout(self.timeout_s):
                status, retry_after = await connection.send(request, keep_body)
                answer = b"".join(connection.body or ())
        except BaseException:
            connection.reusable = False
            raise
        finally:
            if connection.reusable:
                self._idle.append(connection)
            else:
                self._all.discard(connection)
                if connection.transport is not None:
                    connection.transport.close()
        return status, retry_after, answer

    async def connect(self, count: int) -> None:
        """Open `count` connections now, idle until used: requests sent together after it each
        find one open, and none waits for a handshake."""
        opened = await asyncio.gather(*(self._open() for _ in range(count)))
        self._idle.extend(opened)

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(_Connection, self.host, self.port)
        self._all.add(connection)
        return connection

    async def __aenter__(self) -> RawPool:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for connection in self._all:
            if connection.transport is not None:
                connection.transport.close()
        self._all.clear()
        self._idle.clear()

"""The recommenders' HTTP client for threads: the `threads` fan-out's blocking calls.

`BlockingPool` makes the calls `gateway.upstream.ConnectionPool` makes, from threads, on
blocking sockets: the same requests and the same answer parser (`gateway.http1`), so the same
limits and errors. It takes the call's time budget itself and keeps every connect, send and
receive within what is left of it, so a recommender that trickles its answer a byte at a time
holds a thread no longer than the budget (a socket timeout alone restarts with every byte, and
`requests` has no other). When the budget runs out the call raises `TimeoutError` and its
connection is closed.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Mapping

from gateway.http1 import (
    MAX_ANSWER_BYTES,
    Answer,
    AnswerReader,
    ConnectFailed,
    Disconnected,
    Origin,
    PoolClosed,
    Target,
    describe,
    request_bytes,
    target_of,
    tls_context,
)

__all__ = ["BlockingPool"]


class _BlockingConnection:
    """One keep-alive connection on a blocking socket, used by one thread at a time."""

    def __init__(self, origin: Origin, sock: socket.socket):
        self.origin = origin
        self.sock = sock
        self.reader = AnswerReader()
        self.idle_since = 0.0

    def exchange(self, request: bytes, deadline: float, max_bytes: int) -> Answer:
        """Send `request` and read the whole answer by `deadline` (`time.monotonic()`)."""
        self.reader.start(max_bytes)
        self._wait_until(deadline)
        try:
            self.sock.sendall(request)
        except TimeoutError:
            raise
        except OSError as exc:
            raise Disconnected("closed before answering") from exc
        while True:
            self._wait_until(deadline)
            try:
                data = self.sock.recv(_RECEIVE_BYTES)
            except TimeoutError:
                raise
            except OSError:
                data = b""  # reset: what came so far decides, as for a close
            if not data:
                self.reader.keep_alive = False
                return self.reader.end()
            answer = self.reader.feed(data)
            if answer is not None:
                return answer

    def _wait_until(self, deadline: float) -> None:
        # Each blocking call waits at most what is left of the call's budget, so a server that
        # sends a byte at a time cannot stretch the call past it.
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the call's budget ran out")
        self.sock.settimeout(remaining)

    def alive(self) -> bool:
        """Whether an idle connection is still open: nothing to read, no close, no error."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return not poller.poll(0)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()
        self.reader.drop()


_RECEIVE_BYTES = 64 * 1024


class BlockingPool:
    """Keep-alive connections for calls made from threads, each call within its own budget.

    Idle connections are kept per origin (at most `limit_per_host`, 0: no limit) and closed
    when found older than `keepalive_timeout_s`, or no longer open, on the next call.
    """

    def __init__(
        self,
        limit_per_host: int = 0,
        keepalive_timeout_s: float = 4.0,
        user_agent: str = "fusion-gateway",
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ):
        self.limit_per_host = limit_per_host
        self.keepalive_timeout_s = keepalive_timeout_s
        self.max_answer_bytes = max_answer_bytes
        self._user_agent = user_agent.encode()
        self._targets: dict[str, Target] = {}
        self._idle: dict[Origin, list[_BlockingConnection]] = {}
        self._lock = threading.Lock()
        self.closed = False

    def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout_s: float,
        max_bytes: int | None = None,
    ) -> Answer:
        """POST `body` as JSON to `url`; the answer, read whole within `timeout_s` in all.

        Raises `TimeoutError` when the budget runs out, else an `UpstreamError` as
        `ConnectionPool.post` does (`TooLarge` above `max_bytes`).
        """
        deadline = time.monotonic() + timeout_s
        if self.closed:
            raise PoolClosed("the connection pool is closed")
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = target_of(url)
        request = request_bytes(target, body, headers, self._user_agent)
        connection = self._acquire(target.origin, deadline)
        try:
            answer = connection.exchange(request, deadline, max_bytes or self.max_answer_bytes)
        except BaseException:
            connection.close()  # cut short or refused: its state is unknown, never reused
            raise
        self._release(connection)
        return answer

    def close(self) -> None:
        """Close the idle connections; calls after this raise `PoolClosed`."""
        self.closed = True
        with self._lock:
            idle = [connection for kept in self._idle.values() for connection in kept]
            self._idle.clear()
        for connection in idle:
            connection.close()

    @property
    def idle_connections(self) -> int:
        """Connections kept open for the next call."""
        with self._lock:
            return sum(len(kept) for kept in self._idle.values())

    def _acquire(self, origin: Origin, deadline: float) -> _BlockingConnection:
        stale = []
        with self._lock:
            kept = self._idle.get(origin)
            found = None
            while kept and found is None:
                connection = kept.pop()  # the most recent: the likeliest to be alive
                fresh = time.monotonic() - connection.idle_since < self.keepalive_timeout_s
                if fresh and connection.alive():
                    found = connection
                else:
                    stale.append(connection)
        for connection in stale:
            connection.close()
        return found if found is not None else self._connect(origin, deadline)

    def _connect(self, origin: Origin, deadline: float) -> _BlockingConnection:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the call's budget ran out")
        try:
            sock = socket.create_connection((origin.host, origin.port), timeout=remaining)
        except TimeoutError:
            raise
        except OSError as exc:
            raise ConnectFailed(origin.host, origin.port, describe(exc)) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if origin.scheme == "https":
            try:
                sock = tls_context().wrap_socket(sock, server_hostname=origin.host)
            except TimeoutError:
                sock.close()
                raise
            except OSError as exc:
                sock.close()
                raise ConnectFailed(origin.host, origin.port, describe(exc)) from exc
        return _BlockingConnection(origin, sock)

    def _release(self, connection: _BlockingConnection) -> None:
        """A call ended with a whole answer: keep its connection if it may be reused."""
        if not connection.reader.keep_alive or self.closed:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        with self._lock:
            kept = self._idle.setdefault(connection.origin, [])
            if not self.limit_per_host or len(kept) < self.limit_per_host:
                kept.append(connection)
                return
        connection.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(idle={self.idle_connections})"

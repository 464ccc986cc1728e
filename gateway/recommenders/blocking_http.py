"""The recommenders' HTTP client for threads: requests, a session per thread, calls in budget.

`ThreadSessions.post` makes, from the `threads` fan-out's threads, a recommender's call over
`requests`, and reads its answer as the async client does (`gateway.recommenders.bodies`):

- each thread calls through a `requests.Session` of its own, made on its first call (a
  session's state is not thread-safe), with keep-alive connections of its own. No redirect
  is followed, no cookie kept, nothing taken from the environment (proxies, `.netrc`);
  certificates are verified;
- the answer is streamed and its body read raw, piece by piece, into a `BodyReader`: within
  the cap as sent and as decompressed, stopped at the byte that passes it;
- a call's budget bounds all of it, whatever the phase (connect, send, head, body). A socket's
  timeout restarts with every byte, so a recommender that trickles its answer would hold the
  thread as long as it likes: one watchdog thread per client (`_Watchdog`) keeps the calls'
  deadlines and, when one passes, shuts the call's socket down, which wakes its blocked read;
  the call then raises `TimeoutError`. The socket is the connection's: the connection classes
  (`_Connection`) tie themselves to the call that uses them, so the watchdog finds it;
- a call that fails in any way closes its connection, never reused with an answer half-read;
  a connection idle past `keepalive_timeout_s` is closed by the gateway rather than reused
  just as the recommender may close it.

Errors: `TimeoutError` (the budget ran out), `bodies.TooLarge` / `Malformed` / `Truncated` (the
body), `SessionClosed`; any other failure as requests and urllib3 raise it, for
`gateway.recommenders.clients` to map with its one table.
"""

from __future__ import annotations

import contextlib
import heapq
import http.cookiejar
import math
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError as LibraryError
from urllib3.response import BaseHTTPResponse

from gateway.recommenders.bodies import (
    ACCEPT_ENCODING,
    MAX_ANSWER_BYTES,
    Answer,
    BodyReader,
    Truncated,
)

__all__ = ["SessionClosed", "ThreadSessions"]

_PIECE_BYTES = 64 * 1024  # read at a time of an answer's body
_DEFAULT_LIMIT_PER_HOST = 128
_TEMPLATES = 64  # requests prepared ahead, per thread: one per recommender's URL


class SessionClosed(Exception):
    """The client was closed: it makes no more calls."""


class _Call:
    """One call in flight: its deadline, its connection once it has one, whether it ran out."""

    __slots__ = ("connection", "done", "expired", "keepalive_timeout_s", "watchdog")

    def __init__(self, watchdog: _Watchdog, keepalive_timeout_s: float):
        self.watchdog = watchdog
        self.keepalive_timeout_s = keepalive_timeout_s
        self.connection: _Connection | None = None
        self.done = False  # ended: the watchdog must not touch its connection any more
        self.expired = False  # its budget ran out: the watchdog cut its connection


# The call each thread is making. The connection is used deep inside urllib3, called by
# requests, in the thread that makes the call: there it finds the call it carries.
_calling = threading.local()


def _current_call() -> _Call | None:
    call: _Call | None = getattr(_calling, "call", None)
    return call


class _Watchdog:
    """Cuts the connection of each call whose budget ran out: one thread for all the calls.

    The deadlines wait in a heap; a call that ends is marked done and left there, popped when
    it comes to the top (or when the ended ones are most of the heap), so that a call costs a
    push and two short holds of the lock, and the thread wakes only for the earliest deadline.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, _Call]] = []
        self._ended = 0  # calls in the heap that ended before their deadline
        self._waking_at = math.inf  # the deadline the thread waits for
        self._thread: threading.Thread | None = None
        self._stopped = False

    def watch(self, deadline: float, keepalive_timeout_s: float) -> _Call:
        """A new call, cut at `deadline` (`time.monotonic()`) unless it ends first."""
        call = _Call(self, keepalive_timeout_s)
        with self._lock:
            if self._stopped:
                raise SessionClosed("the client is closed")
            if self._thread is None:
                # Started on the first call, not before: a client made before the server forks
                # its workers gets its thread in the worker that calls.
                self._thread = threading.Thread(
                    target=self._run, name="blocking-http-watchdog", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, (deadline, id(call), call))
            if deadline < self._waking_at:
                self._lock.notify()
        return call

    def attach(self, call: _Call, connection: _Connection) -> None:
        """`connection` carries `call`: cut it if the budget runs out; `TimeoutError` if it has."""
        with self._lock:
            if call.expired:
                raise TimeoutError("the call's budget ran out")
            call.connection = connection

    def end(self, call: _Call) -> bool:
        """The call ended: its connection is never cut after this. Whether its budget ran out."""
        with self._lock:
            call.done = True
            if call.expired:
                return True
            self._ended += 1
            heap = self._heap
            if self._ended > 1024 and 2 * self._ended > len(heap):
                # Long budgets and many calls: drop the ended ones rather than let them pile up.
                heap[:] = [entry for entry in heap if not entry[2].done]
                heapq.heapify(heap)
                self._ended = 0
            if self._stopped and len(heap) == self._ended:
                self._lock.notify()  # the last call of a closed client: the thread can go
            return False

    def stop(self) -> None:
        """Take no more calls; the thread ends once the calls in flight have."""
        with self._lock:
            self._stopped = True
            self._lock.notify()

    def _run(self) -> None:
        with self._lock:
            heap = self._heap
            while not (self._stopped and len(heap) == self._ended):
                now = time.monotonic()
                while heap and (heap[0][2].done or heap[0][0] <= now):
                    _, _, call = heapq.heappop(heap)
                    if call.done:
                        self._ended -= 1
                    else:
                        call.expired = True
                        if call.connection is not None:
                            call.connection.cut()
                self._waking_at = heap[0][0] if heap else math.inf
                self._lock.wait(self._waking_at - now if heap else None)
            self._thread = None


class _Connection(HTTPConnection):
    """urllib3's connection, tied to the call it carries so that the watchdog can cut it."""

    idle_since = math.inf  # `time.monotonic()` when its last answer was read whole, if since
    wire: socket.socket | None = None  # the socket it connected, kept past http.client's close

    def connect(self) -> None:
        """Connect, within what is left of the call's budget."""
        call = _current_call()
        if call is not None:
            # Before connecting: a TLS handshake that trickles is cut like any read.
            call.watchdog.attach(call, self)
        super().connect()  # the connect timeout, what was left of the budget, bounds it
        self.wire = self.sock
        self.idle_since = math.inf  # a new connection (a TLS one is made before `request`)
        if call is not None:
            call.watchdog.attach(call, self)  # the budget ran out while connecting: stop here

    def request(self, *args: Any, **kwargs: Any) -> None:
        """Send the request, on this connection or, if it was idle too long, a new one."""
        call = _current_call()
        if call is not None:
            if (
                self.sock is not None
                and time.monotonic() - self.idle_since >= call.keepalive_timeout_s
            ):
                # The recommender may close it just as the request goes out: close it first.
                self.close()
            call.watchdog.attach(call, self)
        super().request(*args, **kwargs)

    def cut(self) -> None:
        """Shut the socket down from another thread: its blocked read returns at once."""
        # http.client lets go of `sock` when an answer ends with the connection, the body
        # still to read from it: then it is the socket it connected.
        sock = self.sock or self.wire
        if sock is None:
            return  # still connecting: the connect timeout bounds it
        # socket's own shutdown even for TLS: `ssl.SSLSocket.shutdown` would also let go of the
        # TLS state, from this thread, under the read that uses it in the caller's. An OSError:
        # the socket was closed already.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _TLSConnection(_Connection, HTTPSConnection):
    """`_Connection` over TLS."""


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class _Adapter(HTTPAdapter):
    """requests' adapter over pools of `_Connection`s."""

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        """urllib3's pool manager, making `_Pool`s and `_TLSPool`s."""
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}


# No domain's cookies allowed: none is kept, so none is sent.
_NO_COOKIES = http.cookiejar.DefaultCookiePolicy(allowed_domains=[])


class _Session(requests.Session):
    """One thread's session: no redirects, no cookies, nothing from the environment.

    Its requests are prepared once per URL and copied for each call.
    """

    def __init__(
        self, headers: Mapping[str, str], limit_per_host: int, ca_file: str | None
    ) -> None:
        super().__init__()
        self.trust_env = False  # no proxies, .netrc or CA bundle from the environment
        self.verify = ca_file or True  # requests' CA certificates (certifi's), or `ca_file`
        self.headers.clear()
        self.headers.update(headers)
        self.cookies.set_policy(_NO_COOKIES)
        adapter = _Adapter(
            pool_connections=limit_per_host, pool_maxsize=limit_per_host, max_retries=0
        )
        self.mount("http://", adapter)
        self.mount("https://", adapter)
        self._headers = dict(headers)
        self._templates: dict[str, requests.PreparedRequest] = {}

    def prepare_post(
        self, url: str, body: bytes, headers: Mapping[str, str]
    ) -> requests.PreparedRequest:
        """The POST of `body` to `url` with the session's headers and `headers`, checked."""
        # `Session.post` parses the URL and merges the session's settings anew on every call: a
        # third of a call's CPU on loopback. The request is prepared once per URL instead.
        template = self._templates.get(url)
        if template is None:
            if len(self._templates) >= _TEMPLATES:
                self._templates.clear()
            template = self._templates[url] = self.prepare_request(requests.Request("POST", url))
        prepared = template.copy()
        # Refuses a header with a line break (`requests.exceptions.InvalidHeader`, a ValueError).
        prepared.prepare_headers({**self._headers, **headers})
        prepared.prepare_body(body, None)
        return prepared

    def get_redirect_target(self, resp: requests.Response) -> None:
        """None: there is nothing to follow."""
        # Even told not to follow a redirect, requests reads its body whole, decompressed and
        # uncapped, to prepare `Response.next`: a 302 could carry a gzip bomb.
        return None


class ThreadSessions:
    """requests sessions, one per thread, each call held to its total budget."""

    def __init__(
        self,
        limit_per_host: int = 0,
        keepalive_timeout_s: float = 4.0,
        user_agent: str = "fusion-gateway",
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        ca_file: str | None = None,
    ) -> None:
        self.ca_file = ca_file
        # A thread makes one call at a time, so its session holds one connection per
        # recommender; the limit bounds how many it keeps should that change.
        self.limit_per_host = limit_per_host or _DEFAULT_LIMIT_PER_HOST
        self.keepalive_timeout_s = keepalive_timeout_s
        self.max_answer_bytes = max_answer_bytes
        self._headers = {
            "User-Agent": user_agent,
            "Accept": "application/json",
            "Accept-Encoding": ACCEPT_ENCODING,
            "Content-Type": "application/json",
        }
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list[tuple[threading.Thread, _Session]] = []
        self._watchdog = _Watchdog()
        self.closed = False

    def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout_s: float,
        max_bytes: int | None = None,
    ) -> Answer:
        """POST `body` as JSON to `url`; the answer, read whole within `timeout_s` in all."""
        deadline = time.monotonic() + timeout_s
        if self.closed:
            raise SessionClosed("the client is closed")
        if timeout_s <= 0:
            raise TimeoutError("the call's budget ran out")
        session: _Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._session()
        call = self._watchdog.watch(deadline, self.keepalive_timeout_s)
        _calling.call = call
        response = None
        try:
            remaining = deadline - time.monotonic()
            response = session.send(
                session.prepare_post(url, body, headers),
                stream=True,
                # Nothing waits past the budget even if the watchdog were late.
                timeout=(remaining, remaining),
                allow_redirects=False,
                proxies={},
                verify=session.verify,
            )
            answer = _read(response, max_bytes or self.max_answer_bytes)
        except BaseException as failure:
            expired = self._watchdog.end(call)
            _drop(response, call)
            if not isinstance(failure, Exception):
                raise
            # Past the deadline a failure is the budget's: the watchdog cut the connection,
            # or a socket's timeout (set to what was left) beat it to it.
            if expired or time.monotonic() >= deadline:
                raise TimeoutError(f"no answer within the budget of {timeout_s:g} s") from failure
            if self.closed and isinstance(failure, requests.RequestException):
                raise SessionClosed("the client was closed during the call") from failure
            raise
        finally:
            _calling.call = None
            if self.closed:
                session.close()  # closed during the call: its connection is not kept
        if self._watchdog.end(call):
            # Cut as the answer ended: the connection is shut, and what came may be cut short.
            _drop(response, call)
            raise TimeoutError(f"no answer within the budget of {timeout_s:g} s")
        response.raw.release_conn()  # read whole and taken: back to the thread's pool
        if call.connection is not None:
            call.connection.idle_since = time.monotonic()
        return answer

    def close(self) -> None:
        """Refuse further calls (`SessionClosed`) and close the sessions and their connections."""
        with self._lock:
            self.closed = True
            sessions, self._sessions = self._sessions, []
        self._watchdog.stop()
        for _, session in sessions:
            session.close()

    def _session(self) -> _Session:
        """This thread's session, made on its first call."""
        session = _Session(self._headers, self.limit_per_host, self.ca_file)
        with self._lock:
            if self.closed:
                session.close()
                raise SessionClosed("the client is closed")
            # The sessions of threads that ended are closed here, not left to the collector.
            ended = [kept for kept in self._sessions if not kept[0].is_alive()]
            self._sessions = [kept for kept in self._sessions if kept[0].is_alive()]
            self._sessions.append((threading.current_thread(), session))
        for _, old in ended:
            old.close()
        self._local.session = session
        return session

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sessions={len(self._sessions)}, closed={self.closed})"


def _read(response: requests.Response, max_bytes: int) -> Answer:
    """The answer, its body read raw and decoded by a `BodyReader`, stopped past `max_bytes`."""
    raw: BaseHTTPResponse = response.raw
    reader = BodyReader(response.headers, max_bytes)
    received = 0
    try:
        # One byte more than the cap allows at most: getting it means the body is too large.
        while piece := raw.read(min(_PIECE_BYTES, max_bytes - received + 1), decode_content=False):
            received += len(piece)
            reader.feed(piece)
    except (LibraryError, OSError) as exc:
        raise Truncated("the connection failed part-way through the answer") from exc
    return Answer(response.status_code, response.headers, reader.body())


def _drop(response: requests.Response | None, call: _Call) -> None:
    """Close the call's connection, whatever state it is in: it is never reused."""
    if response is not None:
        response.close()  # the body was not read through requests: this closes the connection
    if call.connection is not None:
        # Handed back to the pool as its answer's last byte came, it may be there: closed, it
        # connects anew when next taken.
        call.connection.close()

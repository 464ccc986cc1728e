"""The HTTP edge: uvicorn's httptools protocol, with the limits a gateway facing clients needs.

uvicorn parses HTTP on the worker's event loop, so an idle or stalled connection costs a socket
and a few kilobytes, never a thread. What it leaves to the application, this adds:

- a cap on open connections per worker: above it, a new connection gets a JSON 503 and is
  closed before anything is read;
- a header timeout: a request whose line and headers are not all in within
  `header_timeout_s` of its first byte gets 408 (a connection that sends nothing at all is
  closed without a word);
- limits on the request line (414) and on the header block (431);
- a `Transfer-Encoding` other than chunked is 501;
- every error the HTTP layer itself answers (400 for a malformed request or chunk, 408, 414,
  431, 501, 503) in the gateway's one JSON error shape, with `X-Request-ID`, and the
  connection closed after it;
- a lingering close: when a connection closes while its client may still be sending (a body
  refused half-way, headers cut short), the gateway's side is shut first, what still arrives
  is read and dropped for up to `LINGER_S`, and only then is the socket closed. Closed at
  once, the kernel would answer the client's next bytes with a reset, which can destroy the
  error response before the client reads it (nginx's `lingering_close`, for the same reason);
- a drain when the worker stops (a reload, SIGTERM): uvicorn closes an idle keep-alive
  connection at once, which loses a request the client is sending on it at that moment. Here
  it stays open for `drain_s`; a request that comes on it is served and answered with
  `Connection: close`, and a connection still idle at the end of the window is closed
  (Envoy's drain). A request being served is answered with `Connection: close` (uvicorn's own).

The body's own timeout and size limit are the ASGI app's (`gateway.asgi`): it reads the body.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.config.settings import HttpSettings
from gateway.core.request_id import REQUEST_ID_HEADER, new_request_id, valid_request_id

__all__ = ["LINGER_S", "EdgeProtocol", "edge_error", "protocol_for", "request_id_of"]

LINGER_S = 2.0

_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode()

Headers = list[tuple[bytes, bytes]]


def request_id_of(headers: Headers) -> str:
    """The request's id: the client's `X-Request-ID` when valid, else a new one."""
    for name, value in headers:
        if name == _REQUEST_ID_KEY:
            supplied = value.decode("latin-1")
            if valid_request_id(supplied):
                return supplied
    return new_request_id()


def edge_error(status: int, message: str, request_id: str) -> tuple[Headers, bytes]:
    """Headers and body of a JSON error answered by the edge; the connection closes after it."""
    body = json.dumps(
        {"error": {"status": status, "message": message}, "request_id": request_id}
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode("latin-1")),
        (b"connection", b"close"),
    ]
    return headers, body


class _Refusal(Exception):
    """The request is refused by the edge with `status`; raised from a parser callback."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _Connection:
    """The connection's transport as uvicorn sees it: writes coalesced, a lingering `close`.

    uvicorn writes a response's head and its body separately, each a `send` system call of its
    own; what is written in one turn of the loop goes out here in one.
    """

    def __init__(self, transport: asyncio.Transport, protocol: EdgeProtocol):
        self.raw = transport
        self._protocol = protocol
        self._pending: list[bytes] = []
        # What uvicorn calls on every request goes to the transport without a detour.
        self.get_extra_info = transport.get_extra_info
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._protocol.loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        """Write what is pending, in one go."""
        pending, self._pending = self._pending, []
        if pending and not self.raw.is_closing():
            self.raw.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def is_closing(self) -> bool:
        return self._protocol.lingering or self.raw.is_closing()

    def close(self) -> None:
        self.flush()
        self._protocol.close_gracefully()


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the gateway's connection and header limits."""

    limits: HttpSettings = HttpSettings()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._refusal: _Refusal | None = None
        self._started = False  # bytes of the current request have arrived
        self._request_in = True  # no request, or the current one received whole
        self._shutting_down = False
        self._drain_timer: asyncio.TimerHandle | None = None
        self.lingering = False

    # Connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Connection(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections:
            self._refuse(
                _Refusal(
                    503,
                    f"this gateway worker serves at most {self.limits.max_connections} "
                    "connections; retry later",
                )
            )
            return
        # A connection that never sends a byte is closed when this runs out.
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server is stopping: each request is answered, then its connection closes.

        An idle connection is kept for `drain_s`, in case its client is sending a request on it
        right now; connections close without lingering.
        """
        self._shutting_down = True
        if self.transport.is_closing():
            return
        if self._serving():
            super().shutdown()  # the answer says `Connection: close`, and the connection closes
            return
        self._drain_timer = self.loop.call_later(self.limits.drain_s, self._drained)

    def _serving(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _drained(self) -> None:
        self._drain_timer = None
        # A request whose head is arriving, or being served, closes the connection when answered.
        if not (self._started or self._serving() or self.transport.is_closing()):
            self.transport.close()

    def close_gracefully(self) -> None:
        """Close; if the client may still be sending, shut our side and drain first."""
        raw = self.transport.raw  # type: ignore[attr-defined]
        if raw.is_closing() or self.lingering:
            return
        self._cancel_header_timer()
        if self._request_in or self._shutting_down or not raw.can_write_eof():
            raw.close()
            return
        self.lingering = True
        raw.write_eof()  # the answer, then end of stream: the client reads it all
        raw.resume_reading()
        self.loop.call_later(LINGER_S, raw.close)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None or self.lingering:
            return  # answered and closing: whatever else comes is dropped
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no protocol upgrades here: the request is served as plain HTTP
        except httptools.HttpParserError:
            # A malformed request or chunk, or a limit that a callback below refused.
            self.send_400_response("")

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._started = True
        self._request_in = False
        if self._header_timer is None:
            self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_request_line_bytes:
            raise self._pending(
                _Refusal(
                    414,
                    f"request target longer than {self.limits.max_request_line_bytes} bytes",
                )
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.limits.max_header_bytes:
            raise self._pending(
                _Refusal(431, f"request headers larger than {self.limits.max_header_bytes} bytes")
            )
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self._started = False
        for name, value in self.headers:
            if name == b"transfer-encoding" and value.strip().lower() != b"chunked":
                raise self._pending(
                    _Refusal(501, f"Transfer-Encoding {value.decode('latin-1')!r} is not supported")
                )
        super().on_headers_complete()
        if self._shutting_down and self.cycle is not None:
            self.cycle.keep_alive = False  # draining: answered, then closed

    def on_message_complete(self) -> None:
        self._request_in = True
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """The parser failed: a malformed request, or a limit a callback refused."""
        refusal = self._refusal or _Refusal(400, "malformed HTTP request: it could not be parsed")
        self._refuse(refusal)

    # Timers and refusals

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(
            self.limits.header_timeout_s, self._header_timed_out
        )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if not self._started:
            self.transport.close()  # nothing of a request came: nothing to answer
            return
        seconds = self.limits.header_timeout_s
        self._refuse(_Refusal(408, f"request headers not received within {seconds:g} s"))

    def _pending(self, refusal: _Refusal) -> _Refusal:
        # Raised inside the parser, which reports it as a parse error: send_400_response then
        # answers with this refusal instead.
        self._refusal = refusal
        return refusal

    def _refuse(self, refusal: _Refusal) -> None:
        self._refusal = refusal
        self._request_in = False  # the client may be sending yet: the close lingers
        self._cancel_header_timer()
        if self.transport.is_closing():
            return
        headers = self.headers if isinstance(self.headers, list) else []
        extra, body = edge_error(refusal.status, refusal.message, request_id_of(headers))
        lines = [STATUS_LINE[refusal.status]]
        for name, value in self.server_state.default_headers + extra:
            lines += [name, b": ", value, b"\r\n"]
        self.transport.write(b"".join([*lines, b"\r\n", body]))
        self.transport.close()


def protocol_for(limits: HttpSettings) -> type[EdgeProtocol]:
    """An `EdgeProtocol` class with `limits`, for uvicorn's `http=` setting."""
    return type("EdgeProtocol", (EdgeProtocol,), {"limits": limits})

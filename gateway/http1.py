"""HTTP/1.1 on the wire for the recommenders' clients: requests out, answers in, within limits.

Shared by the asyncio pool (`gateway.upstream.ConnectionPool`) and the blocking one
(`gateway.blocking.BlockingPool`), so that both send the same requests and read answers the
same way, with the same limits and the same errors:

- `request_bytes`: a POST of a JSON body, headers checked for line breaks;
- `AnswerReader`: one connection's answers parsed by httptools as their bytes come. Answers
  with `Content-Length`, chunked, or delimited by the connection's end; interim 1xx answers
  skipped; headers capped at `MAX_HEAD_BYTES`; gzip and deflate bodies decompressed as they
  come (`Inflater`). Each answer is read up to its `max_bytes`, counted twice: the bytes that
  arrive and the bytes they decompress to. A `Content-Length` above it fails before the body
  is read, and a body that grows past it (endless chunks, a gzip bomb) fails at that byte:
  nothing beyond it is kept or decompressed, and the caller drops the connection;
- the errors, which a caller maps to reasons: `ConnectFailed`, `Disconnected` (closed before
  any answer), `Truncated` (cut off in the answer), `Malformed`, `TooLarge`, `PoolClosed`.
"""

from __future__ import annotations

import functools
import os
import socket
import ssl
import urllib.parse
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import httptools

__all__ = [
    "MAX_ANSWER_BYTES",
    "MAX_HEAD_BYTES",
    "Answer",
    "AnswerReader",
    "ConnectFailed",
    "Disconnected",
    "Headers",
    "Inflater",
    "Malformed",
    "Origin",
    "PoolClosed",
    "Target",
    "TooLarge",
    "Truncated",
    "UpstreamError",
    "describe",
    "request_bytes",
    "target_of",
]

MAX_HEAD_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 1024 * 1024  # a pool's default cap on one answer's body

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


class TooLarge(UpstreamError):
    """The answer is larger than the call's cap: as announced, as sent, or decompressed."""


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
class Origin:
    """Where connections go: scheme, host and port."""

    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> bytes:
        """The Host header's value."""
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host if self.port == default else f"{host}:{self.port}").encode("idna")


@dataclass(frozen=True, slots=True)
class Target:
    """A URL as requests need it: its origin, and the path and query sent."""

    origin: Origin
    path: bytes  # path and query, as sent


def target_of(url: str) -> Target:
    """The origin and path of an http(s) `url`; `ValueError` for any other."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(Origin(parts.scheme, parts.hostname, port), path.encode("ascii"))


def describe(error: OSError) -> str:
    """The errno's own words for a socket error: what an operator searches for."""
    # asyncio words a refused connection as "Connect call failed ('127.0.0.1', 5001)".
    if isinstance(error, socket.gaierror):
        return "host name not resolved"
    if error.errno and error.errno > 0:
        return os.strerror(error.errno)
    return error.strerror or type(error).__name__


def request_bytes(
    target: Target, body: bytes, headers: Mapping[str, str], user_agent: bytes
) -> bytes:
    """The bytes of a POST of `body` (JSON) to `target` with `headers`."""
    lines = [
        b"POST ",
        target.path,
        b" HTTP/1.1\r\nHost: ",
        target.origin.authority,
        b"\r\nUser-Agent: ",
        user_agent,
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


def _zlib_wrapped(data: bytes) -> bool:
    """Whether a deflate body starts with zlib's header (RFC 1950) rather than raw deflate."""
    return data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0


class Inflater:
    """A gzip or deflate body decompressed as it arrives, never to more than `limit` bytes."""

    def __init__(self, coding: bytes, limit: int):
        self.coding = coding.decode("latin-1")
        self.limit = limit
        self.size = 0
        self._fed = False
        self._head = b""  # deflate: the first bytes, until they tell zlib's wrapping from raw
        self._zlib = None if coding == b"deflate" else zlib.decompressobj(zlib.MAX_WBITS | 16)

    def feed(self, data: bytes) -> bytes:
        """The bytes `data` decompresses to; `TooLarge` past the limit, `Malformed` if bad."""
        self._fed = True
        if self._zlib is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            data, self._head = self._head, b""
            wbits = zlib.MAX_WBITS if _zlib_wrapped(data) else -zlib.MAX_WBITS
            self._zlib = zlib.decompressobj(wbits)
        try:
            # One byte more than the limit allows: getting it means the body is too large, and
            # zlib stops there, holding the rest of the input undecompressed.
            out = self._zlib.decompress(data, self.limit - self.size + 1)
        except zlib.error as exc:
            raise self._malformed() from exc
        self.size += len(out)
        if self.size > self.limit:
            raise TooLarge(f"answer decompresses to more than the limit of {self.limit} bytes")
        return out

    def end(self) -> None:
        """The body is over: `Malformed` if its compressed stream is not."""
        if self._fed and (self._zlib is None or not self._zlib.eof):
            raise self._malformed()

    def _malformed(self) -> Malformed:
        return Malformed(f"{self.coding} body that does not decompress")


class AnswerReader:
    """One connection's answers, parsed as their bytes come, each within a cap on its size.

    `feed` takes the bytes that arrived and returns the answer once it is whole; `end` says
    what the connection's close amounts to. Shared by the pooled asyncio connections and by
    `BlockingPool`, so both read answers the same way, with the same limits and errors.
    """

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.start(MAX_ANSWER_BYTES)

    def start(self, max_bytes: int) -> None:
        """Expect a new answer, of at most `max_bytes` (sent, and decompressed)."""
        self.max_bytes = max_bytes
        self.answer: Answer | None = None
        self.keep_alive = False
        self.started = False  # bytes of this answer have come
        self._headers: Headers = []
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._received = 0
        self._inflater: Inflater | None = None
        self._sized = False  # its end is known from the headers (length or chunks)
        self._headers_done = False
        self._refused: UpstreamError | None = None  # why a parser callback stopped the parse

    def feed(self, data: bytes) -> Answer | None:
        """Parse `data`; the answer once it is whole, else None. Raises `UpstreamError`."""
        self.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.answer is not None:
                # The answer is whole; what came after it was not asked for.
                self.keep_alive = False
                return self.answer
            raise self._refusal(exc) from None
        return self.answer

    def end(self) -> Answer:
        """The connection closed: the answer it completed, or the error it amounts to."""
        if self.answer is None:
            if self._headers_done and not self._sized:
                self._finish(keep_alive=False)  # an answer delimited by the connection's end
            elif self.started:
                raise Truncated("the answer was cut off")
            else:
                raise Disconnected("closed before answering")
        assert self.answer is not None
        return self.answer

    def drop(self) -> None:
        """The connection is gone: let go of its last answer and what was read of it.

        The parser and the reader refer to each other, a cycle that only a garbage collection
        frees; what they hold should not wait for it.
        """
        self.answer = None
        self._headers = []
        self._body = []
        self._inflater = None

    def _stop(self, error: UpstreamError) -> UpstreamError:
        """Record why a parser callback stops the parse; the callback raises it, `feed` too."""
        self._refused = error
        # Nothing of the answer is read on: let go of what was (up to `max_bytes`) at once.
        self._body = []
        self._inflater = None
        return error

    def _refusal(self, parse_error: httptools.HttpParserError) -> UpstreamError:
        # Taken off the reader: an error that the reader held, and whose traceback holds the
        # reader, would be a reference cycle, freed only by a full garbage collection.
        refused, self._refused = self._refused, None
        return refused or Malformed(f"not an HTTP answer: {parse_error}")

    def _finish(self, keep_alive: bool) -> None:
        if self._inflater is not None:
            self._inflater.end()
        self.answer = Answer(self.parser.get_status_code(), self._headers, b"".join(self._body))
        self.keep_alive = keep_alive
        self._body = []

    # Parser callbacks

    def on_message_begin(self) -> None:
        if self.answer is not None:
            raise self._stop(Malformed("more than one answer to one request"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise self._stop(Malformed(f"answer headers larger than {MAX_HEAD_BYTES} bytes"))
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        coding = b"identity"
        for name, value in self._headers:
            if name == b"content-length":
                self._sized = True
                if value.strip().isdigit() and int(value) > self.max_bytes:
                    raise self._stop(
                        TooLarge(
                            f"answer larger than the limit of {self.max_bytes} bytes "
                            f"(Content-Length: {int(value)})"
                        )
                    )
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                self._sized = True
            elif name == b"content-encoding" and coding == b"identity":
                coding = value.strip().lower()
        if coding in (b"gzip", b"x-gzip", b"deflate"):
            self._inflater = Inflater(coding, self.max_bytes)
        elif coding != b"identity":
            shown = coding.decode("latin-1")
            raise self._stop(Malformed(f"Content-Encoding {shown!r} is not supported"))

    def on_body(self, body: bytes) -> None:
        self._received += len(body)
        if self._received > self.max_bytes:
            raise self._stop(TooLarge(f"answer larger than the limit of {self.max_bytes} bytes"))
        if self._inflater is not None:
            try:
                body = self._inflater.feed(body)
            except UpstreamError as exc:
                raise self._stop(exc) from None
        self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self.parser.get_status_code() < 200:
            self.start(self.max_bytes)  # an interim answer: the final one follows
            self.started = True
            return
        try:
            self._finish(self.parser.should_keep_alive())
        except UpstreamError as exc:
            raise self._stop(exc) from None


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The system's default TLS context, made once per process and shared by both pools."""
    return ssl.create_default_context()

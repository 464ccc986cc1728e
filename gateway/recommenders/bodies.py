"""A recommender's answer, its body read within a cap whichever HTTP library brought it.

Both of the gateway's HTTP clients, aiohttp's session on the worker loop
(`gateway.recommenders.async_http`) and requests' sessions in threads
(`gateway.recommenders.blocking_http`), hand the bytes of an answer's body, as they arrive and still
compressed, to one `BodyReader`, so both
read an answer the same way, with the same limits and the same errors:

- an answer is read up to its `max_bytes`, counted twice: the bytes that arrive and the bytes
  they decompress to. A `Content-Length` above it fails before the body is read, and a body
  that grows past it (endless chunks, a gzip bomb) fails at that byte: nothing beyond it is
  kept or decompressed, and the client drops the connection;
- gzip and deflate (zlib-wrapped or raw) are decompressed by zlib as the bytes come; any other
  `Content-Encoding` is refused rather than parsed as JSON;
- the errors, which `gateway.recommenders.clients` maps to reasons with the libraries' own:
  `TooLarge`, `Malformed` (a body that does not decompress, a coding not asked for), `Truncated`
  (the
  connection failed part-way through the body).

The libraries decompress too; the gateway does it here, once for both, because the cap must
count the bytes sent as well as what they expand to, and stop at that byte.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "MAX_ANSWER_BYTES",
    "Answer",
    "AnswerUnread",
    "BodyReader",
    "Inflater",
    "Malformed",
    "TooLarge",
    "Truncated",
]

MAX_ANSWER_BYTES = 1024 * 1024  # a client's default cap on one answer's body

# The content codings the clients ask for (`Accept-Encoding`) and can read.
ACCEPT_ENCODING = "gzip, deflate"


class AnswerUnread(Exception):
    """An answer whose body could not be read within the call's limits."""


class TooLarge(AnswerUnread):
    """The answer is larger than the call's cap: as announced, as sent, or decompressed."""


class Malformed(AnswerUnread):
    """The answer's body cannot be read: it does not decompress, or its coding is unknown."""


class Truncated(AnswerUnread):
    """The connection failed part-way through the answer's body."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A recommender's answer: status, headers (looked up in any case) and body (decoded)."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        """The value of the header `name`, or None."""
        return self.headers.get(name)


def _zlib_wrapped(data: bytes) -> bool:
    """Whether a deflate body starts with zlib's header (RFC 1950) rather than raw deflate."""
    return data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0


class Inflater:
    """A gzip or deflate body decompressed as it arrives, never to more than `limit` bytes."""

    def __init__(self, coding: str, limit: int):
        self.coding = coding
        self.limit = limit
        self.size = 0
        self._fed = False
        self._head = b""  # deflate: the first bytes, until they tell zlib's wrapping from raw
        self._zlib = None if coding == "deflate" else zlib.decompressobj(zlib.MAX_WBITS | 16)

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


class BodyReader:
    """One answer's body, fed as it arrives, within `max_bytes` as sent and as decompressed.

    Made from the answer's headers, it refuses at once a `Content-Length` over the cap or a
    coding it cannot read; `feed` takes each piece of the body, `body` the whole once it ended.
    """

    __slots__ = ("_inflater", "_pieces", "_received", "length", "max_bytes")

    def __init__(self, headers: Mapping[str, str], max_bytes: int):
        self.max_bytes = max_bytes
        self._received = 0
        self._pieces: list[bytes] = []
        self.length: int | None = None  # as announced by `Content-Length`, if it is
        announced = headers.get("Content-Length")
        if announced is not None and announced.strip().isdigit():
            self.length = int(announced)
            if self.length > max_bytes:
                raise TooLarge(
                    f"answer larger than the limit of {max_bytes} bytes "
                    f"(Content-Length: {self.length})"
                )
        coding = (headers.get("Content-Encoding") or "identity").strip().lower()
        self._inflater: Inflater | None = None
        if coding in ("gzip", "x-gzip", "deflate"):
            self._inflater = Inflater("deflate" if coding == "deflate" else "gzip", max_bytes)
        elif coding != "identity":
            raise Malformed(f"Content-Encoding {coding!r} is not supported")

    @property
    def plain(self) -> bool:
        """Whether the body comes as it is (not compressed)."""
        return self._inflater is None

    def feed(self, data: bytes) -> None:
        """Take the next piece of the body; `TooLarge` or `Malformed` stop the read."""
        self._received += len(data)
        if self._received > self.max_bytes:
            self._pieces = []
            raise TooLarge(f"answer larger than the limit of {self.max_bytes} bytes")
        if self._inflater is not None:
            try:
                data = self._inflater.feed(data)
            except AnswerUnread:
                self._pieces = []
                raise
        self._pieces.append(data)

    def body(self) -> bytes:
        """The whole body, decoded, once it has ended; `Malformed` if it does not decompress."""
        if self._inflater is not None:
            self._inflater.end()
        pieces, self._pieces = self._pieces, []
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

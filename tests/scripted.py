"""A server scripted byte by byte, for the recommenders' HTTP clients, and the answers and failures
of their bodies that every client is tested with (`tests/recommenders/test_blocking_http.py`).

Real sockets on loopback: the server reads each request and does what the test scripted for
it (answer these bytes, close, reset, wait), and counts connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
import struct
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.recommenders.bodies import Malformed, Truncated
from tests.tools import require_tool

__all__ = [
    "BODY_FAILURES",
    "CAP",
    "OVERSIZED",
    "Action",
    "Scripted",
    "answer",
    "bomb",
    "chunked_forever",
    "close",
    "compressed",
    "reset",
    "scripted_server",
    "self_signed",
    "then",
    "tls_url",
    "trickle",
    "wait",
]

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


@contextlib.asynccontextmanager
async def scripted_server() -> AsyncIterator[Scripted]:
    """A `Scripted` server listening on a free loopback port, closed on the way out."""
    scripted = Scripted()
    scripted.server = await asyncio.start_server(scripted._serve, "127.0.0.1", 0)
    try:
        yield scripted
    finally:
        scripted.server.close()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by openssl: trusted by no
    system, so a client trusts it only when told to (`pool.ca_file`)."""
    openssl = require_tool("openssl")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@contextlib.asynccontextmanager
async def tls_url(scripted: Scripted, certificate: tuple[Path, Path]) -> AsyncIterator[str]:
    """`scripted` served behind TLS too, with `certificate`: the HTTPS URL."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    listening = await asyncio.start_server(scripted._serve, "127.0.0.1", 0, ssl=context)
    try:
        yield f"https://127.0.0.1:{listening.sockets[0].getsockname()[1]}/test"
    finally:
        listening.close()


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


# A body that cannot be read, each its own error (`gateway.recommenders.bodies`'): `step` answers
# the first call. How the connection fails before the body is each library's own, tested with its
# client.
BODY_FAILURES = pytest.mark.parametrize(
    ("step", "error", "message"),
    [
        (then(answer(b"x" * 100)[:-90], close), Truncated, "part-way"),
        (then(answer(b"x" * 100)[:-90], reset), Truncated, "part-way"),
        (answer(b"\x01\x02", 200, "Content-Encoding: br"), Malformed, "'br' is not supported"),
        (answer(b"not gzip", 200, "Content-Encoding: gzip"), Malformed, "does not decompress"),
        (
            answer(gzip.compress(b'{"a": 1}')[:-8], 200, "Content-Encoding: gzip"),
            Malformed,
            "gzip body that does not decompress",
        ),
    ],
    ids=["cut off", "reset", "brotli", "bad gzip", "gzip cut short"],
)


CAP = 4096  # the cap on one answer in the tests of bounded answers


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


# Answers over `CAP`: announced, sent, endless or decompressed; `step` answers the first call.
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


def trickle(data: bytes, every_s: float, sent: list[int]) -> Action:
    """Send `data` a byte at a time, counting in `sent`: each read waits less than a timeout."""

    async def act(writer: asyncio.StreamWriter) -> None:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            sent[0] += 1
            await asyncio.sleep(every_s)

    return act

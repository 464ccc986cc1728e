"""A hostile recommender for the tests: valid HTTP, answers built to hurt whoever reads them.

`HostileRecommender` serves, on a loopback port the system picks, in a thread of its own, one
hostile answer per path (`POST /<path>`):

| path | what it answers |
| --- | --- |
| `ok` | a normal answer of 10 items |
| `nested` | a valid answer with a field nested 300 levels deep |
| `many-items` | 5,000 items in 150 KB: under the byte cap, over the item cap |
| `items` | 1,000,000 items, 34 MB, with its `Content-Length` |
| `large` | 50 MB: a valid answer padded by a 50 MB string, with its `Content-Length` |
| `endless` | a chunked answer whose chunks never end |
| `bomb` | a gzip body of 1 MB (just under 1 MiB) that decompresses to 1,000 MiB |
| `trickle` | an answer sent one byte every 100 ms (its headers alone take over a minute) |

Large answers are generated as they are sent, never held whole. With `benign` set, every path
answers like `ok`. It counts, per path, the calls (`calls`) and the connections that ended
after one of them (`closed`), so that a test can see the gateway drop a connection rather
than read on.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import zlib
from collections.abc import Iterator

__all__ = ["PATHS", "HostileRecommender", "gzip_bomb"]

PATHS = ("ok", "nested", "many-items", "items", "large", "endless", "bomb", "trickle")

_ITEM = b'{"id": "i%07d", "score": 0.5}'  # 32 bytes, whatever the number
_CHUNK_ITEMS = 10_000


def gzip_bomb(expanded: int, block: int = 1 << 20) -> Iterator[bytes]:
    """A gzip stream of `expanded` zero bytes, generated lazily, about 1/1000 of that long.

    After a full flush zlib's output for the same input repeats, so one compressed block is
    sent again and again. The trailer's checksum is not the real one: a reader that honours a
    size limit stops long before it.
    """
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(block)
    yield packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    again = packer.compress(zeros) + packer.flush(zlib.Z_FULL_FLUSH)
    for _ in range(expanded // block - 1):
        yield again
    yield packer.flush()


def _head(length: int | None, *extra: str) -> bytes:
    lines = ["HTTP/1.1 200 OK", "Content-Type: application/json", *extra]
    lines.append(
        f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _ok() -> bytes:
    items = [{"id": f"i{i}", "score": round(1 - i / 10, 2)} for i in range(10)]
    return json.dumps({"items": items}).encode()


def _items(count: int) -> Iterator[bytes]:
    yield b'{"items": ['
    for start in range(0, count, _CHUNK_ITEMS):
        stop = min(start + _CHUNK_ITEMS, count)
        yield b", ".join(_ITEM % i for i in range(start, stop)) + (b", " if stop < count else b"")
    yield b"]}"


def _items_length(count: int) -> int:
    return len(b'{"items": [') + count * len(_ITEM % 0) + (count - 1) * 2 + len(b"]}")


class HostileRecommender:
    """Hostile answers on a free loopback port, served from a thread's event loop."""

    def __init__(self) -> None:
        self.benign = False
        self.calls: collections.Counter[str] = collections.Counter()
        self.closed: collections.Counter[str] = collections.Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def __enter__(self) -> HostileRecommender:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def url(self, path: str) -> str:
        """The URL that answers the hostile answer `path`."""
        return f"http://127.0.0.1:{self.port}/{path}"

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Calls, and connections ended after one, per path (read on the server's loop)."""

        async def read() -> tuple[dict[str, int], dict[str, int]]:
            return dict(self.calls), dict(self.closed)

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = "?"
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1].strip("/")
                length = next(
                    (
                        int(v)
                        for k, _, v in (line.partition(":") for line in lines)
                        if k.lower() == "content-length"
                    ),
                    0,
                )
                await reader.readexactly(length)
                self.calls[path] += 1
                await self._answer("ok" if self.benign else path, writer)
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
        finally:
            self.closed[path] += 1
            writer.close()

    async def _answer(self, path: str, writer: asyncio.StreamWriter) -> None:
        """Send the answer of `path`; return only if the connection may serve another."""
        if path == "ok":
            body = _ok()
            writer.write(_head(len(body)) + body)
        elif path == "nested":
            body = b'{"items": [{"id": "a", "score": 1.0}], "deep": ' + b"[" * 299
            body += b"]" * 299 + b"}"
            writer.write(_head(len(body)) + body)
        elif path == "many-items":
            writer.write(_head(_items_length(5000)) + b"".join(_items(5000)))
        elif path == "items":
            await self._send(writer, _head(_items_length(1_000_000)), _items(1_000_000))
        elif path == "large":
            size = 50 * 1024 * 1024
            opening, closing = b'{"items": [], "padding": "', b'"}'
            padding = (b"x" * (1 << 16) for _ in range(size // (1 << 16)))
            head = _head(len(opening) + size + len(closing)) + opening
            await self._send(writer, head, padding, closing)
        elif path == "endless":
            chunk = b"%x\r\n%s\r\n" % (1 << 16, b" " * (1 << 16))
            await self._send(writer, _head(None) + b'%x\r\n{"items": [\r\n' % 11, _forever(chunk))
        elif path == "bomb":
            compressed = b"".join(gzip_bomb(1000 << 20))
            await self._send(
                writer, _head(len(compressed), "Content-Encoding: gzip"), iter([compressed])
            )
        elif path == "trickle":
            body = _ok()
            for byte in _head(len(body), *[f"X-Padding-{i}: {'.' * 40}" for i in range(12)]) + body:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter, head: bytes, body: Iterator[bytes], tail: bytes = b""
    ) -> None:
        writer.write(head)
        for piece in body:
            writer.write(piece)
            await writer.drain()
        writer.write(tail)


def _forever(chunk: bytes) -> Iterator[bytes]:
    while True:
        yield chunk

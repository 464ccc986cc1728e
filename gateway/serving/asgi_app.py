"""Serving the Flask app on the event loop: `GatewayASGI`, the gateway as an ASGI application.

Under the uvicorn worker (`gateway.worker.UvicornWorker`), one event loop per worker parses
HTTP, runs Flask and fans out to the recommenders. For each request, `GatewayASGI`:

1. refuses at once a body announced larger than `max_body_bytes` (413), and otherwise reads
   it whole, within `http.body_timeout_s` (408) and within the limit however it is sent,
   chunked included (413, without reading on);
2. runs Flask's WSGI call in a greenlet portal on this loop (`gateway.runtime.portal`), so that the
   ``async def`` view's coroutine is awaited right here, where the recommender session lives;
3. sends Flask's response.

Its ASGI lifespan opens the worker's recommender session at startup and closes it at shutdown,
after uvicorn has let the requests in flight finish. A `/recommendation` is admitted here, once
its body is in, under the worker's adaptive limit (`gateway.resilience.admission`); one above it
waits in the worker's queue while it can still meet its deadline, and is otherwise answered 503
without
entering Flask.
"""

from __future__ import annotations

import asyncio
import gc
import io
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from gateway.observability import logs, metrics
from gateway.resilience.admission import ShedReason
from gateway.runtime.portal import run_sync
from gateway.serving.edge import edge_error, request_id_of
from gateway.web.flask_app import GatewayFlask
from gateway.web.hooks import ADMITTED, ARRIVED, BODY, QUEUED

__all__ = ["YOUNG_GENERATION_THRESHOLD", "GatewayASGI", "settle_heap"]

# Measured with 64 users on the development machine (one worker): at Python's 700, the
# collector took 91-97 µs of a worker's CPU per request (a young pass every 8 requests, 0.4 ms
# each, and an older one every 90, 3 ms); at 10,000, 6-7 µs (a pass every 1,000 requests,
# 6-7 ms each).
YOUNG_GENERATION_THRESHOLD = 10_000

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


class _Refused(Exception):
    """The request is answered by the edge with `status` and the connection closed."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class GatewayASGI:
    """The gateway's Flask app as an ASGI app, on the serving loop."""

    def __init__(self, flask_app: GatewayFlask):
        self.flask = flask_app
        self.runtime = flask_app.runtime
        settings = self.runtime.settings
        self.max_body_bytes = settings.max_body_bytes
        self.body_timeout_s = settings.http.body_timeout_s
        self.metrics = settings.metrics
        self._shed_answer = flask_app.shed_answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        # Anything else (websocket) is not served: returning unanswered refuses it.

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.runtime.open()
                except Exception as exc:  # the server reports it and does not start
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                settle_heap()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.runtime.aclose()
                # uvicorn ends the worker by re-raising the signal that stopped it, so exit
                # handlers do not run: what the log thread has not written yet is, now.
                await asyncio.to_thread(logs.flush)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.runtime.started and not self.runtime.closed:
            await self.runtime.open()  # a server that runs no lifespan
        recommendation = scope["path"] == "/recommendation" and scope["method"] == "POST"
        arrived = time.perf_counter()
        queue = self.runtime.queue
        if recommendation:
            refusal = queue.turn_away()
            if refusal is not None:
                await self._shed(scope, send, refusal)  # no need to read a body not used
                return
        try:
            body = await self._body(scope["headers"], receive)
        except _Refused as refused:
            await _send_edge_error(send, refused, scope["headers"])
            return
        if body is None:
            return  # the client left before its body was in: nobody to answer
        if not recommendation:
            await self._respond(send, _environ(scope, body))
            return
        # Admitted once its body is in (a slow upload holds a socket, never a slot), or left
        # to wait for one (a future on this loop); shed before anything else is done for it:
        # a shed request costs the least there is.
        refusal, waited = await queue.enter(arrived, len(body))
        if waited and self.metrics:
            metrics.observe_queue_wait(waited, "shed" if refusal else "admitted")
        if refusal is not None:
            await self._shed(scope, send, refusal)
            return
        admitted = time.perf_counter()
        try:
            environ = _environ(scope, body)
            environ[ADMITTED] = True
            environ[ARRIVED] = arrived
            environ[QUEUED] = waited
            await self._respond(send, environ)
        finally:
            queue.leave(time.perf_counter() - admitted)

    async def _respond(self, send: Send, environ: dict[str, Any]) -> None:
        status, headers, payload = await run_sync(self._call_flask, environ)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _shed(self, scope: Scope, send: Send, reason: ShedReason) -> None:
        """503 before Flask, saying why: the cheapest answer this worker can give.

        Shed requests are counted in the metrics one by one, and logged one line a second with
        their number (`gateway.runtime.worker_runtime`): a line each would cost a shed request a
        third more.
        """
        received = time.perf_counter()
        request_id = request_id_of(scope["headers"])
        limit = self.runtime.admission.limit
        body, headers = self._shed_answer.render(reason, limit, request_id)
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self.runtime.shed += 1
        if self.metrics:
            metrics.observe_shed("/recommendation", time.perf_counter() - received, reason)

    async def _body(self, headers: Headers, receive: Receive) -> bytes | None:
        """The whole request body, or None if the client disconnected first."""
        limit = self.max_body_bytes
        for name, value in headers:
            if name == b"content-length":
                try:
                    announced = int(value)
                except ValueError:
                    raise _Refused(400, "Content-Length is not a number") from None
                if announced > limit:
                    raise _Refused(413, f"request body is larger than the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return None
                    chunk: bytes = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise _Refused(
                            413, f"request body is larger than the limit of {limit} bytes"
                        )
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise _Refused(
                408, f"request body not received within {self.body_timeout_s:g} s"
            ) from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _call_flask(self, environ: dict[str, Any]) -> tuple[int, Headers, bytes]:
        """Flask's WSGI call, in the portal greenlet; returns status, headers and body."""
        started: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            started[:] = [status, headers]
            return None

        result: Iterable[bytes] = self.flask(environ, start_response)
        try:
            payload = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = started
        encoded = [
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers
        ]
        return int(status[:3]), encoded, payload


def settle_heap() -> None:
    """Keep what start-up made out of the garbage collector's full passes, and pass less often.

    A full collection walks every object the process holds: measured on the development
    machine, 130 ms with the loop stopped for all of it. What exists once the app is loaded
    lives as long as the worker, so it is frozen (`gc.freeze`, as Instagram does in its
    workers), and a full pass walks only what serving has made since.

    The young generation is collected once `YOUNG_GENERATION_THRESHOLD` more objects live than
    at its last pass, not Python's 700: the requests in flight hold more than that between
    them, so at 700 a pass came every 8 requests at 64 users, walked objects that were all
    still in use, and pushed them into the older generations to be walked again.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, oldest)


async def _send_edge_error(send: Send, refused: _Refused, request_headers: Headers) -> None:
    headers, body = edge_error(refused.status, refused.message, request_id_of(request_headers))
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _environ(scope: Scope, body: bytes) -> dict[str, Any]:
    """The WSGI environ of an ASGI request whose body has been read (PEP 3333 strings)."""
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode().decode("latin-1"),
        "PATH_INFO": scope["path"].encode().decode("latin-1"),
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]) if server[1] is not None else "",
        "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        BODY: body,
    }
    if client:
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = client[0], str(client[1])
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        if name == "content-type":
            environ["CONTENT_TYPE"] = value
        elif name in ("content-length", "transfer-encoding"):
            continue  # the body is read: its length is known
        else:
            key = "HTTP_" + name.upper().replace("-", "_")
            environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ

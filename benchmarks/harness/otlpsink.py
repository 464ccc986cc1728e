"""A small OTLP/HTTP trace receiver: `POST /v1/traces`, protobuf, on a loopback port.

What the tracing benchmark exports to (so export costs what it costs, and the spans go
nowhere), and what the tests read spans from. It runs an aiohttp server on a thread of its
own; each request is decoded with `opentelemetry-proto` into an `ExportTraceServiceRequest`
and kept (`keep=True`) or only its spans counted.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

__all__ = ["OtlpSink"]


class OtlpSink:
    """An OTLP/HTTP receiver of traces in a thread; `url` is the exporter's endpoint base."""

    def __init__(self, keep: bool = True):
        self.keep = keep
        self.requests: list[ExportTraceServiceRequest] = []
        self.spans = 0
        self.url = ""
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="otlp-sink")

    def __enter__(self) -> OtlpSink:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def received(self) -> list[ExportTraceServiceRequest]:
        """The requests received so far (with `keep`)."""
        with self._lock:
            return list(self.requests)

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server  # the port the system picked
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _traces(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415, text="OTLP/HTTP protobuf only")
        decoded = ExportTraceServiceRequest.FromString(await request.read())
        scopes = [scope for resource in decoded.resource_spans for scope in resource.scope_spans]
        spans = sum(len(scope.spans) for scope in scopes)
        with self._lock:
            self.spans += spans
            if self.keep:
                self.requests.append(decoded)
        answer = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")

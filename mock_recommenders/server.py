"""The mock recommender HTTP service: one aiohttp application per recommender.

Endpoints of each recommender:

- ``POST /test``: the ranked list for the body's `user_id` and `resultSize`;
- the same list in the model servers' protocols, the recommender's name being the model's:
  KServe V1 (``POST /v1/models/<name>:predict``, ``{"instances": [body]}`` ->
  ``{"predictions": [answer]}``; ``GET /v1/models/<name>``, its readiness) and the Open
  Inference Protocol (``POST /v2/models/<name>/infer``, the inputs `user_id` (BYTES) and
  `result_size` (INT32) -> the outputs `item_ids` (BYTES) and `scores` (FP32), of shape
  [1, n]; ``GET /v2/models/<name>/ready``), with the same behaviours;
- ``GET /stats``, ``POST /stats/reset``: requests served and TCP connections seen;
- ``GET /admin/behaviour``, ``PUT /admin/behaviour``: read or change the behaviour.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import struct
import weakref
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.log import access_logger

from mock_recommenders.behaviour import Behaviour
from mock_recommenders.world import MAX_RESULTS, World, default_world

__all__ = [
    "DEFAULT_BASE_PORT",
    "DEFAULT_NAMES",
    "KEEPALIVE_TIMEOUT_S",
    "InFlight",
    "Recommender",
    "default_port",
    "start_site",
    "trace_log",
]

# One INFO line per call that carries a sampled W3C traceparent: a trace can be followed into
# the mock (`python -m mock_recommenders` writes them to stderr). Calls without one, or with an
# unsampled one (a gateway sampling 1% sends it on the other 99%), log nothing. A line costs
# about 10 µs (measured, written to /dev/null), some 4% of a mock's CPU per call: on a shared
# machine it would weigh on the gateway's side of a tracing A/B.
trace_log = logging.getLogger("mock_recommenders.trace")

DEFAULT_NAMES = ("sml", "asc", "trd", "psn")
DEFAULT_BASE_PORT = 5001
# Set explicitly, and well above the gateway client's idle keep-alive (`keepalive_timeout_s`
# in gateway/config/settings.py, a few seconds), which must stay below this: then the gateway,
# not the mock, closes idle connections. Otherwise a POST can go out on a connection the mock
# is closing at that moment and fail, and aiohttp does not retry a POST.
KEEPALIVE_TIMEOUT_S = 75.0


def default_port(name: str, base_port: int = DEFAULT_BASE_PORT) -> int | None:
    """The standard port of a standard recommender name, else None."""
    return base_port + DEFAULT_NAMES.index(name) if name in DEFAULT_NAMES else None


def _sampled(traceparent: str) -> bool:
    """Whether a traceparent (version-trace-parent-flags) has its sampled flag set."""
    try:
        return bool(int(traceparent[-2:], 16) & 1)
    except ValueError:
        return False


def _wake(delay: asyncio.Future[None]) -> None:
    if not delay.done():
        delay.set_result(None)


def _json(status: int, body: Any) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


# The native request body from a protocol's request (ValueError naming what is wrong), and the
# protocol's answer from the native answer, the request and the model's name.
_Reader = Callable[[Any], dict[str, Any]]
_Writer = Callable[[dict[str, Any], dict[str, Any], str], Any]


def _native_request(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return body


def _native_answer(answer: dict[str, Any], request: dict[str, Any], model: str) -> Any:
    return answer


def _v1_request(body: Any) -> dict[str, Any]:
    instances = body.get("instances") if isinstance(body, dict) else None
    if not isinstance(instances, list) or len(instances) != 1:
        raise ValueError('expected {"instances": [one request]}')
    return _native_request(instances[0])


def _v1_answer(answer: dict[str, Any], request: dict[str, Any], model: str) -> Any:
    return {"predictions": [answer]}


def _v2_request(body: Any) -> dict[str, Any]:
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list):
        raise ValueError("expected an inference request with `inputs`")
    tensors = {t.get("name"): t for t in inputs if isinstance(t, dict)}
    native: dict[str, Any] = {"id": body.get("id")}
    for name, key, datatype in (
        ("user_id", "user_id", "BYTES"),
        ("result_size", "resultSize", "INT32"),
    ):
        tensor = tensors.get(name)
        if tensor is None:
            continue
        data = tensor.get("data")
        if tensor.get("datatype") != datatype or not isinstance(data, list) or len(data) != 1:
            raise ValueError(f"input {name} must be one {datatype} value")
        native[key] = data[0]
    return native


def _v2_answer(answer: dict[str, Any], request: dict[str, Any], model: str) -> Any:
    items = answer["items"]
    shape = [1, len(items)]
    return {
        "model_name": model,
        "id": request.get("id"),
        "outputs": [
            {
                "name": "item_ids",
                "shape": shape,
                "datatype": "BYTES",
                "data": [i["id"] for i in items],
            },
            {
                "name": "scores",
                "shape": shape,
                "datatype": "FP32",
                "data": [i["score"] for i in items],
            },
        ],
    }


class InFlight:
    """Calls under way now, and the most that were under way at once since the last reset.

    Shared by the recommenders of one fleet, it tells a test whether a caller called them one
    after another (a peak of 1) or all at once, without timing anything.
    """

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def enter(self) -> None:
        """A call started."""
        self.now += 1
        self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        """A call ended."""
        self.now -= 1

    def reset(self) -> None:
        """Forget the peak; calls still under way count on."""
        self.peak = self.now


class Recommender:
    """One mock recommender: its behaviour, its counters, and its aiohttp application."""

    def __init__(
        self,
        name: str,
        behaviour: Behaviour | None = None,
        seed: int | None = None,
        world: World | None = None,
        in_flight: InFlight | None = None,
    ) -> None:
        self.name = name
        # Built here (once per process), not on the first call, which would then be slow.
        self.world = world if world is not None else default_world()
        self.behaviour = behaviour.copy() if behaviour is not None else Behaviour()
        self.requests = 0
        self.connections = 0
        self.errors = 0
        self.resets = 0
        self.hangs = 0
        self.last_request: dict[str, Any] | None = None
        self._seen: weakref.WeakSet[object] = weakref.WeakSet()
        self._rng = random.Random(seed)
        self.in_flight = in_flight if in_flight is not None else InFlight()
        # Set when `hang` is switched off or the service stops: the calls hanging now go on.
        # A new event replaces it then, for the calls that hang later.
        self._unhang = asyncio.Event()
        self._stopping = False
        # The delays under way, cut short when the service stops (asyncio.sleep's own recipe).
        self._sleeping: set[asyncio.Future[None]] = set()

    def stats(self) -> dict[str, Any]:
        """Calls to ``POST /test``, the TCP connections they came on, and the faults injected."""
        return {
            "name": self.name,
            "requests": self.requests,
            "connections": self.connections,
            "errors": self.errors,
            "resets": self.resets,
            "hangs": self.hangs,
        }

    def change(self, changes: dict[str, Any]) -> None:
        """Change the behaviour, all or none (`ValueError`); switching `hang` off releases hangs.

        Call it on the loop that serves this recommender.
        """
        self.behaviour.update(changes)
        if not self.behaviour.hang:
            self._release_hangs()

    def stop(self) -> None:
        """The service is stopping: end delays and hangs now, and start none."""
        self._stopping = True
        self._release_hangs()
        for delay in self._sleeping:
            if not delay.done():
                delay.set_result(None)

    async def _sleep(self, seconds: float) -> None:
        delay = asyncio.get_running_loop().create_future()
        timer = asyncio.get_running_loop().call_later(seconds, _wake, delay)
        self._sleeping.add(delay)
        try:
            await delay
        finally:
            timer.cancel()
            self._sleeping.discard(delay)

    def _release_hangs(self) -> None:
        self._unhang.set()
        self._unhang = asyncio.Event()

    def reset_stats(self) -> None:
        """Zero the counters."""
        self.requests = 0
        self.connections = 0
        self.errors = 0
        self.resets = 0
        self.hangs = 0
        self._seen = weakref.WeakSet()
        self.last_request = None

    def application(self) -> web.Application:
        """The aiohttp application serving this recommender."""
        app = web.Application()
        app.router.add_post("/test", self._recommend)
        app.router.add_post("/v1/models/{model:[^/:]+}:predict", self._predict_v1)
        app.router.add_get("/v1/models/{model:[^/:]+}", self._ready_v1)
        app.router.add_post("/v2/models/{model}/infer", self._infer_v2)
        app.router.add_get("/v2/models/{model}/ready", self._ready_v2)
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/stats/reset", self._reset)
        app.router.add_get("/admin/behaviour", self._get_behaviour)
        app.router.add_put("/admin/behaviour", self._put_behaviour)
        return app

    def _count(self, request: web.Request) -> None:
        self.requests += 1
        # One transport per TCP connection; a weak set keeps memory flat however many
        # connections come and go.
        transport = request.transport
        if transport is not None and transport not in self._seen:
            self._seen.add(transport)
            self.connections += 1

    async def _recommend(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, _native_request, _native_answer)

    async def _predict_v1(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["model"] != self.name:
            return _json(404, {"error": f"model {request.match_info['model']} not found"})
        return await self._serve(request, _v1_request, _v1_answer)

    async def _infer_v2(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["model"] != self.name:
            return _json(404, {"error": f"Model {request.match_info['model']} not found"})
        return await self._serve(request, _v2_request, _v2_answer)

    async def _ready_v1(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.name:
            return _json(404, {"error": f"model {request.match_info['model']} not found"})
        return _json(200, {"name": self.name, "ready": True})

    async def _ready_v2(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.name:
            return _json(404, {"error": f"Model {request.match_info['model']} not found"})
        return web.Response(status=200)

    async def _serve(
        self, request: web.Request, read: _Reader, write: _Writer
    ) -> web.StreamResponse:
        self._count(request)
        self.in_flight.enter()
        try:
            try:
                received = json.loads(await request.read())
            except ValueError:
                return _json(400, {"error": "body is not JSON"})
            try:
                body = read(received)
            except ValueError as exc:
                return _json(400, {"error": str(exc)})
            return await self._answer(request, body, received, write)
        finally:
            self.in_flight.leave()

    async def _answer(
        self, request: web.Request, body: dict[str, Any], received: Any, write: _Writer
    ) -> web.StreamResponse:
        headers = {key.lower(): value for key, value in request.headers.items()}
        # `body` as the native request reads; `received` as it came, in its protocol.
        self.last_request = {"body": body, "received": received, "headers": headers}
        traceparent = headers.get("traceparent")
        if traceparent is not None and _sampled(traceparent):
            trace_log.info(
                "%s received traceparent %s (request %s)",
                self.name,
                traceparent,
                headers.get("x-request-id"),
            )
        size = body.get("resultSize", 10)
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_RESULTS:
            message = f"resultSize must be an integer from 1 to {MAX_RESULTS}"
            return _json(422, {"error": message})
        user_id = body.get("user_id")
        if user_id is not None and not isinstance(user_id, str):
            return _json(422, {"error": "user_id must be a string"})

        behaviour = self.behaviour
        delay = behaviour.delay_s(self._rng)
        if delay > 0 and not self._stopping:
            await self._sleep(delay)
        if behaviour.hang and not self._stopping:
            self.hangs += 1
            await self._unhang.wait()
        if behaviour.reset:
            return await self._reset_mid_answer(request)
        if behaviour.fail_first > 0:
            behaviour.fail_first -= 1
            return self._error(behaviour.error_status, "injected failure (fail_first)")
        if behaviour.status != 200:
            return self._error(behaviour.status, f"injected status {behaviour.status}")
        if behaviour.error_rate > 0 and self._rng.random() < behaviour.error_rate:
            return self._error(behaviour.error_status, "injected error")
        if behaviour.not_json:
            return web.Response(text="this is not json", content_type="text/plain")
        answer = {
            "items": self.world.ranking(self.name, user_id, size),
            "recommender": self.name,
            "user_id": user_id,
            "request_id": request.headers.get("X-Request-ID"),
        }
        return _json(200, write(answer, body, self.name))

    def _error(self, status: int, message: str) -> web.Response:
        self.errors += 1
        response = _json(status, {"error": message})
        retry_after = self.behaviour.retry_after_s
        if retry_after is not None:
            # Whole seconds as HTTP wants them; a fraction is sent as written (lenient clients).
            text = str(int(retry_after)) if float(retry_after).is_integer() else str(retry_after)
            response.headers["Retry-After"] = text
        return response

    async def _reset_mid_answer(self, request: web.Request) -> web.StreamResponse:
        """Announce a JSON body, send a piece of it, then reset the connection."""
        self.resets += 1
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 4096
        await response.prepare(request)
        await response.write(b'{"items": [{"id": "i1", ')
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # Linger 0: close with a RST, not a FIN, as a crashed server's kernel would.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return response

    async def _stats(self, request: web.Request) -> web.Response:
        return _json(200, self.stats())

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return _json(200, self.stats())

    async def _get_behaviour(self, request: web.Request) -> web.Response:
        return _json(200, self.behaviour.as_dict())

    async def _put_behaviour(self, request: web.Request) -> web.Response:
        try:
            changes = json.loads(await request.read())
        except ValueError:
            return _json(400, {"error": "body is not JSON"})
        if not isinstance(changes, dict):
            return _json(400, {"error": "body must be a JSON object"})
        try:
            self.change(changes)
        except ValueError as exc:
            return _json(422, {"error": str(exc)})
        return _json(200, self.behaviour.as_dict())


async def start_site(
    recommender: Recommender, host: str, port: int, access_log: bool = False
) -> tuple[web.AppRunner, int]:
    """Serve `recommender` on `host:port` (0: any free port); returns the runner and the port."""
    runner = web.AppRunner(
        recommender.application(),
        access_log=access_logger if access_log else None,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
    await site.start()
    return runner, int(runner.addresses[0][1])

"""The mock recommender HTTP service, and `MockFleet`, which runs several in one thread.

Endpoints of each recommender:

- ``POST /test``: the ranked list for the body's `user_id` and `resultSize`;
- ``GET /stats``, ``POST /stats/reset``: requests served and TCP connections seen;
- ``GET /admin/behaviour``, ``PUT /admin/behaviour``: read or change the behaviour.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from aiohttp.log import access_logger

from mock_recommenders.behaviour import Behaviour
from mock_recommenders.ranking import rank_items

__all__ = ["DEFAULT_NAMES", "MockFleet", "Recommender", "default_port"]

DEFAULT_NAMES = ("sml", "asc", "trd", "psn")
DEFAULT_BASE_PORT = 5001
# Above the gateway client's keep-alive (4 s by default), so the gateway, not the mock, closes
# idle connections: aiohttp never retries a POST on a connection the server just closed.
KEEPALIVE_TIMEOUT_S = 75.0


def default_port(name: str, base_port: int = DEFAULT_BASE_PORT) -> int | None:
    """The standard port of a standard recommender name, else None."""
    return base_port + DEFAULT_NAMES.index(name) if name in DEFAULT_NAMES else None


def _json(status: int, body: Any) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


class Recommender:
    """One mock recommender: its behaviour, its counters, and its aiohttp application."""

    def __init__(self, name: str, behaviour: Behaviour | None = None, seed: int | None = None):
        self.name = name
        self.behaviour = behaviour.copy() if behaviour is not None else Behaviour()
        self.requests = 0
        self.connections = 0
        self.errors = 0
        self.resets = 0
        self.hangs = 0
        self.last_request: dict[str, Any] | None = None
        self._seen: weakref.WeakSet[object] = weakref.WeakSet()
        self._rng = random.Random(seed)
        # Set when the service stops, so a hanging call ends instead of holding shutdown.
        self.stopping = asyncio.Event()

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
        self._count(request)
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return _json(400, {"error": "body is not JSON"})
        if not isinstance(body, dict):
            return _json(400, {"error": "body must be a JSON object"})
        headers = {key.lower(): value for key, value in request.headers.items()}
        self.last_request = {"body": body, "headers": headers}
        size = body.get("resultSize", 10)
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 100:
            return _json(422, {"error": "resultSize must be an integer from 1 to 100"})
        user_id = body.get("user_id")
        if user_id is not None and not isinstance(user_id, str):
            return _json(422, {"error": "user_id must be a string"})

        behaviour = self.behaviour
        delay = behaviour.delay_s(self._rng)
        if delay > 0:
            await asyncio.sleep(delay)
        if behaviour.hang:
            self.hangs += 1
            await self.stopping.wait()
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
        return _json(
            200,
            {
                "items": rank_items(self.name, user_id, size),
                "recommender": self.name,
                "user_id": user_id,
                "request_id": request.headers.get("X-Request-ID"),
            },
        )

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
            self.behaviour.update(changes)
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


class MockFleet:
    """Runs several mock recommenders on one event loop in a background thread."""

    def __init__(
        self,
        names: Sequence[str] = DEFAULT_NAMES,
        host: str = "127.0.0.1",
        ports: Sequence[int] | None = None,
        behaviour: Behaviour | None = None,
        seed: int | None = None,
    ):
        self.host = host
        # Per-recommender seeds derived from one, so injected faults repeat run after run.
        self._seed = seed
        self._initial = behaviour.copy() if behaviour is not None else Behaviour()
        self._names = list(names)
        self._requested_ports = list(ports) if ports is not None else [0] * len(self._names)
        if len(self._requested_ports) != len(self._names):
            raise ValueError("give one port per recommender name")
        self._recommenders: dict[str, Recommender] = {}
        self._ports: dict[str, int] = {}
        self._runners: list[web.AppRunner] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MockFleet:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> MockFleet:
        """Bind every recommender and return once all listen."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="mock-fleet", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), loop).result(10)
        return self

    async def _start(self) -> None:
        for i, (name, port) in enumerate(zip(self._names, self._requested_ports, strict=True)):
            seed = None if self._seed is None else self._seed + i
            recommender = Recommender(name, self._initial, seed)
            runner, bound = await start_site(recommender, self.host, port)
            self._recommenders[name] = recommender
            self._ports[name] = bound
            self._runners.append(runner)

    async def _stop(self) -> None:
        for recommender in self._recommenders.values():
            recommender.stopping.set()
        for runner in self._runners:
            await runner.cleanup()

    def stop(self) -> None:
        """Release hanging calls, close everything and join the thread; idempotent."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

    def url(self, name: str) -> str:
        """The recommender's endpoint URL."""
        return f"http://{self.host}:{self._ports[name]}/test"

    def port(self, name: str) -> int:
        """The port the recommender listens on."""
        return self._ports[name]

    def behaviour(self, name: str) -> Behaviour:
        """The live behaviour object of `name`; changing it changes the running mock."""
        return self._recommenders[name].behaviour

    def set_behaviour(self, name: str | None = None, **changes: Any) -> None:
        """Change the behaviour of `name`, or of every recommender when `name` is None."""
        for recommender in self._select(name):
            recommender.behaviour.update(changes)

    def stats(self, name: str) -> dict[str, Any]:
        """The counters of `name`, as ``GET /stats`` gives them."""
        return self._recommenders[name].stats()

    def last_request(self, name: str) -> dict[str, Any] | None:
        """The body and lower-cased headers of the last ``POST /test`` that `name` received."""
        return self._recommenders[name].last_request

    def reset(self) -> None:
        """Zero every counter and restore every behaviour to the fleet's initial one."""
        for recommender in self._recommenders.values():
            recommender.reset_stats()
            recommender.behaviour.update(self._initial.as_dict())

    def _select(self, name: str | None) -> list[Recommender]:
        return list(self._recommenders.values()) if name is None else [self._recommenders[name]]

"""`MockFleet`: several mock recommenders on one event loop in a background thread.

Made for test suites: start it, point the code under test at `url(name)`, change behaviours and
read counters from the test's own thread, stop it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from aiohttp import web

from mock_recommenders.behaviour import Behaviour
from mock_recommenders.server import DEFAULT_NAMES, InFlight, Recommender, start_site
from mock_recommenders.world import DEFAULT_SEED, default_world

__all__ = ["MockFleet"]

T = TypeVar("T")


class MockFleet:
    """Runs several mock recommenders on one event loop in a background thread."""

    def __init__(
        self,
        names: Sequence[str] = DEFAULT_NAMES,
        host: str = "127.0.0.1",
        ports: Sequence[int] | None = None,
        behaviour: Behaviour | None = None,
        seed: int | None = None,
        world_seed: int = DEFAULT_SEED,
    ) -> None:
        self.host = host
        self.world = default_world(world_seed)
        # Per-recommender seeds derived from one, so injected faults repeat run after run.
        self._seed = seed
        self._initial = behaviour.copy() if behaviour is not None else Behaviour()
        self._names = list(names)
        self._requested_ports = list(ports) if ports is not None else [0] * len(self._names)
        if len(self._requested_ports) != len(self._names):
            raise ValueError("give one port per recommender name")
        self._recommenders: dict[str, Recommender] = {}
        self._in_flight = InFlight()
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
        if self._loop is not None:
            raise RuntimeError("this MockFleet is already running")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="mock-fleet", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), loop).result(10)
        except BaseException:
            # A port already taken must not leave the others bound and the thread running.
            self.stop()
            raise
        return self

    async def _start(self) -> None:
        for i, (name, port) in enumerate(zip(self._names, self._requested_ports, strict=True)):
            seed = None if self._seed is None else self._seed + i
            recommender = Recommender(name, self._initial, seed, self.world, self._in_flight)
            runner, bound = await start_site(recommender, self.host, port)
            self._recommenders[name] = recommender
            self._ports[name] = bound
            self._runners.append(runner)

    async def _stop(self) -> None:
        for recommender in self._recommenders.values():
            recommender.stop()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

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
        """Change the behaviour of `name`, or of every recommender when `name` is None.

        Switching `hang` off releases the calls hanging now; a bad change is `ValueError`.
        """

        def change() -> None:
            for recommender in self._select(name):
                recommender.change(changes)

        self._on_loop(change)

    def stats(self, name: str) -> dict[str, Any]:
        """The counters of `name`, as ``GET /stats`` gives them."""
        return self._recommenders[name].stats()

    def last_request(self, name: str) -> dict[str, Any] | None:
        """The body and lower-cased headers of the last ``POST /test`` that `name` received."""
        return self._recommenders[name].last_request

    def peak_in_flight(self) -> int:
        """The most calls, to all of the fleet's recommenders together, under way at once.

        Counted since the fleet started or was last reset: 1 when a caller called them one
        after another, their number when it called them all at once.
        """
        return self._in_flight.peak

    def reset(self) -> None:
        """Zero every counter and restore every behaviour to the fleet's initial one."""

        def reset() -> None:
            for recommender in self._recommenders.values():
                recommender.reset_stats()
                recommender.change(self._initial.as_dict())
            self._in_flight.reset()

        self._on_loop(reset)

    def _on_loop(self, function: Callable[[], T]) -> T:
        # The recommenders' state belongs to their loop: a released hang wakes a task there.
        loop = self._loop
        if loop is None:
            raise RuntimeError("this MockFleet is not running")

        async def call() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(10)

    def _select(self, name: str | None) -> list[Recommender]:
        return list(self._recommenders.values()) if name is None else [self._recommenders[name]]

"""Fixtures: the real mock recommenders and the real app on loopback ports the system picks.

`serve` serves an app as users run it, on the ASGI stack (uvicorn, the gateway's HTTP edge,
Flask in a greenlet portal on the serving loop), in a thread of the test process;
`serve_wsgi` serves it the other way, as WSGI with a loop thread (`gateway.wsgi` under a WSGI
server). Helpers that test modules import live in `tests/helpers.py`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import pytest
from werkzeug.serving import BaseWSGIServer, make_server

from gateway.web.app import GatewayFlask, create_app
from mock_recommenders import DEFAULT_NAMES, MockFleet, MockFleetProcess
from tests.helpers import InProcessServer, ScriptedNetwork, Serve, scripted_network, settings_for

# How long a test's server waits for its requests still in flight before it closes the app.
DRAIN_S = 30.0


@pytest.fixture
async def network() -> AsyncIterator[ScriptedNetwork]:
    """The recommenders' network faked by aioresponses, for unit tests of the client."""
    async with scripted_network() as scripted:
        yield scripted


@pytest.fixture
def fleet() -> Iterator[MockFleet]:
    """The four mock recommenders, in this process, fresh for this test.

    A fleet of its own (starting one takes ~2 ms): no call left over from another test can
    reach it and be counted.
    """
    with MockFleet(DEFAULT_NAMES) as fleet:
        yield fleet


@pytest.fixture(scope="session")
def fleet_process_session() -> Iterator[MockFleetProcess]:
    """The four mocks in a child process, for the whole run (it takes ~1 s to start)."""
    with MockFleetProcess(DEFAULT_NAMES) as fleet:
        yield fleet


@pytest.fixture
def fleet_process(fleet_process_session: MockFleetProcess) -> MockFleetProcess:
    """The mocks in their own process, behaviour and counters reset: for tests under load.

    Only gunicorn-served gateways use it, and a gunicorn is stopped gracefully (its requests
    finished) before the next test resets the counters.
    """
    fleet_process_session.reset()
    return fleet_process_session


class _Draining:
    """WSGI middleware that counts the requests inside the app, so a test can wait for them."""

    def __init__(self, app: GatewayFlask):
        self.app = app
        self._in_flight = 0
        self._idle = threading.Condition()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        with self._idle:
            self._in_flight += 1
        try:
            result = self.app(environ, start_response)
            try:
                return list(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is inside the app; False if some still are after `timeout_s`."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout_s)


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Serve an app on the ASGI stack on a loopback port the system picks; returns its base URL.

    At the end of the test uvicorn stops accepting, lets the requests still in flight finish
    (a failed test can leave some), and the ASGI lifespan closes the app's runtime.
    """
    servers: list[InProcessServer] = []

    def start(app: GatewayFlask) -> str:
        server = InProcessServer(app).start()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def serve_wsgi() -> Iterator[Serve]:
    """Serve an app as WSGI (werkzeug, a thread per request, views on the loop thread).

    At the end of the test the server stops accepting, waits for the requests still inside the
    app, then closes the app's runtime.
    """
    servers: list[tuple[BaseWSGIServer, threading.Thread, _Draining]] = []

    def start(app: GatewayFlask) -> str:
        draining = _Draining(app)
        server = make_server("127.0.0.1", 0, draining, threaded=True)  # daemon threads
        # Polled every 5 ms for the shutdown at the end of the test, which waits for the poll.
        thread = threading.Thread(target=server.serve_forever, args=(0.005,), daemon=True)
        thread.start()
        servers.append((server, thread, draining))
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server, thread, draining in servers:
        server.shutdown()
        thread.join(5)
        drained = draining.wait_idle(DRAIN_S)
        server.server_close()
        draining.app.runtime.close()
        assert drained, f"requests still in the app {DRAIN_S:.0f} s after the test"


@pytest.fixture
def gateway_url(fleet: MockFleet, serve: Serve) -> str:
    """The gateway with default settings, in front of the four mocks, over real HTTP."""
    return serve(create_app(settings_for(fleet)))


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No `GATEWAY_*` variable from the calling shell leaks into the test."""
    for variable in list(os.environ):
        if variable.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(variable)
    return monkeypatch

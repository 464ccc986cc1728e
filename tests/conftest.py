"""Shared fixtures: the real mock recommenders and the real app on free loopback ports.

Also holds the aioresponses shim for aiohttp 3.14 (see `CompatClientResponse`).
"""

from __future__ import annotations

import inspect
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses
from werkzeug.serving import BaseWSGIServer, make_server

from gateway import GatewayFlask, Settings, create_app

if TYPE_CHECKING:
    from mock_recommenders import MockFleet

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("sml", "asc", "trd", "psn")


class _FinishedUpload:
    """Stands in for the request's stream writer: the (fake) upload is already complete."""

    output_size = 0


class CompatClientResponse(aiohttp.ClientResponse):
    """A `ClientResponse` that aioresponses 0.7.9 can build under aiohttp 3.14.

    aiohttp 3.14 (a security release, which we keep) made `stream_writer` a required keyword
    of `ClientResponse.__init__`, and aioresponses 0.7.9, the newest release, does not pass it:
    ``ClientResponse.__init__() missing 1 required keyword-only argument: 'stream_writer'``
    (upstream issue pnuckowski/aioresponses#289, fix in PR #288, not released). Remove this
    shim once aioresponses releases that fix.
    """

    def __init__(self, *args: Any, stream_writer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, stream_writer=stream_writer or _FinishedUpload(), **kwargs)


def _compat_callback(callback: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """Wrap an aioresponses callback so the `CallbackResult` it returns uses the shim."""

    async def compat(url: Any, **kwargs: Any) -> Any:
        result = callback(url, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, CallbackResult) and result.response_class is None:
            result.response_class = CompatClientResponse
        return result

    return compat


class CompatAioresponses(aioresponses):  # type: ignore[misc]
    """aioresponses whose every fake response, callbacks' included, is a `CompatClientResponse`."""

    def add(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("response_class", CompatClientResponse)
        if kwargs.get("callback") is not None:
            kwargs["callback"] = _compat_callback(kwargs["callback"])
        super().add(*args, **kwargs)


@pytest.fixture
def fake_network() -> Iterator[CompatAioresponses]:
    """Fake aiohttp's network for unit tests of single functions."""
    with CompatAioresponses() as mocked:
        yield mocked


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def fleet_session() -> Iterator[MockFleet]:
    """The four mock recommenders, on free ports, for the whole run."""
    from mock_recommenders import MockFleet

    with MockFleet(NAMES) as fleet:
        yield fleet


@pytest.fixture
def fleet(fleet_session: MockFleet) -> MockFleet:
    """The mock recommenders, with their behaviour and counters reset for this test."""
    fleet_session.reset()
    return fleet_session


def settings_for(fleet: MockFleet, names: tuple[str, ...] = NAMES, **fields: Any) -> Settings:
    """Settings that point the gateway at `fleet`'s recommenders (`weights={name: w}` too)."""
    fields.setdefault("deadline_ms", 1000)
    timeout_ms = fields.pop("timeout_ms", None)
    weights = fields.pop("weights", {})
    recommenders = [
        {"name": name, "url": fleet.url(name), "timeout_ms": timeout_ms}
        | ({"weight": weights[name]} if name in weights else {})
        for name in names
    ]
    return Settings.model_validate({"recommenders": recommenders, **fields})


@pytest.fixture
def serve() -> Iterator[Callable[[GatewayFlask], str]]:
    """Serve an app over real HTTP on a free loopback port; returns its base URL."""
    servers: list[tuple[BaseWSGIServer, threading.Thread, GatewayFlask]] = []

    def start(app: GatewayFlask) -> str:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        servers.append((server, thread, app))
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server, thread, app in servers:
        server.shutdown()
        thread.join(5)
        server.server_close()
        app.runtime.close()


@pytest.fixture
def gateway_url(fleet: MockFleet, serve: Callable[[GatewayFlask], str]) -> str:
    """The gateway with default settings, in front of the four mocks, over real HTTP."""
    return serve(create_app(settings_for(fleet)))


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No `GATEWAY_*` variable from the calling shell leaks into the test."""
    for variable in list(os.environ):
        if variable.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(variable)
    return monkeypatch

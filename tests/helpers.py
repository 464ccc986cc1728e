"""What the tests share: settings for a fleet, loopback ports, gunicorn, requests, logs, metrics.

Fixtures live in `conftest.py`; everything a test module imports from another lives here.

Ports are never probed and then bound: a server binds port 0 and the port is read back from it,
or the test binds a socket itself and hands it over (gunicorn's ``--bind fd://N``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import requests
import uvicorn
from aioresponses import aioresponses

from gateway.config.settings import PoolSettings, Settings
from gateway.recommenders import async_http
from gateway.serving.asgi_app import GatewayASGI
from gateway.serving.edge import protocol_for
from gateway.web.app import GatewayFlask
from mock_recommenders import DEFAULT_NAMES
from mock_recommenders.loopback import loopback_socket, port_of
from mock_recommenders.process import stop_process

__all__ = [
    "GUNICORN",
    "ROOT",
    "Fleet",
    "Gunicorn",
    "InProcessServer",
    "ScriptedNetwork",
    "Serve",
    "assert_json_error",
    "closed_port",
    "gateway_environment",
    "gunicorn",
    "lines",
    "port_is_open",
    "post_concurrently",
    "recommend",
    "sample",
    "scripted_network",
    "settings_for",
    "until_every_worker_served",
    "wait_until",
]

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = str(Path(sys.executable).parent / "gunicorn")

Serve = Callable[[GatewayFlask], str]


class Fleet(Protocol):
    """What the tests use of a fleet of mocks, in this process (`MockFleet`) or another."""

    def url(self, name: str) -> str: ...

    def set_behaviour(self, name: str | None = None, **changes: Any) -> None: ...

    def stats(self, name: str) -> dict[str, Any]: ...


# --- Settings -------------------------------------------------------------------------------


def settings_for(fleet: Fleet, names: tuple[str, ...] = DEFAULT_NAMES, **fields: Any) -> Settings:
    """Settings that point the gateway at `fleet`'s recommenders (`weights={name: w}` too).

    Admission is fixed at `max_in_flight` unless a test gives `admission`: on a busy machine the
    adaptive limit follows the loop's lag down, and would shed requests a test of something
    else expects served (tests/resilience/test_admission.py tests it).
    """
    fields.setdefault("deadline_ms", 1000)
    fields.setdefault("admission", {"adaptive": False})
    timeout_ms = fields.pop("timeout_ms", None)
    weights = fields.pop("weights", {})
    recommenders = [
        {"name": name, "url": fleet.url(name), "timeout_ms": timeout_ms}
        | ({"weight": weights[name]} if name in weights else {})
        for name in names
    ]
    return Settings.model_validate({"recommenders": recommenders, **fields})


def gateway_environment(fleet: Fleet, **overrides: str) -> dict[str, str]:
    """This process's environment without `GATEWAY_*`, pointing a gateway at `fleet`.

    Admission is fixed at `max_in_flight` unless overridden, as in `settings_for`.
    """
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    recommenders = [{"name": name, "url": fleet.url(name)} for name in DEFAULT_NAMES]
    env["GATEWAY_RECOMMENDERS"] = json.dumps(recommenders)
    env["GATEWAY_ADMISSION__ADAPTIVE"] = "false"
    env.update(overrides)
    return env


# --- Ports ----------------------------------------------------------------------------------


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port where nothing listens, held so that nothing can start to.

    Bound and not listening: a connection to it is refused at once, and the system never hands
    it out as the source port of another connection (which could loop back onto itself).
    """
    with loopback_socket() as sock:
        yield port_of(sock)


def port_is_open(port: int) -> bool:
    """Whether something accepts connections on the loopback `port`."""
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) != 0:
            return False
        try:
            peer = sock.getpeername()
        except OSError:
            # Reset as soon as it was made (ENOTCONN): it sat in the backlog of a listener that
            # has just closed, so nothing accepts connections there any more.
            return False
        # A connection to a free port can meet itself (a TCP simultaneous open) when the system
        # picks that same port as its source: then nothing listens there.
        return bool(sock.getsockname() != peer)


# --- Serving in this process ----------------------------------------------------------------


class InProcessServer:
    """The gateway as gunicorn's uvicorn worker serves it, in a thread of this process.

    uvicorn with uvloop and the gateway's HTTP edge (`gateway.serving.edge`), the app as ASGI
    (`gateway.serving.asgi_app`), on a socket bound here to port 0.
    """

    def __init__(self, app: GatewayFlask, loop: str = "uvloop"):
        self.app = app
        self.asgi = GatewayASGI(app)
        self._socket = loopback_socket()
        self.url = f"http://127.0.0.1:{port_of(self._socket)}"
        config = uvicorn.Config(
            self.asgi,
            loop=loop,
            http=protocol_for(app.runtime.settings.http),
            ws="none",
            lifespan="on",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, name="gateway-server"
        )

    def start(self) -> InProcessServer:
        """Start serving; return once uvicorn has run the lifespan startup and listens."""
        self.thread.start()
        wait_until(
            lambda: self.server.started or not self.thread.is_alive(),
            60,
            "uvicorn did not start",
        )
        assert self.server.started, "uvicorn stopped at start-up (see the log above)"
        return self

    def stop(self) -> None:
        """Stop as on SIGTERM: in-flight requests finish, then the lifespan closes the app."""
        self.server.should_exit = True
        self.thread.join(60)
        self._socket.close()
        assert not self.thread.is_alive(), "uvicorn did not stop within 60 s"


# --- gunicorn -------------------------------------------------------------------------------


class Gunicorn:
    """A running gunicorn: its URL, its process, and what it has logged."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path):
        self.url = url
        self.process = process
        self._log = log

    def output(self) -> str:
        """Everything the master and its workers have printed so far."""
        return self._log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, as a process manager stops it; returns the exit code."""
        return stop_process(self.process, timeout_s=60)


@contextlib.contextmanager
def gunicorn(
    fleet: Fleet, *args: str, app: str = "gateway.asgi:app", **overrides: str
) -> Iterator[Gunicorn]:
    """The gateway under real gunicorn in front of `fleet`, as `make run` serves it.

    The port is bound here and handed to gunicorn (``--bind fd://N``), so no other process can
    take it between choosing and binding. `overrides` are ``GATEWAY_*`` variables.
    """
    log = Path(tempfile.mkstemp(prefix="gunicorn-", suffix=".log")[1])
    with loopback_socket() as listener:
        port = port_of(listener)
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [GUNICORN, "-c", "gunicorn.conf.py", app]
                + ["--bind", f"fd://{listener.fileno()}", *args],
                cwd=ROOT,
                env=gateway_environment(fleet, **overrides),
                stdout=sink,
                stderr=subprocess.STDOUT,
                pass_fds=(listener.fileno(),),
            )
    server = Gunicorn(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_until(
            lambda: _ready(server),
            60,
            lambda: f"gunicorn did not become ready:\n{server.output()[-3000:]}",
        )
        yield server
    finally:
        server.stop()
        log.unlink()


def _ready(server: Gunicorn) -> bool:
    assert server.process.poll() is None, server.output()
    try:
        return requests.get(f"{server.url}/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


async def until_every_worker_served(
    server: Gunicorn, batch: Callable[[], Awaitable[None]], workers: int = 2, rounds: int = 20
) -> int:
    """Run `batch` (requests at once) until each of the `workers` has served a recommendation.

    Which worker accepts a connection is the kernel's choice; on a busy machine one worker can
    take a whole batch. Returns how many batches it took.
    """
    for done in range(1, rounds + 1):
        await batch()
        pids = {
            r["process"]
            for r in lines(server.output())
            if r["message"] == "request" and r["path"] == "/recommendation"
        }
        if len(pids) >= workers:
            return done
    raise AssertionError(f"after {rounds} batches, only workers {pids} served")


# --- Requests -------------------------------------------------------------------------------


def recommend(base_url: str, body: Any = None, **kwargs: Any) -> requests.Response:
    """``POST /recommendation`` with `body` as JSON (or `data=` raw), waiting up to 30 s."""
    if body is not None:
        kwargs["json"] = body
    kwargs.setdefault("timeout", 30)
    return requests.post(f"{base_url}/recommendation", **kwargs)


async def post_concurrently(
    base_url: str,
    bodies: Sequence[dict[str, Any]],
    headers: Sequence[dict[str, str]] | None = None,
) -> list[tuple[int, Any]]:
    """Send every body at once, each on its own connection; (status, JSON body) in order."""

    async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, Any]:
        sent = headers[i] if headers is not None else {}
        async with session.post(
            f"{base_url}/recommendation", json=bodies[i], headers=sent
        ) as response:
            return response.status, await response.json()

    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return list(await asyncio.gather(*(one(session, i) for i in range(len(bodies)))))


def assert_json_error(response: requests.Response, status: int, *phrases: str) -> dict[str, Any]:
    """The response is the gateway's JSON error with `status`, its message holding `phrases`."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["error"]["status"] == status
    for phrase in phrases:
        assert phrase in body["error"]["message"]
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert "Traceback" not in response.text
    assert ".py" not in response.text
    return body


def wait_until(
    condition: Callable[[], bool], timeout_s: float, message: str | Callable[[], str]
) -> None:
    """Poll `condition` until it holds; fail with `message` after `timeout_s`."""
    give_up = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(0.02)


# --- Logs and metrics -----------------------------------------------------------------------


def lines(text: str) -> list[dict[str, Any]]:
    """The JSON log records in `text` (gunicorn's own lines are not JSON)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if found == labels:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- The recommenders' network, faked with aioresponses --------------------------------------


class _Sent:
    """The writer of a request already sent, as aiohttp 3.14's `ClientResponse` asks for it."""

    output_size = 0


class _ScriptedAnswer(aiohttp.ClientResponse):
    """aioresponses' answer, made as aiohttp 3.14 requires: aioresponses 0.7.9 does not pass
    `stream_writer` (pnuckowski/aioresponses#289, open)."""

    def __init__(self, method: str, url: Any, **fields: Any) -> None:
        fields.setdefault("stream_writer", _Sent())
        super().__init__(method, url, **fields)


class ScriptedNetwork:
    """The recommenders' network faked by aioresponses, for unit tests of single functions.

    `session` is the gateway's own aiohttp session (`gateway.recommenders.async_http.open_session`),
    whose calls aioresponses answers without a socket: each URL answers what `add` scripted for it,
    in order; `calls` records what was sent. An unscripted call fails as a refused one would.
    """

    def __init__(self, mocked: aioresponses, session: aiohttp.ClientSession) -> None:
        self.mocked = mocked
        self.session = session
        self.calls: list[tuple[str, bytes, dict[str, str]]] = []

    def add(
        self,
        url: str,
        status: int = 200,
        payload: Any = None,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        error: BaseException | None = None,
        delay_s: float = 0.0,
    ) -> None:
        """Script the next answer of `url`: JSON `payload` or raw `body`, or raise `error`."""
        if payload is not None:
            body = json.dumps(payload).encode()

        async def answer(called: Any, **request: Any) -> None:
            self.calls.append((str(called), request["data"], dict(request["headers"])))
            if delay_s:
                await asyncio.sleep(delay_s)

        self.mocked.post(
            url,
            status=status,
            body=body,
            headers={"Content-Length": str(len(body)), **(headers or {})},
            exception=error,
            callback=answer,
            response_class=_ScriptedAnswer,
        )

    async def close(self) -> None:
        """Close the session: calls after this are refused."""
        await self.session.close()


@contextlib.asynccontextmanager
async def scripted_network() -> AsyncIterator[ScriptedNetwork]:
    """A `ScriptedNetwork` over a session made with the default pool settings."""
    with aioresponses() as mocked:
        session = async_http.open_session(PoolSettings(), "fusion-gateway/test")
        try:
            yield ScriptedNetwork(mocked, session)
        finally:
            await session.close()

"""Reloading the config with SIGHUP under gunicorn, while 20 keep-alive clients post requests.

A bad file is refused by the master before any worker is stopped: the same workers serve on,
and the error in the log names the field. A good file replaces the workers, and the new
setting shows in the answers. Either way, no request fails. The deadline is long: these tests
check what is answered, not how fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import yaml

from mock_recommenders import DEFAULT_NAMES, MockFleetProcess
from tests.helpers import Fleet, Gunicorn, gunicorn, lines, sample, wait_until

pytestmark = pytest.mark.slow

CONNECTIONS = 20


def write_config(path: Path, fleet: Fleet, **fields: Any) -> None:
    """A config file for `fleet`, with a long deadline, and `fields` over it."""
    recommenders = [{"name": name, "url": fleet.url(name)} for name in DEFAULT_NAMES]
    path.write_text(yaml.safe_dump({"recommenders": recommenders, "deadline_ms": 20000} | fields))


@dataclass
class Result:
    """What one request of the load got: its status and fusion, or the error it met."""

    sent_at: float
    status: int | None = None
    fusion: str | None = None
    error: str | None = None


class Load:
    """`CONNECTIONS` keep-alive clients, each posting /recommendation in a loop, in a thread."""

    def __init__(self, url: str):
        self.url = url
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._clients: asyncio.Future[Any] | None = None
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._run(),), name="load"
        )

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, failed: type[BaseException] | None, *exc_info: object) -> None:
        # Each client stops after its current request; when the test failed, at once.
        self._stop.set()
        if failed is not None and self._clients is not None:
            self._loop.call_soon_threadsafe(self._clients.cancel)
        self._thread.join(120)
        assert not self._thread.is_alive(), "the load did not stop"
        self._loop.close()

    def answered(self) -> int:
        """How many requests have been answered so far."""
        return len(self.results)

    def wait_for(self, more: int, timeout_s: float = 120) -> None:
        """Wait until `more` requests beyond those answered now have been answered."""
        target = self.answered() + more
        wait_until(lambda: self.answered() >= target, timeout_s, "the load stopped moving")

    async def _run(self) -> None:
        # One connection per client, kept alive from request to request.
        connector = aiohttp.TCPConnector(limit=CONNECTIONS)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            self._clients = asyncio.gather(*(self._client(session, i) for i in range(CONNECTIONS)))
            with contextlib.suppress(asyncio.CancelledError):
                await self._clients

    async def _client(self, session: aiohttp.ClientSession, client: int) -> None:
        sent = 0
        while not self._stop.is_set():
            result = Result(sent_at=time.monotonic())
            body = {"user_id": f"load-{client}-{sent}", "resultSize": 3}
            try:
                async with session.post(f"{self.url}/recommendation", json=body) as response:
                    result.status = response.status
                    result.fusion = (await response.json()).get("fusion")
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.error = f"{type(exc).__name__}: {exc}"
            self.results.append(result)
            sent += 1


def booted(server: Gunicorn) -> list[int]:
    """The pids of every worker the master has started, in order."""
    return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", server.output())]


def served_by(server: Gunicorn, since: int = 0) -> set[int]:
    """The workers that logged a /recommendation, among the log's records from `since` on."""
    records = lines(server.output())[since:]
    return {r["process"] for r in records if r.get("path") == "/recommendation"}


def gone(pids: list[int]) -> Callable[[], bool]:
    """A condition: none of `pids` is a live process (the master has reaped them)."""

    def check() -> bool:
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return False
        return True

    return check


def assert_no_failures(results: list[Result]) -> None:
    failures = [r for r in results if r.status != 200]
    assert not failures, f"{len(failures)} of {len(results)} failed, first: {failures[:5]}"


def test_a_bad_file_is_refused_and_the_workers_serve_on(
    fleet_process: MockFleetProcess, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    write_config(config, fleet_process)
    with gunicorn(fleet_process, "--workers", "2", GATEWAY_CONFIG=str(config)) as server:
        wait_until(lambda: len(booted(server)) == 2, 60, "the second worker did not boot")
        workers = booted(server)
        with Load(server.url) as load:
            load.wait_for(200)
            write_config(config, fleet_process, deadline_ms=-5)
            server.process.send_signal(signal.SIGHUP)
            wait_until(
                lambda: "config refused" in server.output(),
                60,
                lambda: f"the master did not refuse the file:\n{server.output()[-3000:]}",
            )
            since = len(lines(server.output()))
            load.wait_for(400)
        after_refusal = served_by(server, since)
        booted_after_refusal = booted(server)
        alive_after_refusal = not any(gone([pid])() for pid in workers)

        # Workers that die now are replaced from the settings the master validated last, not
        # from the file on disk, which no worker could load.
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(booted(server)) == 4, 60, "the dead workers were not replaced")
        since = len(lines(server.output()))
        with Load(server.url) as after_crash:
            wait_until(
                lambda: bool(served_by(server, since)),
                60,
                lambda: f"the replacements did not serve:\n{server.output()[-3000:]}",
            )
            after_crash.wait_for(200)
        after_crash_served_by = served_by(server, since)
        replacements = booted(server)[2:]
        output = server.output()

    assert_no_failures(load.results)
    assert {r.fusion for r in load.results} == {"rrf"}
    refusal = next(line for line in output.splitlines() if "config refused" in line)
    assert "workers keep serving the previous one" in refusal
    assert "deadline_ms: " in refusal  # named; the rest is pydantic's words
    assert str(config) in refusal
    # No worker was stopped or started by the reload: the same ones served on.
    assert booted_after_refusal == workers
    assert alive_after_refusal
    assert after_refusal and after_refusal <= set(workers)
    assert_no_failures(after_crash.results)
    assert {r.fusion for r in after_crash.results} == {"rrf"}
    assert after_crash_served_by and after_crash_served_by <= set(replacements)
    assert "Traceback" not in output


def test_a_good_file_replaces_the_workers_without_failing_a_request(
    fleet_process: MockFleetProcess, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    write_config(config, fleet_process, fusion="rrf")
    scratch = tmp_path / "tmp"  # where the master makes its metrics directory
    scratch.mkdir()
    overrides = {"GATEWAY_CONFIG": str(config), "TMPDIR": str(scratch)}
    with gunicorn(fleet_process, "--workers", "2", **overrides) as server:
        wait_until(lambda: len(booted(server)) == 2, 60, "the second worker did not boot")
        old = booted(server)
        with Load(server.url) as load:
            load.wait_for(200)
            # The old workers' counts are in their metric files when the reload comes.
            answered_before = load.answered()
            wait_until(
                lambda: requests_counted(server) >= answered_before,
                30,
                "the workers did not write their metrics",
            )
            write_config(config, fleet_process, fusion="combmnz")
            server.process.send_signal(signal.SIGHUP)
            # gunicorn starts two new workers, then stops the old ones, which finish what they
            # serve and drain their idle connections.
            wait_until(
                gone(old),
                120,
                lambda: f"the old workers did not stop:\n{server.output()[-3000:]}",
            )
            replaced_at = time.monotonic()
            since = len(lines(server.output()))
            load.wait_for(400)
        new = booted(server)[2:]
        after_reload = served_by(server, since)
        answered = sum(r.status == 200 for r in load.results)
        # Every answer is counted in the metrics, the old workers' too: the reload left the
        # metrics directory as it was.
        wait_until(
            lambda: answered == requests_counted(server),
            30,
            lambda: f"{requests_counted(server)} requests counted, {answered} answered",
        )
        assert len(list(scratch.glob("gateway-metrics-*"))) == 1
        output = server.output()

    assert_no_failures(load.results)
    assert "gateway: config accepted from" in output
    assert list(scratch.glob("gateway-metrics-*")) == []  # removed at exit, reloads or not
    assert len(new) == 2
    assert after_reload <= set(new)
    assert {r.fusion for r in load.results if r.sent_at > replaced_at} == {"combmnz"}
    assert {r.fusion for r in load.results} == {"rrf", "combmnz"}
    assert "Traceback" not in output


def requests_counted(server: Gunicorn) -> int:
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    return int(sample(text, "gateway_requests_total", route="/recommendation", status="200"))

"""End-to-end: the gateway under real gunicorn with two workers, as `make run` serves it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import requests

from mock_recommenders import MockFleet
from mock_recommenders.ranking import rank_items
from tests.conftest import NAMES, ROOT, free_port

GUNICORN = str(Path(sys.executable).parent / "gunicorn")


def gateway_environment(fleet: MockFleet, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    recommenders = [{"name": name, "url": fleet.url(name)} for name in NAMES]
    env["GATEWAY_RECOMMENDERS"] = json.dumps(recommenders)
    env.update(overrides)
    return env


class Gunicorn:
    """A running gunicorn: its URL, its process, and what it has logged."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path):
        self.url = url
        self.process = process
        self._log = log

    def output(self) -> str:
        return self._log.read_text()

    def stop(self) -> int:
        """SIGTERM, as a process manager stops it; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@contextmanager
def gunicorn(fleet: MockFleet, *args: str, **overrides: str) -> Iterator[Gunicorn]:
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="gunicorn-", suffix=".log")[1])
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [GUNICORN, "-c", "gunicorn.conf.py", "gateway.wsgi:app"]
            + ["--bind", f"127.0.0.1:{port}", *args],
            cwd=ROOT,
            env=gateway_environment(fleet, **overrides),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = Gunicorn(f"http://127.0.0.1:{port}", process, log)
    url = server.url
    try:
        give_up = time.monotonic() + 30
        while True:
            assert process.poll() is None, server.output()
            try:
                if requests.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < give_up, "gunicorn did not become ready"
            time.sleep(0.1)
        yield server
    finally:
        server.stop()
        log.unlink()


async def concurrent_requests(url: str, count: int) -> list[tuple[int, dict[str, Any]]]:
    async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, dict[str, Any]]:
        body = {"user_id": f"g-{i}", "resultSize": 1 + i % 7}
        async with session.post(f"{url}/recommendation", json=body) as response:
            assert response.status == 200
            return i, await response.json()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*(one(session, i) for i in range(count)))


def assert_own_data(answers: list[tuple[int, dict[str, Any]]]) -> None:
    for i, body in answers:
        assert body["complete"] is True
        assert [entry["name"] for entry in body["result"]] == list(NAMES)
        for entry in body["result"]:
            assert entry["prediction"]["user_id"] == f"g-{i}"
            assert entry["prediction"]["items"] == rank_items(entry["name"], f"g-{i}", 1 + i % 7)


def test_two_workers_serve_150_concurrent_requests_each_its_own_data(
    fleet: MockFleet,
) -> None:
    fleet.set_behaviour(delay_ms=20, jitter_ms=20)
    with gunicorn(fleet, "--workers", "2") as server:
        answers = asyncio.run(concurrent_requests(server.url, 150))
        assert_own_data(answers)

        assert server.stop() == 0
        output = server.output()

    started = output.count("event loop and recommender session started")
    closed = output.count("recommender session closed")
    assert 1 <= started <= 2
    assert closed == started
    assert "Traceback" not in output


def test_a_preloaded_app_still_gets_a_loop_per_worker(fleet: MockFleet) -> None:
    with gunicorn(fleet, "--workers", "2", "--preload") as server:
        answers = asyncio.run(concurrent_requests(server.url, 40))

    assert_own_data(answers)


def test_an_invalid_config_stops_gunicorn_with_a_message_naming_the_field(
    fleet: MockFleet,
) -> None:
    result = subprocess.run(
        [
            GUNICORN,
            "-c",
            "gunicorn.conf.py",
            "gateway.wsgi:app",
            "--bind",
            f"127.0.0.1:{free_port()}",
        ],
        cwd=ROOT,
        env=gateway_environment(fleet, GATEWAY_DEADLINE_MS="-5"),
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 1
    assert "deadline_ms: Input should be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_command_line_workers_override_the_file(fleet: MockFleet) -> None:
    with gunicorn(fleet, "--workers", "1") as server:
        response = requests.post(f"{server.url}/recommendation", json={}, timeout=5)
        assert response.status_code == 200
        server.stop()
        output = server.output()

    assert output.count("Booting worker with pid") == 1


def test_sigterm_lets_in_flight_requests_finish_then_closes_the_sessions(
    fleet: MockFleet,
) -> None:
    fleet.set_behaviour(delay_ms=400)
    with gunicorn(fleet, "--workers", "2") as server:

        async def in_flight() -> list[tuple[int, dict[str, Any]]]:
            async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, dict[str, Any]]:
                body = {"user_id": f"t-{i}"}
                async with session.post(f"{server.url}/recommendation", json=body) as response:
                    return response.status, await response.json()

            async with aiohttp.ClientSession() as session:
                calls = [asyncio.create_task(one(session, i)) for i in range(10)]
                await asyncio.sleep(0.15)  # every request is now waiting on the mocks
                server.process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*calls)

        answers = asyncio.run(in_flight())
        exit_code = server.stop()
        output = server.output()

    assert [status for status, _ in answers] == [200] * 10
    assert all(body["complete"] for _, body in answers)
    assert exit_code == 0
    assert output.count("recommender session closed") == 2

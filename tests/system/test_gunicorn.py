"""End-to-end: the gateway under real gunicorn with two workers, as `make run` serves it.

The mocks run in a process of their own (`fleet_process`), as under `make run`: a load from
this process must not slow them down. Deadlines are long: these tests check what is answered,
not how fast.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from typing import Any

import aiohttp
import pytest
import requests

from mock_recommenders import DEFAULT_NAMES, MockFleetProcess
from mock_recommenders.ranking import rank_items
from tests.helpers import (
    GUNICORN,
    ROOT,
    Gunicorn,
    gateway_environment,
    gunicorn,
    lines,
    post_concurrently,
    wait_until,
)

pytestmark = pytest.mark.slow

LONG = {"GATEWAY_DEADLINE_MS": "20000"}


def bodies(count: int) -> list[dict[str, Any]]:
    return [{"user_id": f"g-{i}", "resultSize": 1 + i % 7} for i in range(count)]


def both_started(server: Gunicorn) -> None:
    """Wait until both workers have opened their session (a worker still booting has not)."""
    wait_until(
        lambda: server.output().count("recommender session started") == 2,
        60,
        lambda: f"the second worker did not start:\n{server.output()[-3000:]}",
    )


def assert_own_data(answers: list[tuple[int, Any]]) -> None:
    assert [status for status, _ in answers] == [200] * len(answers)
    for i, (_, body) in enumerate(answers):
        assert body["complete"] is True
        assert [entry["name"] for entry in body["result"]] == list(DEFAULT_NAMES)
        for entry in body["result"]:
            assert entry["prediction"]["user_id"] == f"g-{i}"
            assert entry["prediction"]["items"] == rank_items(entry["name"], f"g-{i}", 1 + i % 7)


def test_two_workers_serve_150_concurrent_requests_each_its_own_data(
    fleet_process: MockFleetProcess,
) -> None:
    fleet_process.set_behaviour(delay_ms=20, jitter_ms=20)
    with gunicorn(fleet_process, "--workers", "2", **LONG) as server:
        answers = asyncio.run(post_concurrently(server.url, bodies(150)))
        assert_own_data(answers)

        assert server.stop() == 0
        output = server.output()

    started = output.count("event loop and recommender session started")
    closed = output.count("recommender session closed")
    assert 1 <= started <= 2
    assert closed == started
    assert "Traceback" not in output


def test_a_preloaded_app_still_gets_a_loop_per_worker(fleet_process: MockFleetProcess) -> None:
    def started(output: str) -> set[int]:
        return {r["process"] for r in lines(output) if "session started" in r["message"]}

    with gunicorn(fleet_process, "--workers", "2", "--preload", **LONG) as server:
        answers = asyncio.run(post_concurrently(server.url, bodies(40)))
        # The first worker up can serve everything while the second still boots: wait for it.
        wait_until(
            lambda: len(started(server.output())) >= 2,
            60,
            lambda: f"only workers {started(server.output())} opened a session",
        )
        output = server.output()

    assert_own_data(answers)
    booted = {int(m) for m in re.findall(r"Booting worker with pid: (\d+)", output)}
    assert started(output) == booted  # one loop and session per worker, none in the master
    assert server.process.pid not in started(output)


def test_an_invalid_config_stops_gunicorn_with_a_message_naming_the_field(
    fleet_process: MockFleetProcess,
) -> None:
    # It stops before it binds anything: the address is never used.
    result = subprocess.run(
        [GUNICORN, "-c", "gunicorn.conf.py", "gateway.asgi:app", "--bind", "127.0.0.1:0"],
        cwd=ROOT,
        env=gateway_environment(fleet_process, GATEWAY_DEADLINE_MS="-5"),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert "invalid gateway config" in result.stderr
    assert "deadline_ms: " in result.stderr  # named; the rest is pydantic's words
    assert "Traceback" not in result.stderr


def test_command_line_workers_override_the_file(fleet_process: MockFleetProcess) -> None:
    with gunicorn(fleet_process, "--workers", "1", **LONG) as server:
        response = requests.post(f"{server.url}/recommendation", json={}, timeout=30)
        assert response.status_code == 200
        server.stop()
        output = server.output()

    assert output.count("Booting worker with pid") == 1


def test_sigterm_lets_in_flight_requests_finish_then_closes_the_sessions(
    fleet_process: MockFleetProcess,
) -> None:
    # Far longer than the SIGTERM takes to reach the workers, however busy the machine.
    fleet_process.set_behaviour(delay_ms=2000)
    with gunicorn(fleet_process, "--workers", "2", **LONG) as server:
        # Both workers up, each with its session, before the signal: one still booting when
        # it comes never opens one (and CI once saw just that).
        both_started(server)

        async def in_flight() -> list[tuple[int, Any]]:
            async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, Any]:
                body = {"user_id": f"t-{i}"}
                async with session.post(f"{server.url}/recommendation", json=body) as response:
                    return response.status, await response.json()

            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                calls = [asyncio.create_task(one(session, i)) for i in range(10)]
                # Every request is in, waiting on the mocks, when the signal comes.
                await asyncio.to_thread(
                    wait_until,
                    lambda: all(fleet_process.stats(n)["requests"] == 10 for n in DEFAULT_NAMES),
                    30,
                    "the requests did not all reach the mocks",
                )
                server.process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*calls)

        answers = asyncio.run(in_flight())
        exit_code = server.stop()
        output = server.output()

    assert [status for status, _ in answers] == [200] * 10
    assert all(body["complete"] for _, body in answers)
    assert exit_code == 0
    assert output.count("recommender session closed") == 2


def test_sigterm_answers_every_request_waiting_in_the_admission_queue(
    fleet_process: MockFleetProcess,
) -> None:
    # One slot a worker: of 10 requests, 2 are served and 8 wait when the signal comes.
    fleet_process.set_behaviour(delay_ms=500)
    overrides = {**LONG, "GATEWAY_MAX_IN_FLIGHT": "1", "GATEWAY_ADMISSION__QUEUE_SIZE": "50"}
    with gunicorn(fleet_process, "--workers", "2", **overrides) as server:
        both_started(server)

        async def burst() -> list[tuple[int, Any]]:
            async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, Any]:
                body = {"user_id": f"q-{i}"}
                async with session.post(f"{server.url}/recommendation", json=body) as response:
                    return response.status, await response.json()

            connector = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                calls = [asyncio.create_task(one(session, i)) for i in range(10)]
                # Both slots taken (each worker's first request at the mocks), the rest queued.
                await asyncio.to_thread(
                    wait_until,
                    lambda: all(fleet_process.stats(n)["requests"] >= 2 for n in DEFAULT_NAMES),
                    30,
                    "the first requests did not reach the mocks",
                )
                served_before = fleet_process.stats("sml")["requests"]
                server.process.send_signal(signal.SIGTERM)
                answers = await asyncio.gather(*calls)
                assert served_before < 10  # some were still waiting when the signal came
                return answers

        answers = asyncio.run(burst())
        exit_code = server.stop()

    assert [status for status, _ in answers] == [200] * 10
    assert all(body["complete"] for _, body in answers)
    assert exit_code == 0


@pytest.mark.parametrize(
    ("server", "app", "worker"),
    [
        ("gthread", "gateway.asgi:app", "gateway.worker.ThreadWorker"),
        ("gthread", "gateway.wsgi:app", "gateway.worker.ThreadWorker"),
        ("uvicorn", "gateway.wsgi:app", "gateway.worker.UvicornWorker"),
    ],
)
def test_either_serving_design_serves_either_app_path(
    fleet_process: MockFleetProcess, server: str, app: str, worker: str
) -> None:
    overrides = {"GATEWAY_SERVER": server, **LONG}
    with gunicorn(fleet_process, "--workers", "2", app=app, **overrides) as served:
        both_started(served)
        answers = asyncio.run(post_concurrently(served.url, bodies(40)))
        assert served.stop() == 0
        output = served.output()

    assert_own_data(answers)
    assert f"Using worker: {worker}" in output
    started = output.count("event loop and recommender session started")
    assert started == output.count("recommender session closed") == 2
    assert "Traceback" not in output

"""End-to-end: the gateway under gunicorn, far more requests at once than it admits.

What it checks is the shape of the answers, not their speed (`python -m benchmarks overload`
measures that): everything is a 200 or a 503 that says so, the healthy recommenders answer
every admitted request, and the hanging one is the only one whose breaker opens.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
import requests

from mock_recommenders import DEFAULT_NAMES, MockFleetProcess
from tests.helpers import gunicorn, lines, sample

pytestmark = pytest.mark.slow

HEALTHY = [name for name in DEFAULT_NAMES if name != "trd"]


async def hammer(url: str, connections: int, seconds: float) -> list[tuple[int, Any, Any]]:
    """`connections` clients, each posting again as soon as it is answered, for `seconds`."""
    answers: list[tuple[int, Any, Any]] = []
    stop_at = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client(number: int) -> None:
            while time.monotonic() < stop_at:
                body = {"user_id": f"o-{number}"}
                async with session.post(f"{url}/recommendation", json=body) as response:
                    answers.append((response.status, response.headers, await response.json()))

        await asyncio.gather(*(client(n) for n in range(connections)))
    return answers


def test_overload_is_answered_with_503s_and_no_healthy_recommender_is_blamed(
    fleet_process: MockFleetProcess,
) -> None:
    fleet_process.set_behaviour("trd", hang=True)
    recommenders = [
        {
            "name": name,
            "url": fleet_process.url(name),
            "timeout_ms": 1000 if name == "trd" else 15_000,
        }
        for name in DEFAULT_NAMES
    ]
    overrides = {
        "GATEWAY_RECOMMENDERS": json.dumps(recommenders),
        "GATEWAY_DEADLINE_MS": "20000",
        "GATEWAY_ADMISSION__ADAPTIVE": "true",
        # The ceiling and the queue, far below the 300 clients: whatever the limit does, most
        # are shed, at once, for a full queue.
        "GATEWAY_MAX_IN_FLIGHT": "20",
        "GATEWAY_ADMISSION__QUEUE_SIZE": "20",
    }
    with gunicorn(fleet_process, "--workers", "2", **overrides) as server:
        answers = asyncio.run(hammer(server.url, connections=300, seconds=5))
        metrics = requests.get(f"{server.url}/metrics", timeout=30).text
        output = server.output()

    statuses = {status for status, _, _ in answers}
    assert statuses == {200, 503}, statuses
    for status, headers, body in answers:
        if status == 503:
            assert headers["Retry-After"] == "1"
            assert body["complete"] is False
            assert body["error"]["message"].startswith("gateway overloaded")
            assert {s["status"] for s in body["sources"].values()} == {"shed"}
        else:
            # Every admitted request got every healthy recommender's answer.
            assert [body["sources"][name]["status"] for name in HEALTHY] == ["ok"] * 3
            assert body["sources"]["trd"]["status"] in ("timeout", "circuit_open")
    for name in HEALTHY:
        assert (
            sample(
                metrics, "gateway_recommender_calls_total", recommender=name, outcome="circuit_open"
            )
            == 0
        )
        assert sample(metrics, "gateway_circuit_breaker_open", recommender=name) == 0
    assert sample(metrics, "gateway_circuit_breaker_open", recommender="trd") == 1
    # Counted apart, for the shedding alert (another worker's last second may not be in yet).
    shed = sum(1 for status, _, _ in answers if status == 503)
    assert 0 < sample(metrics, "gateway_shed_requests_total", reason="queue_full") <= shed
    assert sample(metrics, "gateway_shed_requests_total", reason="limit") == 0
    # Shed requests are logged as a count, a line a second per worker, not a line each.
    shed_lines = [r for r in lines(output) if "overloaded: shed" in r["message"]]
    assert shed_lines and sum(r["shed"] for r in shed_lines) <= sum(
        1 for status, _, _ in answers if status == 503
    )

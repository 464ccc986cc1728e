"""Prometheus metrics: present for every recommender, and summed across gunicorn workers."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import aiohttp
import requests

from gateway import GatewayFlask, create_app
from mock_recommenders import MockFleet
from tests.conftest import NAMES, settings_for
from tests.test_gunicorn import gunicorn
from tests.test_logs import lines

Serve = Callable[[GatewayFlask], str]


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if found == labels:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_cover_requests_and_every_recommender(fleet: MockFleet, serve: Serve) -> None:
    url = serve(create_app(settings_for(fleet)))
    before = requests.get(f"{url}/metrics", timeout=5).text
    fleet.set_behaviour("trd", status=503)

    for _ in range(3):
        requests.post(f"{url}/recommendation", json={}, timeout=5)
    response = requests.get(f"{url}/metrics", timeout=5)

    assert response.headers["Content-Type"].startswith("text/plain")
    after = response.text
    ok = {"route": "/recommendation", "status": "200"}
    assert (
        sample(after, "gateway_requests_total", **ok)
        - sample(before, "gateway_requests_total", **ok)
        == 3
    )
    for name in NAMES:
        outcome = "error" if name == "trd" else "ok"
        labels = {"recommender": name, "outcome": outcome}
        grown = sample(after, "gateway_recommender_calls_total", **labels) - sample(
            before, "gateway_recommender_calls_total", **labels
        )
        assert grown == 3
        assert (
            sample(after, "gateway_recommender_call_duration_seconds_count", recommender=name) > 0
        )
        assert f'gateway_circuit_breaker_open{{recommender="{name}"}}' in after
    assert "gateway_in_flight_requests" in after


def test_metrics_are_summed_across_two_workers(fleet: MockFleet) -> None:
    fleet.set_behaviour(delay_ms=20)
    with gunicorn(fleet, "--workers", "2") as server:

        async def traffic() -> None:
            async with aiohttp.ClientSession() as session:

                async def one() -> None:
                    async with session.post(f"{server.url}/recommendation", json={}) as r:
                        assert r.status == 200

                await asyncio.gather(*(one() for _ in range(60)))

        asyncio.run(traffic())
        text = requests.get(f"{server.url}/metrics", timeout=5).text
        pids = {r["process"] for r in lines(server.output()) if r["message"] == "request"}

    assert len(pids) == 2  # both workers served some of it
    assert sample(text, "gateway_requests_total", route="/recommendation", status="200") == 60
    for name in NAMES:
        assert sample(text, "gateway_recommender_calls_total", recommender=name, outcome="ok") == 60

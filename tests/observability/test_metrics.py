"""Prometheus metrics: present for every recommender, and summed across gunicorn workers."""

from __future__ import annotations

import asyncio

import pytest
import requests

from gateway.web.app import create_app
from mock_recommenders import DEFAULT_NAMES, MockFleet, MockFleetProcess
from tests.helpers import (
    Serve,
    gunicorn,
    post_concurrently,
    sample,
    settings_for,
    until_every_worker_served,
    wait_until,
)


def test_metrics_cover_requests_and_every_recommender(fleet: MockFleet, serve: Serve) -> None:
    url = serve(create_app(settings_for(fleet)))
    before = requests.get(f"{url}/metrics", timeout=30).text
    fleet.set_behaviour("trd", status=503)

    for _ in range(3):
        requests.post(f"{url}/recommendation", json={}, timeout=30)
    response = requests.get(f"{url}/metrics", timeout=30)

    assert response.headers["Content-Type"].startswith("text/plain")
    after = response.text
    ok = {"route": "/recommendation", "status": "200"}
    assert (
        sample(after, "gateway_requests_total", **ok)
        - sample(before, "gateway_requests_total", **ok)
        == 3
    )
    for name in DEFAULT_NAMES:
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


def test_metrics_can_be_switched_off(fleet: MockFleet, serve: Serve) -> None:
    url = serve(create_app(settings_for(fleet, metrics=False)))

    assert requests.post(f"{url}/recommendation", json={}, timeout=30).status_code == 200
    response = requests.get(f"{url}/metrics", timeout=30)

    assert response.status_code == 404
    assert response.json()["error"]["message"] == "metrics are switched off (metrics: false)"


@pytest.mark.slow
def test_metrics_are_summed_across_two_workers(fleet_process: MockFleetProcess) -> None:
    fleet_process.set_behaviour(delay_ms=20)
    with gunicorn(fleet_process, "--workers", "2", GATEWAY_DEADLINE_MS="20000") as server:
        sent = 0

        async def thirty() -> None:
            nonlocal sent
            answers = await post_concurrently(server.url, [{}] * 30)
            assert [status for status, _ in answers] == [200] * 30
            sent += 30

        asyncio.run(until_every_worker_served(server, thirty))

        # Each worker hands its counts over once a second (the one that renders, at once).
        def scraped() -> str:
            return requests.get(f"{server.url}/metrics", timeout=30).text

        def counted(text: str) -> float:
            return sample(text, "gateway_requests_total", route="/recommendation", status="200")

        wait_until(
            lambda: counted(scraped()) == sent, 10, lambda: f"{counted(scraped())} != {sent}"
        )
        text = scraped()

    for name in DEFAULT_NAMES:
        assert (
            sample(text, "gateway_recommender_calls_total", recommender=name, outcome="ok") == sent
        )

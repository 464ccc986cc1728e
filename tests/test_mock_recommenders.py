"""Tests of the mock recommenders, over real HTTP."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import requests

from mock_recommenders import MockFleet, rank_items
from mock_recommenders.behaviour import Behaviour
from tests.conftest import NAMES, ROOT, free_port


def ask(fleet: MockFleet, name: str, body: Any, **kwargs: Any) -> requests.Response:
    return requests.post(fleet.url(name), json=body, timeout=5, **kwargs)


def test_rankings_are_deterministic_prefix_stable_and_distinct_per_recommender() -> None:
    for name in NAMES:
        full = rank_items(name, "u1", 100)
        assert rank_items(name, "u1", 100) == full
        assert rank_items(name, "u1", 7) == full[:7]
        assert len({item["id"] for item in full}) == 100
        scores = [item["score"] for item in full]
        assert all(0 < s <= 1 for s in scores)
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == 100
    lists = {tuple(i["id"] for i in rank_items(name, "u1", 10)) for name in NAMES}
    assert len(lists) == len(NAMES)
    assert rank_items("sml", "u1", 10) != rank_items("sml", "u2", 10)
    assert rank_items("sml", None, 5) == rank_items("sml", None, 5)


def test_answers_the_ranking_for_the_user(fleet: MockFleet) -> None:
    response = ask(fleet, "asc", {"user_id": "u9", "resultSize": 4}, headers={"X-Request-ID": "r"})

    assert response.status_code == 200
    assert response.json() == {
        "items": rank_items("asc", "u9", 4),
        "recommender": "asc",
        "user_id": "u9",
        "request_id": "r",
    }
    assert len(ask(fleet, "asc", {}).json()["items"]) == 10


@pytest.mark.parametrize(
    ("body", "status"),
    [("[1]", 400), ("nope", 400), ('{"resultSize": 0}', 422), ('{"user_id": 3}', 422)],
)
def test_rejects_bad_input(fleet: MockFleet, body: str, status: int) -> None:
    response = requests.post(fleet.url("sml"), data=body, timeout=5)

    assert response.status_code == status
    assert "error" in response.json()


def test_delay_and_faults_are_honoured(fleet: MockFleet) -> None:
    fleet.set_behaviour("trd", delay_ms=150)
    started = time.perf_counter()
    assert ask(fleet, "trd", {}).status_code == 200
    assert time.perf_counter() - started >= 0.15

    fleet.set_behaviour("trd", delay_ms=0, status=503)
    assert ask(fleet, "trd", {}).status_code == 503

    fleet.set_behaviour("trd", status=200, not_json=True)
    response = ask(fleet, "trd", {})
    assert response.status_code == 200
    assert response.text == "this is not json"

    fleet.set_behaviour("trd", not_json=False, hang=True)
    with pytest.raises(requests.ReadTimeout):
        requests.post(fleet.url("trd"), json={}, timeout=0.3)
    fleet.reset()
    assert fleet.behaviour("trd") == Behaviour()


def test_stats_count_requests_and_connections(fleet: MockFleet) -> None:
    with requests.Session() as session:
        for _ in range(5):
            session.post(fleet.url("psn"), json={}, timeout=5)
    for _ in range(3):
        with requests.Session() as session:
            session.post(fleet.url("psn"), json={}, timeout=5)

    stats = requests.get(fleet.url("psn").replace("/test", "/stats"), timeout=5).json()
    zero = {"errors": 0, "resets": 0, "hangs": 0}
    assert stats == {"name": "psn", "requests": 8, "connections": 4, **zero}
    requests.post(fleet.url("psn").replace("/test", "/stats/reset"), timeout=5)
    assert fleet.stats("psn") == {"name": "psn", "requests": 0, "connections": 0, **zero}


def test_the_admin_endpoint_changes_a_running_mock(fleet: MockFleet) -> None:
    admin = fleet.url("sml").replace("/test", "/admin/behaviour")

    changed = requests.put(admin, json={"status": 502, "jitter_ms": 5}, timeout=5)
    assert changed.status_code == 200
    assert changed.json()["status"] == 502
    assert requests.get(admin, timeout=5).json() == fleet.behaviour("sml").as_dict()
    assert ask(fleet, "sml", {}).status_code == 502

    refused = requests.put(admin, json={"delay": 5, "status": 200}, timeout=5)
    assert refused.status_code == 422
    assert "unknown behaviour field 'delay'" in refused.json()["error"]
    assert fleet.behaviour("sml").status == 502  # all or nothing
    refused = requests.put(admin, json={"hang": "yes"}, timeout=5)
    assert refused.status_code == 422


def test_the_last_request_is_recorded(fleet: MockFleet) -> None:
    ask(fleet, "sml", {"user_id": "u", "x": [1]}, headers={"X-Request-ID": "abc"})

    seen = fleet.last_request("sml")
    assert seen is not None
    assert seen["body"] == {"user_id": "u", "x": [1]}
    assert seen["headers"]["x-request-id"] == "abc"


def test_the_command_line_serves_one_recommender_and_stops_cleanly_on_ctrl_c() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mock_recommenders", "--name", "trd", "--port", str(port)]
        + ["--delay-ms", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.strip() == f"mock recommender trd listening on http://127.0.0.1:{port}/test"
        response = requests.post(f"http://127.0.0.1:{port}/test", json={"user_id": "u"}, timeout=5)
        assert response.json()["items"] == rank_items("trd", "u", 10)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0
    assert "Traceback" not in stderr


def test_injected_errors_carry_retry_after(fleet: MockFleet) -> None:
    fleet.set_behaviour("asc", error_rate=1.0, error_status=502, retry_after_s=2)

    for _ in range(3):
        response = ask(fleet, "asc", {})
        assert response.status_code == 502
        assert response.headers["Retry-After"] == "2"
    assert fleet.stats("asc")["errors"] == 3


def test_an_error_rate_fails_that_share_of_calls() -> None:
    with MockFleet(("sml",), seed=7) as fleet:
        fleet.set_behaviour("sml", error_rate=0.5)
        with requests.Session() as session:
            statuses = [
                session.post(fleet.url("sml"), json={}, timeout=5).status_code for _ in range(200)
            ]

    assert 60 < statuses.count(503) < 140
    assert fleet.stats("sml")["errors"] == statuses.count(503)


def test_a_slow_tail(fleet: MockFleet) -> None:
    fleet.set_behaviour("trd", slow_rate=1.0, slow_ms=150)

    started = time.perf_counter()
    assert ask(fleet, "trd", {}).status_code == 200
    assert time.perf_counter() - started >= 0.15


async def test_a_reset_mid_answer(fleet: MockFleet) -> None:
    import aiohttp

    fleet.set_behaviour("psn", reset=True)

    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.post(fleet.url("psn"), json={}) as response:
                assert response.status == 200
                await response.read()

    assert fleet.stats("psn")["resets"] == 1


def test_fail_first_fails_that_many_calls_each_time_it_is_set(fleet: MockFleet) -> None:
    fleet.set_behaviour("sml", fail_first=2)
    assert [ask(fleet, "sml", {}).status_code for _ in range(3)] == [503, 503, 200]

    fleet.set_behaviour("sml", fail_first=2)
    assert [ask(fleet, "sml", {}).status_code for _ in range(3)] == [503, 503, 200]


@pytest.mark.parametrize(
    "change",
    [{"error_rate": 1.5}, {"error_status": 200}, {"slow_ms": -1}, {"fail_first": 1.5}],
)
def test_fault_values_are_validated(fleet: MockFleet, change: dict[str, Any]) -> None:
    admin = fleet.url("sml").replace("/test", "/admin/behaviour")

    refused = requests.put(admin, json=change, timeout=5)

    assert refused.status_code == 422
    assert next(iter(change)) in refused.json()["error"]

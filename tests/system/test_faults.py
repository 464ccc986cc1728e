"""Fault injection on real sockets: each fault a recommender can have, as a frontend sees it.

For every fault: the status reported for that source, the other sources intact, the answer
cut at the deadline rather than waiting for the fault, and the calls (and retries) counted at
the mock.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests

from gateway.web.app import create_app
from mock_recommenders import MockFleet
from tests.helpers import Serve, settings_for

# Many times what a call to a healthy mock takes on a busy machine; far below the faults.
DEADLINE_MS = 500
SLOW_MS = 20_000


@pytest.fixture
def gateway(fleet: MockFleet, serve: Serve) -> str:
    url = serve(create_app(settings_for(fleet, deadline_ms=DEADLINE_MS)))
    recommend(url)  # warm the pool: connections are not what these tests measure
    fleet.reset()
    return url


def recommend(url: str) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    response = requests.post(f"{url}/recommendation", json={"user_id": "f"}, timeout=60)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body, elapsed


def assert_others_intact(body: dict[str, Any], faulty: str) -> None:
    for name, source in body["sources"].items():
        if name != faulty:
            assert source == {
                "status": "ok",
                "latency_ms": source["latency_ms"],
                "attempts": 1,
            }
    assert body["complete"] is False
    assert faulty not in [entry["name"] for entry in body["result"]]


@pytest.mark.parametrize(
    ("fault", "status", "reason", "attempts"),
    [
        ({"error_rate": 1.0, "error_status": 503}, "error", "answered HTTP 503", 2),
        ({"error_rate": 1.0, "error_status": 500}, "error", "answered HTTP 500", 1),
        ({"error_rate": 1.0, "error_status": 429}, "error", "answered HTTP 429", 1),
        ({"not_json": True}, "error", "answered a body that is not JSON", 1),
        ({"reset": True}, "error", "answer cut off before its end", 2),
        (
            {"slow_rate": 1.0, "slow_ms": SLOW_MS},
            "timeout",
            f"no answer within the {DEADLINE_MS} ms deadline",
            1,
        ),
        ({"hang": True}, "timeout", f"no answer within the {DEADLINE_MS} ms deadline", 1),
    ],
)
def test_each_fault_is_reported_for_its_source_alone(
    fleet: MockFleet,
    gateway: str,
    fault: dict[str, Any],
    status: str,
    reason: str,
    attempts: int,
) -> None:
    fleet.set_behaviour("trd", **fault)

    body, elapsed = recommend(gateway)

    trd = body["sources"]["trd"]
    assert (trd["status"], trd["error"], trd["attempts"]) == (status, reason, attempts)
    assert_others_intact(body, "trd")
    assert elapsed < SLOW_MS / 1000 / 4  # cut at the deadline, never waiting out a fault
    assert fleet.stats("trd")["requests"] == attempts


def test_a_retry_recovers_a_failing_first_call(fleet: MockFleet, gateway: str) -> None:
    fleet.set_behaviour("asc", fail_first=1, retry_after_s=0)

    body, _ = recommend(gateway)

    assert body["sources"]["asc"]["status"] == "ok"
    assert body["sources"]["asc"]["attempts"] == 2
    assert body["complete"] is True
    assert fleet.stats("asc") | {"requests": 2, "errors": 1} == fleet.stats("asc")


def test_a_retry_waits_for_retry_after_within_the_deadline(fleet: MockFleet, serve: Serve) -> None:
    url = serve(create_app(settings_for(fleet, deadline_ms=5000)))
    fleet.set_behaviour("asc", fail_first=1, retry_after_s=0.2)

    body, _ = recommend(url)

    assert body["sources"]["asc"]["status"] == "ok"
    assert body["sources"]["asc"]["attempts"] == 2
    assert body["sources"]["asc"]["latency_ms"] >= 200  # a sleep is never shorter than asked


def test_a_retry_after_beyond_the_deadline_is_not_waited_for(
    fleet: MockFleet, gateway: str
) -> None:
    fleet.set_behaviour("asc", fail_first=1, retry_after_s=5)

    body, _ = recommend(gateway)

    # Had it waited, the deadline would have cut the call: "timeout", not the 503 it got.
    assert body["sources"]["asc"]["status"] == "error"
    assert body["sources"]["asc"]["error"] == "answered HTTP 503"
    assert body["sources"]["asc"]["attempts"] == 1
    assert fleet.stats("asc")["requests"] == 1

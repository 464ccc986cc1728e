"""The three fan-out strategies behave the same to a frontend; only their timing differs."""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests

from gateway.fanout.strategies import STRATEGIES
from gateway.web.app import create_app
from mock_recommenders import DEFAULT_NAMES, MockFleet
from mock_recommenders.ranking import rank_items
from tests.helpers import Serve, closed_port, settings_for

pytestmark = pytest.mark.parametrize("strategy", sorted(STRATEGIES))


def start(fleet: MockFleet, serve: Serve, strategy: str, **fields: Any) -> str:
    return serve(create_app(settings_for(fleet, strategy=strategy, **fields)))


def recommend(url: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{url}/recommendation", json=body, timeout=30)


def test_same_answer_whatever_the_strategy(fleet: MockFleet, serve: Serve, strategy: str) -> None:
    url = start(fleet, serve, strategy)

    response = recommend(url, {"user_id": "s1", "resultSize": 3})

    assert response.status_code == 200
    assert response.headers["X-Fusion-Complete"] == "true"
    body = response.json()
    assert [entry["name"] for entry in body["result"]] == list(DEFAULT_NAMES)
    for entry in body["result"]:
        assert entry["prediction"]["items"] == rank_items(entry["name"], "s1", 3)
    assert fleet.last_request("psn") is not None


def test_same_reasons_for_broken_and_missing_recommenders(
    fleet: MockFleet, serve: Serve, strategy: str
) -> None:
    with closed_port() as port:
        settings = settings_for(fleet, strategy=strategy).model_dump(mode="json")
        settings["recommenders"][3]["url"] = f"http://127.0.0.1:{port}/test"
        url = serve(create_app(type(settings_for(fleet)).model_validate(settings)))
        fleet.set_behaviour("asc", status=503)
        fleet.set_behaviour("trd", not_json=True)

        body = recommend(url, {"user_id": "s2"}).json()

    assert {name: (r["status"], r.get("error")) for name, r in body["sources"].items()} == {
        "sml": ("ok", None),
        "asc": ("error", "answered HTTP 503"),
        "trd": ("error", "answered a body that is not JSON"),
        "psn": ("error", f"cannot connect to 127.0.0.1:{port}: Connection refused"),
    }
    assert [entry["name"] for entry in body["result"]] == ["sml"]


def test_all_failing_is_502(fleet: MockFleet, serve: Serve, strategy: str) -> None:
    url = start(fleet, serve, strategy)
    fleet.set_behaviour(status=500)

    response = recommend(url, {})

    assert response.status_code == 502
    assert response.json()["complete"] is False


def test_a_hanging_recommender_costs_at_most_the_deadline(
    fleet: MockFleet, serve: Serve, strategy: str
) -> None:
    url = start(fleet, serve, strategy, deadline_ms=500)
    fleet.set_behaviour("asc", hang=True)

    started = time.perf_counter()
    body = recommend(url, {"user_id": "s3"}).json()
    elapsed = time.perf_counter() - started

    # The hang lasts until the test ends: an answer seconds early is the deadline's doing.
    assert elapsed < 5
    assert body["sources"]["sml"]["status"] == "ok"
    asc = body["sources"]["asc"]
    assert (asc["status"], asc["attempts"]) == ("timeout", 1)
    # On a loaded machine the worker's own stall may excuse the timeout; either way it says so.
    assert asc["error"] == "no answer within the 500 ms deadline" or asc["error"].endswith(
        "not counted against the recommender"
    )
    if strategy == "sequential":
        # One after another: nothing is left for those after the hanging one.
        assert body["sources"]["trd"]["error"] == "deadline already passed"
    else:
        assert body["sources"]["trd"]["status"] == "ok"


def test_only_sequential_waits_for_one_recommender_after_another(
    fleet: MockFleet, serve: Serve, strategy: str
) -> None:
    url = start(fleet, serve, strategy, deadline_ms=10_000)
    # Long enough for all four calls to be under way at once however busy the machine is;
    # one after another, any delay shows a peak of 1.
    fleet.set_behaviour(delay_ms=50 if strategy == "sequential" else 300)

    assert recommend(url, {"user_id": "s4"}).json()["complete"] is True

    # Counted by the mocks: how many of the four calls were under way at once.
    assert fleet.peak_in_flight() == (1 if strategy == "sequential" else len(DEFAULT_NAMES))


def test_connections_are_pooled(fleet: MockFleet, serve: Serve, strategy: str) -> None:
    url = start(fleet, serve, strategy)

    for i in range(10):
        assert recommend(url, {"user_id": f"p{i}"}).status_code == 200

    connections = {name: fleet.stats(name)["connections"] for name in DEFAULT_NAMES}
    if strategy == "threads":
        # A requests session per thread, each keeping its own connection to each recommender:
        # at most one per thread that called it (four calls at a time: four threads), however
        # many requests came.
        assert all(1 <= count <= len(DEFAULT_NAMES) for count in connections.values())
    else:
        assert connections == dict.fromkeys(DEFAULT_NAMES, 1)

"""Integration tests: the real app over real HTTP in front of the real mock recommenders."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, NoReturn

import pytest
import requests

from gateway.contract.schemas import RecommendationResponse, UnansweredRecommendation
from gateway.web.app import create_app
from mock_recommenders import DEFAULT_NAMES, MockFleet, MockFleetProcess
from mock_recommenders.ranking import rank_items
from tests.helpers import (
    Serve,
    assert_json_error,
    closed_port,
    post_concurrently,
    recommend,
    settings_for,
)


def test_merges_every_answer_in_config_order(gateway_url: str) -> None:
    response = recommend(gateway_url, {"user_id": "u1", "resultSize": 3})

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["X-Fusion-Complete"] == "true"
    body = response.json()
    assert [entry["name"] for entry in body["result"]] == list(DEFAULT_NAMES)
    for entry in body["result"]:
        assert entry["prediction"]["items"] == rank_items(entry["name"], "u1", 3)
    assert list(body["sources"]) == list(DEFAULT_NAMES)
    for report in body["sources"].values():
        assert report["status"] == "ok"
        assert report["latency_ms"] > 0
        assert "error" not in report
    assert body["complete"] is True
    assert body["request_id"] == response.headers["X-Request-ID"]
    # Built as data on the hot path: the shape is still the response model's.
    assert (
        RecommendationResponse.model_validate(body).model_dump(mode="json", exclude_none=True)
        == body
    )


def test_config_order_holds_when_answers_arrive_in_reverse(fleet: MockFleet, serve: Serve) -> None:
    url = serve(create_app(settings_for(fleet, deadline_ms=10_000)))
    # 200 ms apart: far more than a busy machine's scheduling noise.
    for delay, name in zip((600, 400, 200, 0), DEFAULT_NAMES, strict=True):
        fleet.set_behaviour(name, delay_ms=delay)

    body = recommend(url, {"user_id": "u2"}).json()

    assert [entry["name"] for entry in body["result"]] == list(DEFAULT_NAMES)
    latencies = [body["sources"][name]["latency_ms"] for name in DEFAULT_NAMES]
    assert latencies == sorted(latencies, reverse=True)


def test_forwards_the_validated_body_and_the_request_id(fleet: MockFleet, gateway_url: str) -> None:
    sent = {"user_id": "u3", "context": {"page": "home"}, "experiment": [1, "b"], "n": None}

    response = recommend(gateway_url, sent, headers={"X-Request-ID": "req-42"})

    assert response.headers["X-Request-ID"] == "req-42"
    assert response.json()["request_id"] == "req-42"
    for name in DEFAULT_NAMES:
        seen = fleet.last_request(name)
        assert seen is not None
        assert seen["body"] == {"resultSize": 10, **sent}
        assert seen["headers"]["x-request-id"] == "req-42"
        assert seen["headers"]["content-type"] == "application/json"


def test_absent_optional_fields_are_not_invented(fleet: MockFleet, gateway_url: str) -> None:
    response = recommend(gateway_url, {})

    assert response.status_code == 200
    generated = response.headers["X-Request-ID"]
    assert len(generated) == 32
    seen = fleet.last_request("sml")
    assert seen is not None
    assert seen["body"] == {"resultSize": 10}
    assert seen["headers"]["x-request-id"] == generated


def test_slow_recommenders_are_called_concurrently(fleet: MockFleet, serve: Serve) -> None:
    url = serve(create_app(settings_for(fleet, deadline_ms=10_000)))
    fleet.set_behaviour(delay_ms=500)

    response = recommend(url, {"user_id": "u4"})

    assert response.json()["complete"] is True
    # What the mocks saw, not a stopwatch: all four calls were under way at once.
    assert fleet.peak_in_flight() == len(DEFAULT_NAMES)


@pytest.mark.slow
def test_concurrent_requests_each_get_their_own_data(
    fleet_process: MockFleetProcess, serve: Serve
) -> None:
    # Isolation, not speed: the mocks answer from a process of their own, and the deadline is
    # long enough that no answer is cut however busy the machine is.
    url = serve(create_app(settings_for(fleet_process, deadline_ms=20_000)))
    bodies = [{"user_id": f"user-{i}", "resultSize": 1 + i % 20} for i in range(150)]
    headers = [{"X-Request-ID": f"req-{i}"} for i in range(150)]

    answers = asyncio.run(post_concurrently(url, bodies, headers))

    assert [status for status, _ in answers] == [200] * 150
    for i, (_, body) in enumerate(answers):
        assert body["request_id"] == f"req-{i}"
        assert body["complete"] is True
        for entry in body["result"]:
            prediction = entry["prediction"]
            assert prediction["user_id"] == f"user-{i}"
            assert prediction["request_id"] == f"req-{i}"
            assert prediction["items"] == rank_items(entry["name"], f"user-{i}", 1 + i % 20)


def test_sequential_requests_reuse_connections(fleet: MockFleet, gateway_url: str) -> None:
    for i in range(20):
        assert recommend(gateway_url, {"user_id": f"u{i}"}).status_code == 200

    for name in DEFAULT_NAMES:
        stats = fleet.stats(name)
        assert stats["requests"] == 20
        assert stats["connections"] == 1


@pytest.mark.parametrize(
    ("data", "status", "phrase"),
    [
        (b"{not json", 400, "request body is not valid JSON"),
        (b"", 400, "request body is empty"),
        (b"[1, 2]", 400, "must be a JSON object, not an array"),
        (b'"text"', 400, "must be a JSON object, not a string"),
        (b'{"resultSize": NaN}', 400, "NaN is not valid JSON"),
        (b"\xff\xfe\x00garbage", 400, "request body is not valid JSON"),
        # What is wrong with a field is in pydantic's words, which another version may word
        # otherwise: the gateway promises the status, and the field named in its own shape.
        (b'{"resultSize": 0}', 422, "invalid request: resultSize: "),
        (b'{"resultSize": 101}', 422, "invalid request: resultSize: "),
        (b'{"resultSize": "10"}', 422, "invalid request: resultSize: "),
        (b'{"resultSize": true}', 422, "invalid request: resultSize: "),
        (b'{"resultSize": 3.5}', 422, "invalid request: resultSize: "),
        (b'{"user_id": 7}', 422, "invalid request: user_id: "),
        (b'{"context": [1]}', 422, "invalid request: context: "),
    ],
)
def test_bad_input_gets_its_status_and_a_message_naming_it(
    fleet: MockFleet, gateway_url: str, data: bytes, status: int, phrase: str
) -> None:
    response = recommend(gateway_url, data=data, headers={"Content-Type": "application/json"})

    assert_json_error(response, status, phrase)
    assert fleet.stats("sml")["requests"] == 0


def test_validation_errors_list_every_field(gateway_url: str) -> None:
    response = recommend(gateway_url, {"resultSize": 0, "user_id": "x" * 257})

    body = assert_json_error(response, 422, "resultSize", "user_id")
    fields = [detail["field"] for detail in body["error"]["details"]]
    assert fields == ["resultSize", "user_id"]


def test_a_body_over_the_limit_is_413(fleet: MockFleet, serve: Serve) -> None:
    url = serve(create_app(settings_for(fleet, max_body_bytes=1024)))

    response = recommend(url, {"user_id": "u", "padding": "x" * 2000})

    assert_json_error(response, 413, "larger than the limit of 1024 bytes")
    assert recommend(url, {"user_id": "u", "padding": "x" * 500}).status_code == 200


def test_wrong_method_and_unknown_path_are_json(gateway_url: str) -> None:
    response = requests.get(f"{gateway_url}/recommendation", timeout=30)
    assert_json_error(response, 405, "method GET is not allowed on /recommendation")
    assert "POST" in response.headers["Allow"]

    response = requests.post(f"{gateway_url}/recommend", json={}, timeout=30)
    assert_json_error(response, 404, "no such endpoint: POST /recommend")


def test_a_malformed_request_id_is_refused(gateway_url: str) -> None:
    response = recommend(gateway_url, {}, headers={"X-Request-ID": "has spaces in it"})

    assert_json_error(response, 400, "X-Request-ID must be 1 to 128 visible ASCII characters")


def test_an_unexpected_error_is_a_json_500_and_its_traceback_goes_to_the_log(
    fleet: MockFleet, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings_for(fleet))

    @app.get("/explode")
    async def explode() -> NoReturn:
        raise RuntimeError("secret detail at /srv/gateway/internal.py")

    url = serve(app)
    response = requests.get(f"{url}/explode", headers={"X-Request-ID": "boom-1"}, timeout=30)

    body = assert_json_error(response, 500, "internal gateway error")
    assert "secret" not in response.text
    assert body["request_id"] == "boom-1"
    logged = [r for r in caplog.records if "boom-1" in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert "secret detail" in str(logged[0].exc_info[1])


def test_a_hanging_recommender_yields_a_partial_answer_within_the_deadline(
    fleet: MockFleet, serve: Serve
) -> None:
    url = serve(create_app(settings_for(fleet, deadline_ms=500)))
    fleet.set_behaviour("trd", hang=True)

    started = time.perf_counter()
    response = recommend(url, {"user_id": "u5", "resultSize": 2})
    elapsed = time.perf_counter() - started

    assert response.status_code == 200
    assert response.headers["X-Fusion-Complete"] == "false"
    body = response.json()
    assert body["complete"] is False
    assert [entry["name"] for entry in body["result"]] == ["sml", "asc", "psn"]
    assert body["sources"]["trd"]["status"] == "timeout"
    assert body["sources"]["trd"]["error"] == "no answer within the 500 ms deadline"
    assert body["sources"]["trd"]["attempts"] == 1
    assert fleet.stats("trd")["hangs"] == 1
    # The hang lasts until the test ends: an answer at all, seconds early, is the deadline's.
    assert elapsed < 5


def test_a_per_recommender_timeout_is_tighter_than_the_deadline(
    fleet: MockFleet, serve: Serve
) -> None:
    url = serve(create_app(settings_for(fleet, deadline_ms=10_000, timeout_ms=150)))
    fleet.set_behaviour("asc", hang=True)

    body = recommend(url, {"user_id": "u6"}).json()

    # The call's own budget ended it (the deadline's message would name the deadline).
    assert body["sources"]["asc"] == {
        "status": "timeout",
        "latency_ms": body["sources"]["asc"]["latency_ms"],
        "attempts": 1,
        "error": "no answer within 150 ms",
    }
    assert body["sources"]["asc"]["latency_ms"] < 5000  # half the deadline, 30x the budget


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ({"status": 503}, "answered HTTP 503"),
        ({"status": 500}, "answered HTTP 500"),
        ({"not_json": True}, "answered a body that is not JSON"),
    ],
)
def test_a_broken_recommender_becomes_a_source_entry(
    fleet: MockFleet, gateway_url: str, behaviour: dict[str, Any], reason: str
) -> None:
    fleet.set_behaviour("psn", **behaviour)

    response = recommend(gateway_url, {"user_id": "u7"})

    assert response.status_code == 200
    body = response.json()
    assert body["sources"]["psn"]["status"] == "error"
    assert body["sources"]["psn"]["error"] == reason
    assert [entry["name"] for entry in body["result"]] == ["sml", "asc", "trd"]
    assert response.headers["X-Fusion-Complete"] == "false"


def test_a_recommender_that_is_down_becomes_a_source_entry(fleet: MockFleet, serve: Serve) -> None:
    with closed_port() as port:
        settings = settings_for(fleet).model_dump(mode="json")
        settings["recommenders"][1]["url"] = f"http://127.0.0.1:{port}/test"
        url = serve(create_app(type(settings_for(fleet)).model_validate(settings)))

        body = recommend(url, {"user_id": "u8"}).json()

    assert body["sources"]["asc"]["status"] == "error"
    assert (
        body["sources"]["asc"]["error"] == f"cannot connect to 127.0.0.1:{port}: Connection refused"
    )
    assert [entry["name"] for entry in body["result"]] == ["sml", "trd", "psn"]


def test_when_no_recommender_answers_the_status_is_502(fleet: MockFleet, gateway_url: str) -> None:
    fleet.set_behaviour(status=500)

    response = recommend(gateway_url, {"user_id": "u9"})

    body = assert_json_error(response, 502, "no recommender answered")
    assert response.headers["X-Fusion-Complete"] == "false"
    assert body["result"] == []
    assert body["complete"] is False
    assert {name: report["status"] for name, report in body["sources"].items()} == {
        name: "error" for name in DEFAULT_NAMES
    }
    assert UnansweredRecommendation.model_validate(body).model_dump(exclude_none=True) == body


def test_health_and_readiness(gateway_url: str) -> None:
    healthz = requests.get(f"{gateway_url}/healthz", timeout=30)
    assert healthz.status_code == 200
    assert healthz.json() == {"status": "ok"}

    readyz = requests.get(f"{gateway_url}/readyz", timeout=30)
    assert readyz.status_code == 200
    assert readyz.json() == {"status": "ready", "recommenders": list(DEFAULT_NAMES)}


def test_request_ids_are_echoed_on_every_response(gateway_url: str) -> None:
    for response in (
        requests.get(f"{gateway_url}/healthz", headers={"X-Request-ID": "h-1"}, timeout=30),
        requests.get(f"{gateway_url}/missing", headers={"X-Request-ID": "h-1"}, timeout=30),
        recommend(gateway_url, {}, headers={"X-Request-ID": "h-1"}),
    ):
        assert response.headers["X-Request-ID"] == "h-1"
    assert (
        json.loads(recommend(gateway_url, {}, headers={"X-Request-ID": "h-1"}).text)["request_id"]
        == "h-1"
    )


def test_an_integral_number_is_an_integer(fleet: MockFleet, gateway_url: str) -> None:
    response = recommend(gateway_url, data=b'{"resultSize": 3.0}')

    assert response.status_code == 200
    seen = fleet.last_request("sml")
    assert seen is not None and seen["body"]["resultSize"] == 3
    assert len(response.json()["result"][0]["prediction"]["items"]) == 3

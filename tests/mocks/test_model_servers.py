"""The real model servers (KServe 0.21, MLServer 1.7) serving the ALS model, as the gateway sees.

Each server is started from its own venv (`model_servers.processes`) and asked over HTTP what
the gateway will ask: V1 (KServe) and V2 (both), for a known user, an absent one, and of the
malformed `als-broken`. Without `make model-servers` these tests are skipped, or fail where
``FUSION_TEST_REQUIRE_TOOLS=1`` (`make test`, CI) requires the servers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from benchmarks.quality.ranking_metrics import ndcg_at
from gateway.config.settings import Settings
from gateway.web.app import create_app
from mock_recommenders import MockFleet
from mock_recommenders.world import default_world
from model_servers.als.artefact import ALSModel
from model_servers.processes import (
    MODEL,
    KServeProcess,
    MLServerProcess,
    ModelServerProcess,
    missing_model_servers,
)
from tests.helpers import Serve, recommend
from tests.tools import REQUIRE_TOOLS_VARIABLE

pytestmark = pytest.mark.slow

USER = "test-3"
TIMEOUT_S = 10


def _require_model_servers() -> None:
    missing = missing_model_servers()
    if missing is None:
        return
    if os.environ.get(REQUIRE_TOOLS_VARIABLE) == "1":
        pytest.fail(f"{missing}, and {REQUIRE_TOOLS_VARIABLE}=1 requires them")
    pytest.skip(missing)


@pytest.fixture(scope="module")
def started() -> Iterator[dict[type[ModelServerProcess], ModelServerProcess]]:
    """Each server the module's tests ask for, started once, stopped after the last test."""
    servers: dict[type[ModelServerProcess], ModelServerProcess] = {}
    yield servers
    for each in servers.values():
        each.stop()


def _server(
    started: dict[type[ModelServerProcess], ModelServerProcess], kind: type[ModelServerProcess]
) -> ModelServerProcess:
    _require_model_servers()
    if kind not in started:
        started[kind] = kind().start()
    return started[kind]


@pytest.fixture(params=[KServeProcess, MLServerProcess], ids=["kserve", "mlserver"])
def server(
    request: pytest.FixtureRequest, started: dict[type[ModelServerProcess], ModelServerProcess]
) -> ModelServerProcess:
    """Each model server in turn: for what both serve (V2)."""
    return _server(started, request.param)


@pytest.fixture
def kserve(started: dict[type[ModelServerProcess], ModelServerProcess]) -> ModelServerProcess:
    """The KServe server: for what only it serves (V1)."""
    return _server(started, KServeProcess)


def _v2_body(user_id: str | None, size: int | None, request_id: str = "req-1") -> dict[str, Any]:
    inputs = []
    if user_id is not None:
        inputs.append({"name": "user_id", "shape": [1], "datatype": "BYTES", "data": [user_id]})
    if size is not None:
        inputs.append({"name": "result_size", "shape": [1], "datatype": "INT32", "data": [size]})
    return {"id": request_id, "inputs": inputs}


def _post(url: str, body: dict[str, Any]) -> requests.Response:
    # KServe reads a body without `Content-Type: application/json` as binary tensors (400).
    return requests.post(url, json=body, timeout=TIMEOUT_S)


def _outputs(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {output["name"]: output for output in answer["outputs"]}


def test_the_model_is_ready(server: ModelServerProcess) -> None:
    assert requests.get(f"{server.base_url}/v2/models/als/ready", timeout=TIMEOUT_S).ok
    assert requests.get(f"{server.base_url}/v2/models/als-broken/ready", timeout=TIMEOUT_S).ok


def test_v2_ranks_the_users_unseen_items_best_first(server: ModelServerProcess) -> None:
    answer = _post(server.v2_url("als"), _v2_body(USER, 25, "ask-7"))

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["id"] == "ask-7"
    outputs = _outputs(body)
    assert set(outputs) == {"item_ids", "scores"}
    ids, scores = outputs["item_ids"], outputs["scores"]
    assert (ids["datatype"], ids["shape"]) == ("BYTES", [1, 25])
    assert (scores["datatype"], scores["shape"]) == ("FP32", [1, 25])
    assert len(set(ids["data"])) == 25
    assert not set(ids["data"]) & set(default_world().history(USER))
    assert scores["data"] == sorted(scores["data"], reverse=True)


def test_v2_without_a_user_serves_the_most_popular_items(server: ModelServerProcess) -> None:
    anonymous = _post(server.v2_url("als"), _v2_body(None, 5)).json()
    stranger = _post(server.v2_url("als"), _v2_body("nobody-trained-this-one", 5)).json()

    expected = ALSModel(MODEL).recommend(None, 5).item_ids
    assert _outputs(anonymous)["item_ids"]["data"] == expected
    assert _outputs(stranger)["item_ids"]["data"] == expected


def test_v2_refuses_a_result_size_below_one(server: ModelServerProcess) -> None:
    answer = _post(server.v2_url("als"), _v2_body(USER, 0))

    assert answer.status_code == 400
    assert "at least 1" in answer.json()["error"]


def test_the_broken_models_v2_shapes_disagree(server: ModelServerProcess) -> None:
    answer = _post(server.v2_url("als-broken"), _v2_body(USER, 10))

    assert answer.status_code == 200
    outputs = _outputs(answer.json())
    assert outputs["item_ids"]["shape"] == [1, 10]
    assert outputs["scores"]["shape"] == [1, 9]
    assert len(outputs["scores"]["data"]) == 9


def test_v1_answers_the_gateways_native_body(kserve: ModelServerProcess) -> None:
    instance = {"user_id": USER, "resultSize": 12, "context": {"ignored": True}}
    answer = _post(kserve.v1_url("als"), {"instances": [instance, {"resultSize": 3}]})

    assert answer.status_code == 200, answer.text
    personal, anonymous = answer.json()["predictions"]
    items = personal["items"]
    assert len(items) == 12
    assert not {item["id"] for item in items} & set(default_world().history(USER))
    assert [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)
    assert [item["id"] for item in anonymous["items"]] == ALSModel(MODEL).recommend(
        None, 3
    ).item_ids


def test_v1_caps_the_result_size_at_100(kserve: ModelServerProcess) -> None:
    answer = _post(kserve.v1_url("als"), {"instances": [{"user_id": USER, "resultSize": 500}]})

    assert len(answer.json()["predictions"][0]["items"]) == 100


def test_the_broken_models_v1_items_are_not_a_list(kserve: ModelServerProcess) -> None:
    answer = _post(kserve.v1_url("als-broken"), {"instances": [{"user_id": USER, "resultSize": 5}]})

    assert answer.json() == {"predictions": [{"items": "not a list"}]}


def test_v1_readiness(kserve: ModelServerProcess) -> None:
    answer = requests.get(f"{kserve.base_url}/v1/models/als", timeout=TIMEOUT_S)

    assert (answer.status_code, answer.json()) == (200, {"name": "als", "ready": True})


@pytest.mark.parametrize("kind", [KServeProcess, MLServerProcess], ids=["kserve", "mlserver"])
def test_stopping_a_server_ends_its_whole_process_group(kind: type[ModelServerProcess]) -> None:
    _require_model_servers()
    with kind() as started:
        group = started.pid
        os.killpg(group, 0)  # there while it runs

    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)


def test_a_missing_model_says_how_to_build_it(tmp_path: Any) -> None:
    with pytest.raises(RuntimeError, match="make model-servers"):
        KServeProcess(model=tmp_path / "absent.npz").start()


def test_the_model_ranks_far_better_than_popularity() -> None:
    _require_model_servers()
    model, world = ALSModel(MODEL), default_world()
    users = [f"test-{n}" for n in range(100)]

    als = [ndcg_at(model.recommend(u, 10).item_ids, world.truth(u)) for u in users]
    popular = [ndcg_at(model.recommend(None, 10).item_ids, world.truth(u)) for u in users]

    # Measured: 0.32 against 0.10 over 200 users.
    assert sum(als) / len(als) > 2 * sum(popular) / len(popular)


# --- The gateway in front of them -----------------------------------------------------------


def _gateway_settings(
    fleet: MockFleet, recommenders: list[dict[str, Any]], **fields: Any
) -> Settings:
    native = {"name": "sml", "url": fleet.url("sml")}
    fields.setdefault("admission", {"adaptive": False})
    fields.setdefault("deadline_ms", 5000)
    return Settings.model_validate({"recommenders": [native, *recommenders], **fields})


@pytest.mark.parametrize("strategy", ["async", "threads"])
def test_the_gateway_fans_out_to_a_mock_kserve_v1_and_mlserver_v2_at_once(
    started: dict[type[ModelServerProcess], ModelServerProcess],
    fleet: MockFleet,
    serve: Serve,
    strategy: str,
) -> None:
    kserve, mlserver = _server(started, KServeProcess), _server(started, MLServerProcess)
    settings = _gateway_settings(
        fleet,
        [
            {"name": "als-v1", "url": kserve.v1_url("als"), "protocol": "kserve-v1"},
            {"name": "als-v2", "url": mlserver.v2_url("als"), "protocol": "open-inference"},
        ],
        strategy=strategy,
    )
    url = serve(create_app(settings))

    answer = recommend(url, {"user_id": USER, "resultSize": 5}, headers={"X-Request-ID": "gw-1"})

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert {n: s["status"] for n, s in body["sources"].items()} == dict.fromkeys(
        ["sml", "als-v1", "als-v2"], "ok"
    )
    lists = {s["name"]: [i["id"] for i in s["prediction"]["items"]] for s in body["result"]}
    expected = ALSModel(MODEL).recommend(USER, 5).item_ids
    assert lists["als-v1"] == lists["als-v2"] == expected  # one model, two servers, two protocols
    assert lists["sml"] == [i["id"] for i in fleet.world.ranking("sml", USER, 5)]
    assert len(body["fused"]) == 5
    probed = requests.get(f"{url}/readyz?probe=recommenders", timeout=TIMEOUT_S)
    assert probed.status_code == 200, probed.text
    assert probed.json()["probed"]["als-v2"]["ready"] is True


def test_a_real_server_s_malformed_answers_are_each_that_source_s_error(
    started: dict[type[ModelServerProcess], ModelServerProcess], fleet: MockFleet, serve: Serve
) -> None:
    kserve, mlserver = _server(started, KServeProcess), _server(started, MLServerProcess)
    settings = _gateway_settings(
        fleet,
        [
            {"name": "v1", "url": kserve.v1_url("als-broken"), "protocol": "kserve-v1"},
            {"name": "kserve-v2", "url": kserve.v2_url("als-broken"), "protocol": "open-inference"},
            {
                "name": "mlserver-v2",
                "url": mlserver.v2_url("als-broken"),
                "protocol": "open-inference",
            },
            {"name": "no-model", "url": mlserver.v2_url("nope"), "protocol": "open-inference"},
        ],
    )
    url = serve(create_app(settings))

    answer = recommend(url, {"user_id": USER, "resultSize": 4})

    assert answer.status_code == 200, answer.text
    sources = answer.json()["sources"]
    assert sources["sml"]["status"] == "ok"
    assert sources["v1"] == {
        "status": "error",
        "error": "answered kserve-v1 JSON that does not fit: `predictions[0]` is not an object "
        "with an `items` list",
        "latency_ms": sources["v1"]["latency_ms"],
        "attempts": 1,
    }
    for name in ("kserve-v2", "mlserver-v2"):
        assert sources[name]["status"] == "error"
        assert sources[name]["error"] == (
            "answered open-inference JSON that does not fit: output `scores` holds 3 values "
            "and `item_ids` 4"
        )
    assert sources["no-model"]["error"] == "answered HTTP 404"

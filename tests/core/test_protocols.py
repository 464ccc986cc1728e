"""Tests of `gateway.core.protocols` (the bodies sent and the answers read, as pure functions), of
the clients speaking them over a network faked by aioresponses, and of their settings."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import requests

from gateway.config.settings import RecommenderSettings, Settings
from gateway.core.errors import BadRecommenderResponse
from gateway.core.protocols import (
    KSERVE_V1,
    NATIVE,
    AnswerMismatch,
    OpenInference,
    url_problem,
)
from gateway.recommenders.clients import BlockingRecommenderClient, RecommenderClient
from gateway.web.app import create_app
from mock_recommenders import MockFleet
from tests.helpers import ScriptedNetwork, Serve, assert_json_error, closed_port, recommend

NATIVE_BODY = json.dumps({"user_id": "u7", "resultSize": 3, "context": {"page": "home"}}).encode()
OIP = OpenInference()


def tensor(name: str, shape: list[int], datatype: str, data: list[Any]) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def v2_answer(ids: list[Any], scores: list[Any], **fields: Any) -> dict[str, Any]:
    n = len(ids)
    return {
        "model_name": "als",
        "id": "r1",
        "outputs": [
            tensor("item_ids", [1, n], "BYTES", ids),
            tensor("scores", [1, len(scores)], "FP32", scores),
        ],
    } | fields


# --- Bodies -------------------------------------------------------------------------------


def test_native_sends_the_body_as_it_is() -> None:
    assert NATIVE.request_body(NATIVE_BODY, "r1") is NATIVE_BODY


def test_kserve_v1_sends_the_native_body_as_its_one_instance() -> None:
    sent = json.loads(KSERVE_V1.request_body(NATIVE_BODY, "r1"))

    assert sent == {"instances": [json.loads(NATIVE_BODY)]}


def test_open_inference_sends_typed_tensors_and_the_request_id() -> None:
    sent = json.loads(OIP.request_body(NATIVE_BODY, "r1"))

    assert sent == {
        "id": "r1",
        "inputs": [
            tensor("user_id", [1], "BYTES", ["u7"]),
            tensor("result_size", [1], "INT32", [3]),
        ],
    }


def test_open_inference_leaves_the_user_out_when_the_request_has_none() -> None:
    sent = json.loads(OIP.request_body(json.dumps({"resultSize": 5}).encode(), None))

    assert sent == {"inputs": [tensor("result_size", [1], "INT32", [5])]}


def test_open_inference_names_its_tensors_and_parameters_as_configured() -> None:
    protocol = OpenInference("uid", "k", "ids", "probs", {"exclude_seen": True})

    sent = json.loads(protocol.request_body(NATIVE_BODY, "r1"))

    assert [t["name"] for t in sent["inputs"]] == ["uid", "k"]
    assert sent["parameters"] == {"exclude_seen": True}
    answer = {
        "outputs": [tensor("ids", [2], "BYTES", ["a", "b"]), tensor("probs", [2], "FP64", [2, 1])]
    }
    assert protocol.native_answer(answer) == {
        "items": [{"id": "a", "score": 2.0}, {"id": "b", "score": 1.0}]
    }


# --- Answers that fit ---------------------------------------------------------------------


def test_kserve_v1_reads_the_one_prediction_as_a_native_answer() -> None:
    prediction = {"items": [{"id": "i1", "score": 0.5}], "model": "x"}

    assert KSERVE_V1.native_answer({"predictions": [prediction]}) == prediction


def test_open_inference_reads_items_in_the_order_given() -> None:
    native = OIP.native_answer(v2_answer(["i3", "i1"], [0.9, 0.4], model_version="2"))

    assert native == {
        "items": [{"id": "i3", "score": 0.9}, {"id": "i1", "score": 0.4}],
        "model_name": "als",
        "model_version": "2",
    }


@pytest.mark.parametrize(
    ("shape", "data"),
    [([2], ["a", "b"]), ([1, 2], ["a", "b"]), ([1, 2], [["a", "b"]])],
    ids=["[n]", "[1, n] flat", "[1, n] nested"],
)
def test_open_inference_reads_shapes_n_and_1_by_n_flat_or_nested(
    shape: list[int], data: list[Any]
) -> None:
    answer = {
        "outputs": [
            tensor("item_ids", shape, "BYTES", data),
            tensor("scores", [2], "FP64", [1.0, 0.5]),
        ]
    }

    assert [i["id"] for i in OIP.native_answer(answer)["items"]] == ["a", "b"]


def test_open_inference_reads_integer_ids_as_text() -> None:
    answer = {
        "outputs": [
            tensor("item_ids", [2], "INT64", [17, 4]),
            tensor("scores", [2], "FP16", [1, 0.5]),
        ]
    }

    assert OIP.native_answer(answer)["items"] == [
        {"id": "17", "score": 1.0},
        {"id": "4", "score": 0.5},
    ]


def test_an_empty_answer_is_an_empty_list() -> None:
    assert OIP.native_answer(v2_answer([], []))["items"] == []


# --- Answers that do not fit ---------------------------------------------------------------


def with_output(name: str, **changes: Any) -> dict[str, Any]:
    answer = v2_answer(["a", "b"], [0.9, 0.8])
    for output in answer["outputs"]:
        if output["name"] == name:
            output.update(changes)
    return answer


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ([], "the answer is not a JSON object"),
        ({"model_name": "als"}, "the answer has no `outputs` list"),
        (
            {"outputs": [tensor("scores", [1], "FP32", [1.0])]},
            "output `item_ids` is missing (outputs: `scores`)",
        ),
        (
            {"outputs": [tensor("item_ids", [1], "BYTES", ["a"])]},
            "output `scores` is missing (outputs: `item_ids`)",
        ),
        (
            v2_answer(["a", "b"], [0.9]),
            "output `scores` holds 1 values and `item_ids` 2",
        ),
        (
            with_output("item_ids", shape=[1, 3]),
            "output `item_ids` has shape [1, 3] but 2 values",
        ),
        (
            with_output("item_ids", shape=[2, 1]),
            "output `item_ids` has shape [2, 1], not [n] or [1, n]",
        ),
        (
            with_output("item_ids", shape=[1, 1, 2]),
            "output `item_ids` has shape [1, 1, 2], not [n] or [1, n]",
        ),
        (
            with_output("item_ids", shape="2"),
            'output `item_ids` has shape "2", not [n] or [1, n]',
        ),
        (
            with_output("scores", datatype="BYTES"),
            'output `scores` has datatype "BYTES", not FP16 or FP32 or FP64',
        ),
        (
            with_output("item_ids", datatype="FP32"),
            'output `item_ids` has datatype "FP32", not BYTES or integer',
        ),
        (with_output("item_ids", data="ab"), "output `item_ids` has no `data` list"),
        (
            with_output("item_ids", data=["a", 2]),
            "output `item_ids` holds a int at 1, not a string",
        ),
        (
            with_output("item_ids", datatype="INT32", data=[1, "2"]),
            "output `item_ids` (INT32) holds a str at 1, not an integer",
        ),
        (
            with_output("scores", data=[0.5, "high"]),
            'output `scores` holds "high" at 1, not a finite number',
        ),
        (
            with_output("scores", data=[0.5, math.inf]),
            "output `scores` holds Infinity at 1, not a finite number",
        ),
        (
            with_output("scores", data=[True, 0.5]),
            "output `scores` holds bool at 0, not a finite number",
        ),
        (
            {"outputs": [*v2_answer(["a"], [1.0])["outputs"], tensor("scores", [1], "FP32", [2])]},
            "output `scores` appears 2 times",
        ),
    ],
)
def test_an_open_inference_answer_that_does_not_fit_says_what_is_wrong(
    answer: Any, reason: str
) -> None:
    with pytest.raises(AnswerMismatch) as refused:
        OIP.native_answer(answer)

    assert str(refused.value) == reason


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("x", "the answer is not a JSON object"),
        ({"items": []}, "the answer has no `predictions` list"),
        ({"predictions": []}, "`predictions` holds 0 answers for the 1 instance sent"),
        ({"predictions": [{}, {}]}, "`predictions` holds 2 answers for the 1 instance sent"),
        ({"predictions": [[1, 2]]}, "`predictions[0]` is not an object with an `items` list"),
        (
            {"predictions": [{"items": "not a list"}]},
            "`predictions[0]` is not an object with an `items` list",
        ),
    ],
)
def test_a_kserve_v1_answer_that_does_not_fit_says_what_is_wrong(answer: Any, reason: str) -> None:
    with pytest.raises(AnswerMismatch) as refused:
        KSERVE_V1.native_answer(answer)

    assert str(refused.value) == reason


# --- URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "url", "ready"),
    [
        ("kserve-v1", "http://h:8080/v1/models/als:predict", "http://h:8080/v1/models/als"),
        (
            "open-inference",
            "http://h/serving/v2/models/als/infer",
            "http://h/serving/v2/models/als/ready",
        ),
        (
            "open-inference",
            "https://h/v2/models/als/versions/3/infer",
            "https://h/v2/models/als/versions/3/ready",
        ),
    ],
)
def test_each_protocol_knows_where_its_server_says_it_is_ready(
    protocol: str, url: str, ready: str
) -> None:
    settings = RecommenderSettings(name="m", url=url, protocol=protocol)

    assert settings.readiness_urls() == [ready]


def test_a_native_recommender_has_no_readiness_url_unless_given_one() -> None:
    plain = RecommenderSettings(name="m", url="http://h/test")
    given = RecommenderSettings(
        name="m",
        url="http://h/test",
        ready_url="http://h/healthz",
    )

    assert plain.readiness_urls() == []
    assert given.readiness_urls() == ["http://h/healthz"]


@pytest.mark.parametrize(
    ("protocol", "url", "problem"),
    [
        ("kserve-v1", "http://h/v2/models/als/infer", "must end in /v1/models/<model>:predict"),
        ("kserve-v1", "http://h/v1/models/als", "must end in /v1/models/<model>:predict"),
        (
            "open-inference",
            "http://h/v1/models/als:predict",
            "must end in /v2/models/<model>/infer",
        ),
        ("open-inference", "http://h/v2/models/als", "must end in /v2/models/<model>/infer"),
    ],
)
def test_a_url_that_is_not_its_protocol_s_is_refused_in_the_settings(
    protocol: str, url: str, problem: str
) -> None:
    assert problem in (url_problem(protocol, url) or "")
    with pytest.raises(ValueError, match=problem.replace("<", ".").replace(">", ".")):
        RecommenderSettings(name="m", url=url, protocol=protocol)


def test_tensor_names_belong_to_open_inference_only() -> None:
    with pytest.raises(ValueError, match="`open_inference` applies to protocol open-inference"):
        RecommenderSettings.model_validate(
            {"name": "m", "url": "http://h/test", "open_inference": {"user_input": "uid"}}
        )


# --- Over the clients -----------------------------------------------------------------------

V2_URL = "http://models.test/v2/models/als/infer"


def v2_client(network: ScriptedNetwork) -> RecommenderClient:
    return RecommenderClient(
        "als", V2_URL, network.session, timeout_s=1.0, protocol=OpenInference()
    )


async def test_the_async_client_speaks_open_inference(network: ScriptedNetwork) -> None:
    network.add(V2_URL, payload=v2_answer(["i9", "i2"], [0.7, 0.1]))

    prediction = await v2_client(network).recommend(NATIVE_BODY, {"X-Request-ID": "r42"})

    assert prediction["items"] == [{"id": "i9", "score": 0.7}, {"id": "i2", "score": 0.1}]
    [(url, sent, _)] = network.calls
    assert url == V2_URL
    assert json.loads(sent)["id"] == "r42"
    assert json.loads(sent)["inputs"][0]["data"] == ["u7"]


async def test_an_answer_that_does_not_fit_is_that_recommender_s_error(
    network: ScriptedNetwork,
) -> None:
    network.add(V2_URL, payload=v2_answer(["i9", "i2"], [0.7]))

    with pytest.raises(BadRecommenderResponse) as refused:
        await v2_client(network).recommend(NATIVE_BODY, {})

    assert refused.value.reason == (
        "answered open-inference JSON that does not fit: output `scores` holds 1 values and "
        "`item_ids` 2"
    )
    assert not refused.value.retryable


async def test_more_items_than_max_items_is_an_error_whatever_the_protocol(
    network: ScriptedNetwork,
) -> None:
    from gateway.recommenders.clients import AnswerLimits

    ids = [f"i{n}" for n in range(6)]
    network.add(V2_URL, payload=v2_answer(ids, [1.0] * 6))

    with pytest.raises(BadRecommenderResponse, match="answered 6 items, above the limit of 5"):
        await v2_client(network).recommend(NATIVE_BODY, {}, limits=AnswerLimits(max_items=5))


def test_the_blocking_client_speaks_kserve_v1(fleet: MockFleet) -> None:
    from gateway.recommenders.blocking_http import ThreadSessions

    url = fleet.url("sml").replace("/test", "/v1/models/sml:predict")
    sessions = ThreadSessions()
    try:
        client = BlockingRecommenderClient("sml", url, sessions, 2.0, protocol=KSERVE_V1)
        prediction = client.recommend(NATIVE_BODY, {"X-Request-ID": "r1"})
    finally:
        sessions.close()

    assert len(prediction["items"]) == 3
    last = fleet.last_request("sml")
    assert last is not None
    received = last["received"]
    assert received == {"instances": [json.loads(NATIVE_BODY)]}


# --- Through the gateway, over real HTTP ----------------------------------------------------


def mixed_settings(fleet: MockFleet, **fields: Any) -> Settings:
    """`sml` native, `asc` over KServe V1 and `trd` over Open Inference: one mock fleet."""
    recommenders = [
        {"name": "sml", "url": fleet.url("sml")},
        {
            "name": "asc",
            "url": f"{fleet.url('asc').removesuffix('/test')}/v1/models/asc:predict",
            "protocol": "kserve-v1",
        },
        {
            "name": "trd",
            "url": f"{fleet.url('trd').removesuffix('/test')}/v2/models/trd/infer",
            "protocol": "open-inference",
        },
    ]
    fields.setdefault("admission", {"adaptive": False})
    return Settings.model_validate({"recommenders": recommenders, **fields})


@pytest.mark.parametrize("strategy", ["async", "threads", "sequential"])
def test_the_gateway_fans_out_to_each_protocol_at_once(
    fleet: MockFleet, serve: Serve, strategy: str
) -> None:
    url = serve(create_app(mixed_settings(fleet, strategy=strategy)))

    answer = recommend(url, {"user_id": "u5", "resultSize": 4}, headers={"X-Request-ID": "rq1"})

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert {name: s["status"] for name, s in body["sources"].items()} == {
        "sml": "ok",
        "asc": "ok",
        "trd": "ok",
    }
    world = fleet.world
    for source in body["result"]:
        expected = [item["id"] for item in world.ranking(source["name"], "u5", 4)]
        assert [item["id"] for item in source["prediction"]["items"]] == expected
    assert len(body["fused"]) == 4
    assert fleet.last_request("asc")["received"] == {  # type: ignore[index]
        "instances": [{"user_id": "u5", "resultSize": 4}]
    }
    oip = fleet.last_request("trd")["received"]  # type: ignore[index]
    assert oip["id"] == "rq1"
    assert oip["inputs"][0] == tensor("user_id", [1], "BYTES", ["u5"])


def test_a_misfit_answer_from_one_protocol_leaves_the_others_served(
    fleet: MockFleet, serve: Serve
) -> None:
    # The Open Inference mock answers plain text: not JSON, that source's error only.
    fleet.set_behaviour("trd", not_json=True)
    url = serve(create_app(mixed_settings(fleet)))

    answer = recommend(url, {"user_id": "u5", "resultSize": 4})

    assert answer.status_code == 200
    sources = answer.json()["sources"]
    assert sources["trd"]["status"] == "error"
    assert sources["trd"]["error"] == "answered a body that is not JSON"
    assert sources["sml"]["status"] == sources["asc"]["status"] == "ok"


def test_readyz_asks_each_model_server_in_its_protocol_when_told_to(
    fleet: MockFleet, serve: Serve
) -> None:
    url = serve(create_app(mixed_settings(fleet)))

    plain = requests.get(f"{url}/readyz", timeout=10)
    probed = requests.get(f"{url}/readyz?probe=recommenders", timeout=10)

    assert plain.status_code == 200
    assert "probed" not in plain.json()
    assert probed.status_code == 200, probed.text
    shown = probed.json()["probed"]
    assert shown["sml"] == {"protocol": "native", "probed": False}
    asc_base = fleet.url("asc").removesuffix("/test")
    assert shown["asc"] == {
        "protocol": "kserve-v1",
        "probed": True,
        "ready": True,
        "replicas": [{"url": f"{asc_base}/v1/models/asc", "ready": True, "status": 200}],
    }
    assert shown["trd"]["replicas"][0]["url"].endswith("/v2/models/trd/ready")


def test_readyz_names_the_model_servers_not_ready_and_why(fleet: MockFleet, serve: Serve) -> None:
    settings = mixed_settings(fleet, readiness={"probe_recommenders": True, "timeout_ms": 2000})
    with closed_port() as port:
        gone = f"http://127.0.0.1:{port}/v2/models/trd/infer"
        wrong_model = fleet.url("asc").replace("/test", "/v1/models/other:predict")
        recommenders = [
            settings.recommenders[0].model_copy(update={"ready_url": fleet.url("sml")}),
            settings.recommenders[1].model_copy(update={"url": wrong_model}),
            settings.recommenders[2].model_copy(update={"url": gone}),
        ]
        url = serve(create_app(settings.model_copy(update={"recommenders": recommenders})))

        answer = requests.get(f"{url}/readyz", timeout=10)

    body = assert_json_error(answer, 503, "recommenders not ready")
    message = body["error"]["message"]
    assert f"sml (GET {fleet.url('sml')}: HTTP 405)" in message  # /test takes POST only
    assert "asc (GET " in message and "/v1/models/other: HTTP 404)" in message
    assert f"trd (GET http://127.0.0.1:{port}/v2/models/trd/ready: cannot connect: " in message
    assert "Connection refused" in message
    assert body["error"]["recommenders"]["trd"]["ready"] is False


def test_readyz_refuses_a_probe_it_does_not_know(fleet: MockFleet, serve: Serve) -> None:
    url = serve(create_app(mixed_settings(fleet)))

    answer = requests.get(f"{url}/readyz?probe=everything", timeout=10)

    assert_json_error(answer, 400, "unknown probe 'everything'", "recommenders")


# --- Headers of one's own -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"Seldon Model": "x"}, "is not an HTTP token"),
        ({"X-Request-ID": "fixed"}, "is the gateway's own"),
        ({"content-type": "text/plain"}, "is the gateway's own"),
        ({"Seldon-Model": "a\r\nInjected: yes"}, "must be visible ASCII"),
    ],
)
def test_headers_of_ones_own_must_be_sendable_and_not_the_gateways(
    headers: dict[str, str], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        RecommenderSettings.model_validate(
            {"name": "m", "url": "http://h/test", "headers": headers}
        )


def test_a_recommender_s_headers_go_with_every_call(fleet: MockFleet, serve: Serve) -> None:
    settings = mixed_settings(fleet)
    routed = settings.recommenders[2].model_copy(update={"headers": {"Seldon-Model": "trd"}})
    recommenders = [*settings.recommenders[:2], routed]
    url = serve(create_app(settings.model_copy(update={"recommenders": recommenders})))

    answer = recommend(url, {"user_id": "u5", "resultSize": 2}, headers={"X-Request-ID": "own"})
    ready = requests.get(f"{url}/readyz?probe=recommenders", timeout=10)

    assert answer.status_code == 200 and ready.status_code == 200
    sent = fleet.last_request("trd")
    assert sent is not None
    assert sent["headers"]["seldon-model"] == "trd"
    assert sent["headers"]["x-request-id"] == "own"  # the gateway's own stay its own
    assert "seldon-model" not in fleet.last_request("asc")["headers"]  # type: ignore[index]

"""The API contract: the OpenAPI document, Swagger UI offline, and schemathesis against the app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import positive_data_acceptance

from gateway.web.app import create_app
from mock_recommenders import MockFleet
from tests.helpers import Serve, settings_for


def spec_of(url: str) -> dict[str, Any]:
    response = requests.get(f"{url}/openapi.json", timeout=30)
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def test_the_spec_is_openapi_3_1_from_the_models(gateway_url: str) -> None:
    spec = spec_of(gateway_url)

    assert spec["openapi"] == "3.1.0"
    request = spec["components"]["schemas"]["RecommendationRequest"]
    assert (
        request["properties"]["resultSize"] | {"minimum": 1, "maximum": 100}
        == request["properties"]["resultSize"]
    )
    # An optional string, as pydantic writes it: `anyOf` a string and null today; JSON Schema
    # lets another version write `"type": ["string", "null"]` with the same limit.
    user_id = request["properties"]["user_id"]
    assert 256 in [schema.get("maxLength") for schema in [user_id, *user_id.get("anyOf", [])]]
    assert request["examples"][0]["user_id"] == "u1"
    operation = spec["paths"]["/recommendation"]["post"]
    assert set(operation["responses"]) == {"200", "400", "401", "413", "422", "500", "502", "503"}
    assert "security" not in operation  # no keys configured


def test_the_spec_says_when_a_token_is_needed(fleet: MockFleet, serve: Serve) -> None:
    url = serve(create_app(settings_for(fleet, api_keys=["k"])))

    paths = spec_of(url)["paths"]

    # /experiments too: what it shows is business data, whatever `metrics_require_token` says.
    for path, method in (
        ("/recommendation", "post"),
        ("/feedback", "post"),
        ("/experiments", "get"),
    ):
        assert paths[path][method]["security"] == [{"apiToken": []}], path
    assert "security" not in paths["/metrics"]["get"]


def test_swagger_ui_is_served_without_a_cdn(gateway_url: str) -> None:
    page = requests.get(f"{gateway_url}/docs", timeout=30)

    assert page.status_code == 200
    assert 'src="/docs/swagger-ui-bundle.js"' in page.text
    assert "http" not in page.text.split("<body>")[1].replace('url: "/openapi.json"', "")
    script = requests.get(f"{gateway_url}/docs/swagger-ui-bundle.js", timeout=30)
    assert script.status_code == 200
    assert "javascript" in script.headers["Content-Type"]
    assert len(script.content) > 100_000
    assert requests.get(f"{gateway_url}/docs/nope.js", timeout=30).status_code == 404


@pytest.mark.slow
def test_the_live_app_keeps_its_contract(fleet: MockFleet, serve: Serve, tmp_path: Path) -> None:
    """schemathesis, from the app's own spec: no 5xx, and every response as documented.

    Loading the spec also checks it: schemathesis refuses a document that is not OpenAPI.
    Feedback is on, so that `/feedback` and `/experiments` answer more than their 404.
    """
    feedback = {"store": f"sqlite:///{tmp_path / 'feedback.db'}", "salt": "s", "max_events": 5}
    gateway_url = serve(create_app(settings_for(fleet, feedback=feedback)))
    # Each operation as a hypothesis strategy, in a plain test: schemathesis' pytest plugin
    # does not run under pytest 9 (it reads a private attribute pytest no longer has).
    api = schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")
    # An operation schemathesis cannot load (an Err) is missing from the paths asserted below.
    operations = [r.ok() for r in api.get_all_operations() if isinstance(r, Ok)]
    assert {operation.path for operation in operations} == {
        "/recommendation",
        "/feedback",
        "/experiments",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    for operation in operations:
        # A /feedback event that fits the schema is refused 422 when the answer it names did
        # not show the item: a fact of the store no schema can express (documented as 422).
        conforms(operation, [positive_data_acceptance] if operation.path == "/feedback" else [])


def conforms(operation: Any, excluded_checks: list[Any]) -> None:
    """40 cases of `operation`, each answered as documented (but for `excluded_checks`)."""

    @given(case=operation.as_strategy())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        case.call_and_validate(excluded_checks=excluded_checks)

    check()

"""API tokens: when keys are configured, /recommendation needs one; health stays open."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest
import requests

from gateway.config.settings import load_settings
from gateway.contract.security import TokenCheck
from gateway.web.app import create_app
from mock_recommenders import DEFAULT_NAMES, MockFleet
from tests.helpers import Serve, settings_for


@pytest.fixture
def guarded(fleet: MockFleet, serve: Serve) -> str:
    return serve(create_app(settings_for(fleet, api_keys=["k-one", "k-two"])))


def post(url: str, **headers: str) -> requests.Response:
    return requests.post(f"{url}/recommendation", json={}, headers=headers, timeout=30)


def test_a_missing_token_is_401_and_calls_nobody(fleet: MockFleet, guarded: str) -> None:
    response = post(guarded)

    assert response.status_code == 401
    assert response.json()["error"]["message"] == "missing X-Api-Token header"
    assert response.headers["WWW-Authenticate"] == 'ApiKey header="X-Api-Token"'
    assert fleet.stats("sml")["requests"] == 0


@pytest.mark.parametrize("token", ["wrong", "k-on", "k-one1", "k-o ne", "k-one\tx", "", "K-ONE"])
def test_a_wrong_token_is_401(guarded: str, token: str) -> None:
    response = post(guarded, **{"X-Api-Token": token})

    assert response.status_code == 401
    assert response.json()["error"]["message"] == "invalid API token in X-Api-Token"


@pytest.mark.parametrize("value", ["k-one ", " k-one", "\tk-one\t", "  k-two \t "])
def test_whitespace_around_the_token_is_not_part_of_it(guarded: str, value: str) -> None:
    # RFC 9110 section 5.5: optional whitespace around a field value is not part of it. Sent
    # with http.client, which puts the value on the wire as given (requests refuses a leading
    # space), so whatever the HTTP parser keeps of it, the gateway must not count it.
    host, port = urlsplit(guarded).hostname, urlsplit(guarded).port
    connection = http.client.HTTPConnection(host or "", port, timeout=30)
    try:
        connection.request(
            "POST",
            "/recommendation",
            body=b"{}",
            headers={"Content-Type": "application/json", "X-Api-Token": value},
        )
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()

    assert response.status == 200, body
    assert body["complete"] is True


def test_the_check_takes_no_whitespace_around_a_token_as_part_of_it() -> None:
    from pydantic import SecretStr

    check = TokenCheck([SecretStr("k-one")])

    assert check.allows(" k-one\t")
    assert not check.allows("k-one\u00a0")  # no-break space is not whitespace to HTTP
    assert not check.allows("k- one")


@pytest.mark.parametrize("token", ["k-one", "k-two"])
def test_any_configured_token_is_let_through(guarded: str, token: str) -> None:
    assert post(guarded, **{"X-Api-Token": token}).status_code == 200


def test_health_stays_open(guarded: str) -> None:
    assert requests.get(f"{guarded}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{guarded}/readyz", timeout=30).status_code == 200


def test_without_keys_nothing_is_asked(gateway_url: str) -> None:
    assert post(gateway_url).status_code == 200


def test_keys_come_comma_separated_from_the_environment(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    clean_environment.setenv("GATEWAY_API_KEYS", " a1 ,b2 ")

    keys = load_settings().api_keys

    assert [key.get_secret_value() for key in keys] == ["a1", "b2"]
    assert "a1" not in repr(keys)  # secrets stay out of logs and reprs


def test_the_check_compares_every_key() -> None:
    from pydantic import SecretStr

    check = TokenCheck([SecretStr("alpha"), SecretStr("beta")])

    assert check.enabled
    assert check.allows("beta")
    assert not check.allows("gamma")
    assert not TokenCheck([]).enabled


@pytest.mark.parametrize(("required", "without_token"), [(True, 401), (False, 200)])
def test_metrics_need_a_token_only_when_configured(
    fleet: MockFleet, serve: Serve, required: bool, without_token: int
) -> None:
    settings = settings_for(fleet, api_keys=["k"], metrics_require_token=required)
    url = serve(create_app(settings))

    assert requests.get(f"{url}/metrics", timeout=30).status_code == without_token
    headers = {"X-Api-Token": "k"}
    assert requests.get(f"{url}/metrics", headers=headers, timeout=30).status_code == 200


def test_nothing_in_a_request_chooses_where_the_gateway_calls(
    fleet: MockFleet, gateway_url: str
) -> None:
    elsewhere = "http://127.0.0.1:9/steal"
    body = {
        "url": elsewhere,
        "urls": [elsewhere],
        "recommenders": [{"name": "x", "url": elsewhere}],
    }
    headers = {"Host": "127.0.0.1:9", "X-Forwarded-Host": "127.0.0.1:9"}

    response = requests.post(
        f"{gateway_url}/recommendation", json=body, headers=headers, timeout=30
    )

    assert response.status_code == 200
    assert response.json()["complete"] is True  # the configured recommenders, every one
    assert {fleet.stats(name)["requests"] for name in DEFAULT_NAMES} == {1}
    seen = fleet.last_request("sml")
    assert seen is not None and seen["body"]["url"] == elsewhere  # passed through, not followed

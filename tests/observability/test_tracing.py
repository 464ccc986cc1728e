"""Tests of `gateway.observability.tracing` and `gateway.observability.otel`: the span tree of a
request, as exported."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from gateway.config.settings import Settings
from gateway.core.errors import ConfigError
from gateway.observability.tracing import INSTALL_HINT, NO_TRACING, start_tracing, switched_on
from gateway.web.app import GatewayFlask, create_app
from mock_recommenders import DEFAULT_NAMES, MockFleet
from tests.helpers import ROOT, Serve, settings_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def second_psn() -> Iterator[MockFleet]:
    """A second replica of `psn`: same rankings, another port."""
    with MockFleet(("psn",)) as replica:
        yield replica


def traced(settings: Settings) -> Settings:
    tracing = settings.tracing.model_copy(update={"enabled": True})
    return settings.model_copy(update={"tracing": tracing})


def traced_app(settings: Settings) -> tuple[GatewayFlask, InMemorySpanExporter]:
    """The app with tracing on, each span exported in memory as it ends."""
    exporter = InMemorySpanExporter()
    return create_app(traced(settings), span_processor=SimpleSpanProcessor(exporter)), exporter


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name == name), key=lambda s: s.start_time or 0)


def span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format_span_id(span.context.span_id)


def parent_id(span: ReadableSpan) -> str | None:
    return format_span_id(span.parent.span_id) if span.parent is not None else None


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def traceparent_received(fleet: MockFleet, name: str) -> str:
    last = fleet.last_request(name)
    assert last is not None
    traceparent: str = last["headers"]["traceparent"]
    return traceparent


def test_the_span_tree_of_a_request_with_a_timeout_a_retry_a_hedge_and_an_open_circuit(
    fleet: MockFleet, second_psn: MockFleet, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(fleet, deadline_ms=5000, hedging={"max_extra_ratio": 1.0})
    data = settings.model_dump(mode="json")
    data["recommenders"][2]["timeout_ms"] = 200  # trd
    psn = data["recommenders"][3]
    psn["urls"] = [second_psn.url("psn")]
    psn["hedge_after_ms"] = 40
    app, exporter = traced_app(Settings.model_validate(data))
    url = serve(app)
    for _ in range(5):  # the default threshold: sml's breaker opens
        app.runtime.guards["sml"].breaker.failed()
    fleet.set_behaviour("asc", fail_first=1, error_status=503)  # retried
    fleet.set_behaviour("trd", delay_ms=3000)  # times out after its 200 ms
    fleet.set_behaviour("psn", hang=True)  # its first replica: hedged to the second

    with caplog.at_level(logging.INFO, logger="gateway.access"):
        response = requests.post(
            f"{url}/recommendation",
            json={"user_id": "u1", "resultSize": 3},
            headers={"traceparent": TRACEPARENT, "X-Request-ID": "traced-1"},
            timeout=10,
        )
    assert response.status_code == 200
    sources = response.json()["sources"]
    assert {name: s["status"] for name, s in sources.items()} == {
        "sml": "circuit_open",
        "asc": "ok",
        "trd": "timeout",
        "psn": "ok",
    }

    spans = exporter.get_finished_spans()
    # Every span is in the frontend's trace.
    assert {format_trace_id(s.context.trace_id) for s in spans if s.context} == {TRACE_ID}
    (server,) = by_name(spans, "POST /recommendation")
    assert server.kind == SpanKind.SERVER
    assert parent_id(server) == PARENT_ID
    assert attributes(server) | {"gateway.coverage": None} == {
        "http.request.method": "POST",
        "http.route": "/recommendation",
        "url.path": "/recommendation",
        "gateway.request_id": "traced-1",
        "http.response.status_code": 200,
        "gateway.complete": False,
        "gateway.coverage": None,
        "gateway.fusion": "rrf",
    }
    assert attributes(server)["gateway.coverage"] == pytest.approx(0.5)

    calls = {attributes(s)["gateway.recommender"]: s for s in spans if s.name.startswith("rec")}
    assert set(calls) == set(DEFAULT_NAMES)
    for call in calls.values():
        assert call.kind == SpanKind.INTERNAL
        assert parent_id(call) == span_id(server)
    attempts = {name: by_name(spans, f"POST {name}") for name in DEFAULT_NAMES}
    for name, tries in attempts.items():
        for attempt in tries:
            assert attempt.kind == SpanKind.CLIENT
            assert parent_id(attempt) == span_id(calls[name]), name

    # The open circuit: a call span that called nobody.
    assert attempts["sml"] == []
    assert attributes(calls["sml"])["gateway.call.status"] == "circuit_open"
    assert calls["sml"].status.status_code == StatusCode.ERROR
    assert "circuit open" in (calls["sml"].status.description or "")

    # The retry: a failed attempt, then its resend, whose context the mock received.
    first, retry = attempts["asc"]
    assert attributes(first)["http.response.status_code"] == 503
    assert attributes(first)["error.type"] == "503"
    assert first.status.status_code == StatusCode.ERROR
    assert "http.request.resend_count" not in attributes(first)
    assert attributes(retry)["http.request.resend_count"] == 1
    assert attributes(retry)["http.response.status_code"] == 200
    assert attributes(retry)["url.full"] == fleet.url("asc")
    assert attributes(calls["asc"]) | {} == {
        "gateway.recommender": "asc",
        "gateway.call.status": "ok",
        "gateway.call.attempts": 2,
    }
    assert traceparent_received(fleet, "asc") == f"00-{TRACE_ID}-{span_id(retry)}-01"

    # The timeout.
    (late,) = attempts["trd"]
    assert attributes(late)["error.type"] == "RecommenderTimeout"
    assert late.status.status_code == StatusCode.ERROR
    assert "no answer within 200 ms" in (late.status.description or "")
    assert attributes(calls["trd"])["gateway.call.status"] == "timeout"
    assert traceparent_received(fleet, "trd") == f"00-{TRACE_ID}-{span_id(late)}-01"

    # The hedge: the slow replica's attempt, cancelled when the hedge to the other answered.
    slow, hedge = attempts["psn"]
    assert attributes(slow)["url.full"] == fleet.url("psn")
    assert attributes(slow)["gateway.attempt.cancelled"] is True
    assert attributes(hedge)["gateway.attempt.hedge"] is True
    assert attributes(hedge)["url.full"] == second_psn.url("psn")
    assert attributes(hedge)["server.address"] == "127.0.0.1"
    assert attributes(hedge)["http.response.status_code"] == 200
    assert traceparent_received(fleet, "psn") == f"00-{TRACE_ID}-{span_id(slow)}-01"
    assert traceparent_received(second_psn, "psn") == f"00-{TRACE_ID}-{span_id(hedge)}-01"

    (line,) = [r for r in caplog.records if getattr(r, "request_id", None) == "traced-1"]
    assert getattr(line, "trace_id", None) == TRACE_ID


def test_a_502_names_its_trace_and_a_new_trace_starts_without_traceparent(
    fleet: MockFleet, serve: Serve
) -> None:
    app, exporter = traced_app(settings_for(fleet))
    url = serve(app)
    fleet.set_behaviour(status=500)

    response = requests.post(f"{url}/recommendation", json={"user_id": "u1"}, timeout=10)

    assert response.status_code == 502
    body = response.json()
    (server,) = by_name(exporter.get_finished_spans(), "POST /recommendation")
    assert server.context is not None and server.parent is None
    assert body["trace_id"] == format_trace_id(server.context.trace_id)
    assert server.status.status_code == StatusCode.ERROR
    assert attributes(server)["http.response.status_code"] == 502


def test_an_unsampled_request_records_nothing_and_passes_its_decision_on(
    fleet: MockFleet, serve: Serve
) -> None:
    app, exporter = traced_app(settings_for(fleet))
    url = serve(app)
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"  # the frontend chose not to sample

    response = requests.post(
        f"{url}/recommendation", json={}, headers={"traceparent": unsampled}, timeout=10
    )

    assert response.status_code == 200
    assert exporter.get_finished_spans() == ()
    # The same trace, not sampled: the recommenders are told so, and keep to it.
    version, trace_id, _, flags = traceparent_received(fleet, "trd").split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "00")


def test_a_4xx_is_traced_but_not_an_error(fleet: MockFleet, serve: Serve) -> None:
    app, exporter = traced_app(settings_for(fleet))
    url = serve(app)

    response = requests.post(f"{url}/recommendation", json={"resultSize": 0}, timeout=10)

    assert response.status_code == 422
    (server,) = by_name(exporter.get_finished_spans(), "POST /recommendation")
    assert server.status.status_code == StatusCode.UNSET
    assert attributes(server)["http.response.status_code"] == 422


def test_the_wsgi_design_and_the_threads_strategy_keep_the_tree(
    fleet: MockFleet, serve_wsgi: Serve
) -> None:
    app, exporter = traced_app(settings_for(fleet, strategy="threads"))
    url = serve_wsgi(app)

    response = requests.post(
        f"{url}/recommendation", json={}, headers={"traceparent": TRACEPARENT}, timeout=10
    )

    assert response.status_code == 200
    spans = exporter.get_finished_spans()
    (server,) = by_name(spans, "POST /recommendation")
    assert parent_id(server) == PARENT_ID
    calls = [s for s in spans if s.name.startswith("recommender ")]
    attempts = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert len(calls) == len(attempts) == 4
    assert {parent_id(c) for c in calls} == {span_id(server)}
    assert {parent_id(a) for a in attempts} == {span_id(c) for c in calls}
    assert traceparent_received(fleet, "sml").startswith(f"00-{TRACE_ID}-")


# --- Switching it on -----------------------------------------------------------------------


def test_tracing_is_switched_on_by_the_config_or_an_otlp_endpoint_and_off_by_the_sdk_flag(
    fleet: MockFleet,
) -> None:
    off = settings_for(fleet).tracing
    on = traced(settings_for(fleet)).tracing
    assert not switched_on(off, {})
    assert switched_on(on, {})
    assert switched_on(off, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert switched_on(off, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert not switched_on(on, {"OTEL_SDK_DISABLED": "true"})
    assert start_tracing(off) is NO_TRACING


def test_the_standard_variables_win_over_the_config(
    fleet: MockFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-eu")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    processor = SimpleSpanProcessor(InMemorySpanExporter())
    tracing = start_tracing(traced(settings_for(fleet)).tracing, processor)
    try:
        provider = tracing.provider  # type: ignore[attr-defined]
        assert provider.resource.attributes["service.name"] == "gateway-eu"
        assert "AlwaysOff" in provider.sampler.get_description()
    finally:
        tracing.shutdown()


def test_a_service_name_in_the_resource_attributes_wins_over_the_config(
    fleet: MockFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=eu,service.name=gw")
    processor = SimpleSpanProcessor(InMemorySpanExporter())
    tracing = start_tracing(traced(settings_for(fleet)).tracing, processor)
    try:
        attributes = tracing.provider.resource.attributes  # type: ignore[attr-defined]
        assert attributes["service.name"] == "gw"
        assert attributes["deployment.environment"] == "eu"
    finally:
        tracing.shutdown()
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES")
    processor = SimpleSpanProcessor(InMemorySpanExporter())
    tracing = start_tracing(traced(settings_for(fleet)).tracing, processor)
    assert tracing.provider.resource.attributes["service.name"] == "fusion-gateway"  # type: ignore[attr-defined]
    tracing.shutdown()


def test_tracing_on_without_the_packages_stops_start_up_naming_the_extra(
    fleet: MockFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if not installed: an import of any of them fails.
    for name in [n for n in sys.modules if n.startswith("opentelemetry")] + ["opentelemetry"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "gateway.observability.otel", raising=False)

    with pytest.raises(ConfigError, match="OpenTelemetry packages are not installed") as caught:
        create_app(traced(settings_for(fleet)))
    assert INSTALL_HINT in str(caught.value)


_OFF = """
import sys, requests
from gateway.web.app import create_app
from mock_recommenders import MockFleet
from tests.helpers import InProcessServer, settings_for

with MockFleet() as fleet:
    server = InProcessServer(create_app(settings_for(fleet))).start()
    try:
        response = requests.post(server.url + "/recommendation", json={}, timeout=10)
        assert response.status_code == 200, response.text
    finally:
        server.stop()
print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
"""


def test_tracing_off_imports_no_opentelemetry_module() -> None:
    # In a fresh interpreter: this one has imported them for the tests above.
    result = subprocess.run(
        [sys.executable, "-c", _OFF], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"')) == []

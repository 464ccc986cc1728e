"""End-to-end tracing: a gunicorn-served gateway, 2 workers, exporting OTLP/HTTP to a receiver.

The receiver (`benchmarks.harness.otlpsink`) decodes each export with `opentelemetry-proto`. The
exporter batches (every 5 s by default): the spans of the last requests arrive only because
each worker flushes its provider on the graceful stop that SIGTERM starts.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from benchmarks.harness.otlpsink import OtlpSink
from mock_recommenders import MockFleet
from tests.helpers import (
    GUNICORN,
    ROOT,
    gateway_environment,
    gunicorn,
    lines,
    post_concurrently,
    until_every_worker_served,
)

pytestmark = pytest.mark.slow


def _value(attribute: Any) -> Any:
    kind = attribute.value.WhichOneof("value")
    return getattr(attribute.value, kind) if kind else None


def test_each_worker_exports_its_spans_and_flushes_them_on_sigterm(fleet: MockFleet) -> None:
    with OtlpSink() as sink:
        with gunicorn(
            fleet,
            "--workers",
            "2",
            GATEWAY_DEADLINE_MS="10000",
            OTEL_EXPORTER_OTLP_ENDPOINT=sink.url,
            OTEL_SERVICE_NAME="gateway-under-test",
            # Longer than the test: nothing is exported before the stop's flush.
            OTEL_BSP_SCHEDULE_DELAY="60000",
        ) as server:

            async def batch() -> None:
                answers = await post_concurrently(server.url, [{"user_id": "o"}] * 4)
                assert {status for status, _ in answers} == {200}

            asyncio.run(until_every_worker_served(server, batch))
            assert sink.spans == 0  # all still in the workers' batches
            assert server.stop() == 0
            output = server.output()
        received = sink.received()

    served = defaultdict(set)  # worker pid -> request ids it logged
    traces = {}  # request id -> trace id
    for line in lines(output):
        if line["message"] == "request" and line["path"] == "/recommendation":
            served[line["process"]].add(line["request_id"])
            traces[line["request_id"]] = line["trace_id"]
    assert len(served) == 2

    exported = defaultdict(list)  # worker pid -> its spans
    for request in received:
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a) for a in resource_spans.resource.attributes}
            assert resource["service.name"] == "gateway-under-test"
            for scope in resource_spans.scope_spans:
                exported[resource["process.pid"]].extend(scope.spans)
    assert set(exported) == set(served)
    for pid, spans in exported.items():
        servers = [s for s in spans if s.name == "POST /recommendation"]
        requests = {
            _value(a) for s in servers for a in s.attributes if a.key == "gateway.request_id"
        }
        # Every request the worker served, up to the last before SIGTERM, is there.
        assert requests == served[pid]
        for span in servers:
            request_id = next(_value(a) for a in span.attributes if a.key == "gateway.request_id")
            assert span.trace_id.hex() == traces[request_id]
        calls = [s for s in spans if s.name.startswith("recommender ")]
        attempts = [s for s in spans if s.name.startswith("POST ") and s not in servers]
        assert len(calls) == len(attempts) == 4 * len(servers)
        assert {s.parent_span_id for s in calls} == {s.span_id for s in servers}
    assert "Traceback" not in output, json.dumps(output[-2000:])


def test_tracing_on_without_the_packages_stops_gunicorn_once_naming_the_extra(
    fleet: MockFleet, tmp_path: Path
) -> None:
    # As if not installed: a module of that name that cannot be imported, first on the path.
    (tmp_path / "opentelemetry.py").write_text("raise ImportError('no opentelemetry here')\n")
    env = gateway_environment(fleet, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318")
    env["PYTHONPATH"] = str(tmp_path)
    # It stops in the master, before it binds anything: the address is never used.
    result = subprocess.run(
        [GUNICORN, "-c", "gunicorn.conf.py", "gateway.asgi:app", "--bind", "127.0.0.1:0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert "OpenTelemetry packages are not installed" in result.stderr
    assert "pip install 'fusion-gateway[tracing]'" in result.stderr
    assert "Booting worker" not in result.stderr

"""End-to-end tracing: a gunicorn-served gateway, 2 workers, exporting OTLP/HTTP to a receiver.

The receiver (`benchmarks.otlpsink`) decodes each export with `opentelemetry-proto`. The
exporter batches (every 5 s by default): the spans of the last requests arrive only because
each worker flushes its provider on the graceful stop that SIGTERM starts.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

import pytest

from benchmarks.otlpsink import OtlpSink
from mock_recommenders import MockFleet
from tests.helpers import gunicorn, lines, post_concurrently, until_every_worker_served

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

"""Hostile input from either side: bounded, reported, never a 500 (issue 12, bounded answers).

Answers: one recommender points at a hostile answer (`tests/hostile.py`), the other three at
the mocks. The request is answered 200 with the three answers; the hostile source is an
`error` or a `timeout` saying why, within the deadline as the gateway itself reports it; and
the gateway dropped the hostile connection rather than read on. With every strategy: the
`threads` one reads through its own client, whose threads the budget bounds too.

Requests: a frontend's body nested too deep, with numbers beyond the limits, or with too many
unknown fields is a 422 naming the field, and nothing is logged as an error.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.harness.servers import children, worker_rss_mb
from gateway.config.settings import Settings
from gateway.contract.schemas import MAX_UNKNOWN_FIELDS, MAX_UNKNOWN_FIELDS_BYTES
from gateway.fanout.strategies import STRATEGIES
from gateway.web.app import create_app
from mock_recommenders import DEFAULT_NAMES, MockFleet, MockFleetProcess
from tests.helpers import (
    Fleet,
    Serve,
    assert_json_error,
    gunicorn,
    post_concurrently,
    recommend,
    settings_for,
    wait_until,
)
from tests.hostile import HostileRecommender

DEADLINE_MS = 1000
# What the gateway's own account of a call may exceed the deadline by on a busy machine.
SLACK_MS = 500
CAP = 1024 * 1024
TOO_LARGE = f"answer larger than the limit of {CAP} bytes"

HOSTILE = {
    "nested": ("error", "answered JSON beyond the limits: nested deeper than 64 levels"),
    "many-items": ("error", "answered 5000 items, above the limit of 1000"),
    "items": ("error", TOO_LARGE + " (Content-Length: 34000011)"),
    "large": ("error", TOO_LARGE + f" (Content-Length: {50 * CAP + 28})"),
    "endless": ("error", TOO_LARGE),
    "bomb": ("error", f"answer decompresses to more than the limit of {CAP} bytes"),
    "trickle": ("timeout", f"no answer within the {DEADLINE_MS} ms deadline"),
}
# Answers the gateway cannot have read whole: it must have dropped their connections.
DROPPED = ("items", "large", "endless", "bomb", "trickle")


@pytest.fixture
def hostile() -> Iterator[HostileRecommender]:
    with HostileRecommender() as recommender:
        yield recommender


def settings_with(fleet: Fleet, hostile: HostileRecommender, path: str, **fields: Any) -> Settings:
    """The mocks, with the last of them replaced by the hostile answer `path`."""
    data = settings_for(fleet, deadline_ms=DEADLINE_MS, **fields).model_dump(mode="json")
    data["recommenders"][-1]["url"] = hostile.url(path)
    return Settings.model_validate(data)


# --- Hostile answers ------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("path", sorted(HOSTILE))
def test_a_hostile_answer_is_its_sources_failure_alone(
    fleet: MockFleet, serve: Serve, hostile: HostileRecommender, path: str, strategy: str
) -> None:
    url = serve(create_app(settings_with(fleet, hostile, path, strategy=strategy)))

    response = recommend(url, {"user_id": "h1", "resultSize": 3})

    assert response.status_code == 200, response.text
    body = response.json()
    *good, bad = DEFAULT_NAMES
    assert [entry["name"] for entry in body["result"]] == good
    assert all(body["sources"][name]["status"] == "ok" for name in good)
    status, reason = HOSTILE[path]
    source = body["sources"][bad]
    assert (source["status"], source["error"], source["attempts"]) == (status, reason, 1)
    assert source["latency_ms"] <= DEADLINE_MS + SLACK_MS
    assert body["complete"] is False
    assert hostile.counts()[0] == {path: 1}
    if path in DROPPED:
        # Read no further: the gateway closed the connection (for `threads`, the thread that
        # held it returned), which the hostile server sees on its next write.
        wait_until(lambda: hostile.counts()[1].get(path) == 1, 10, f"{path} still connected")


@pytest.mark.parametrize("path", ["bomb", "endless", "items"])
def test_requests_beside_hostile_answers_keep_their_answers(
    fleet: MockFleet, serve: Serve, hostile: HostileRecommender, path: str
) -> None:
    # Every hostile call fails: on a loaded machine, requests that start after the first five
    # failures would meet an open breaker instead of the hostile answer.
    breaker = {"enabled": False}
    url = serve(create_app(settings_with(fleet, hostile, path, breaker=breaker)))

    answers = asyncio.run(post_concurrently(url, [{"user_id": f"c{i}"} for i in range(16)]))

    assert {status for status, _ in answers} == {200}
    *good, bad = DEFAULT_NAMES
    for _, body in answers:
        # Refused as an error; on a loaded machine, 16 bombs at once may outlast the deadline.
        assert body["sources"][bad]["status"] in {"error", "timeout"}
        for name in good:
            # A loop blocked by the hostile answers (seconds, before) would time these out.
            assert body["sources"][name]["status"] == "ok"
            assert body["sources"][name]["latency_ms"] < DEADLINE_MS
    assert hostile.counts()[0] == {path: 16}


@pytest.mark.slow
def test_the_workers_memory_returns_after_hostile_answers(
    fleet_process: MockFleetProcess, hostile: HostileRecommender
) -> None:
    recommenders = [{"name": name, "url": fleet_process.url(name)} for name in DEFAULT_NAMES[:3]]
    recommenders += [{"name": f"h-{path}", "url": hostile.url(path)} for path in HOSTILE]
    environment = {
        "GATEWAY_RECOMMENDERS": json.dumps(recommenders),
        "GATEWAY_DEADLINE_MS": str(DEADLINE_MS),
        # Every hostile call fails: an open breaker would stop calling, and stop testing.
        "GATEWAY_BREAKER__ENABLED": "false",
    }
    with gunicorn(fleet_process, "--workers", "1", **environment) as server:
        (worker,) = children(server.process.pid)
        hostile.benign = True  # every path answers like a mock: the worker's normal state
        asyncio.run(in_turn(server.url, 60, 4))
        before = worker_rss_mb(server.process.pid)

        hostile.benign = False
        answers = asyncio.run(in_turn(server.url, 40, 4))
        after = worker_rss_mb(server.process.pid)
        assert children(server.process.pid) == [worker]  # the same worker throughout

    assert {status for status, _ in answers} == {200}
    for _, body in answers:
        reported = {name: source["status"] for name, source in body["sources"].items()}
        assert reported == dict.fromkeys(DEFAULT_NAMES[:3], "ok") | {
            f"h-{path}": status for path, (status, _) in HOSTILE.items()
        }
    growth = after[0] - before[0]
    assert growth < 20, (before, after)


async def in_turn(url: str, total: int, concurrency: int) -> list[tuple[int, Any]]:
    """`total` requests, `concurrency` at a time."""
    answers: list[tuple[int, Any]] = []
    for start in range(0, total, concurrency):
        bodies = [{"user_id": f"m{i}"} for i in range(start, start + concurrency)]
        answers += await post_concurrently(url, bodies)
    return answers


# --- Hostile requests -----------------------------------------------------------------------


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    ("data", "field", "problem"),
    [
        ('{"context": {"a": ' + nested(64) + "}}", "context", "nested deeper than 64 levels"),
        ('{"context": {"a": ' + nested(300) + "}}", "context", "nested deeper than 64 levels"),
        ('{"context": {"a": ' + nested(5000) + "}}", "context", "nested deeper than 64 levels"),
        ('{"user_id": "u", "tags": ' + nested(100) + "}", "tags", "nested deeper than 64"),
        ('{"context": {"price": 1e999}}', "context", "a number too large for a float (1e999)"),
        (
            '{"numbers": [' + ", ".join(["9" * 4299] * 240) + "]}",
            "numbers",
            "an integer of 4299 digits (at most 100)",
        ),
        ('{"resultSize": ' + "1" * 101 + "}", "resultSize", "an integer of 101 digits"),
        ('{"context": {"name": "\\ud800"}}', "context", "unpaired surrogate escape"),
        (
            json.dumps({f"f{i}": i for i in range(MAX_UNKNOWN_FIELDS + 8)}),
            f"f{MAX_UNKNOWN_FIELDS}",
            f"one of {MAX_UNKNOWN_FIELDS + 8} unknown fields; at most {MAX_UNKNOWN_FIELDS}",
        ),
        (
            json.dumps({"user_id": "u", "a": "x" * 10_000, "b": "y" * 10_000}),
            "b",
            f"unknown fields of more than {MAX_UNKNOWN_FIELDS_BYTES} bytes together",
        ),
    ],
    ids=[
        "context 65 deep",
        "context 302 deep",
        "context 5002 deep",
        "unknown field deep",
        "overflowing float",
        "1 MB of long integers",
        "long resultSize",
        "lone surrogate",
        "too many unknown fields",
        "unknown fields too large",
    ],
)
def test_a_hostile_body_is_a_422_naming_its_field(
    fleet: MockFleet,
    gateway_url: str,
    caplog: pytest.LogCaptureFixture,
    data: str,
    field: str,
    problem: str,
) -> None:
    response = recommend(gateway_url, data=data.encode())

    body = assert_json_error(response, 422, f"invalid request: {field}: ", problem)
    assert body["error"]["details"] == [
        {"field": field, "message": body["error"]["details"][0]["message"]}
    ]
    assert fleet.stats("sml")["requests"] == 0
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_body_at_the_limits_is_served_and_forwarded_whole(
    fleet: MockFleet, gateway_url: str
) -> None:
    deep: Any = 1
    for _ in range(62):  # in `context`, in the body: 64 levels
        deep = {"d": deep}
    extra = {f"f{i}": "v" for i in range(MAX_UNKNOWN_FIELDS - 1)} | {"pad": "p" * 15_000}
    sent = {"user_id": "edge", "context": {"deep": deep, "n": -int("9" * 100)}} | extra

    response = recommend(gateway_url, sent)

    assert response.status_code == 200, response.text
    last = fleet.last_request("sml")
    assert last is not None
    forwarded = last["body"]
    assert forwarded["context"] == sent["context"]
    assert {name: forwarded[name] for name in extra} == extra

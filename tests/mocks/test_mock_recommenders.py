"""Tests of the mock recommenders, over real HTTP on free loopback ports.

They use the suite's `fleet` fixture (tests/conftest.py): the four mocks, fresh for each test.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import itertools
import json
import os
import random
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mock_recommenders import DEFAULT_NAMES, Behaviour, MockFleet, MockFleetProcess, rank_items
from mock_recommenders.__main__ import parse_arguments
from mock_recommenders.loopback import loopback_socket, port_of
from tests.helpers import ROOT, port_is_open

ZERO_FAULTS = {"errors": 0, "resets": 0, "hangs": 0}


@dataclasses.dataclass
class Answer:
    """What a mock answered, read in full so the connection goes back to the pool."""

    status: int
    content_type: str
    text: str

    def json(self) -> Any:
        """The body, parsed."""
        return json.loads(self.text)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """One client session (one connection pool), closed after the test."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: Any = None,
    *,
    data: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """POST `body` as JSON, or raw `data`, and read the whole answer."""
    async with session.post(url, json=body, data=data, headers=headers) as response:
        return Answer(response.status, response.content_type, await response.text())


async def call(session: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> Answer:
    """Any method, with an optional JSON body; reads the whole answer."""
    async with session.request(method, url, json=body) as response:
        return Answer(response.status, response.content_type, await response.text())


def endpoint(fleet: MockFleet, name: str, path: str) -> str:
    """Another endpoint of the same mock (``/stats``, ``/admin/behaviour``)."""
    return f"http://127.0.0.1:{fleet.port(name)}{path}"


# The ranking


def test_rankings_are_deterministic_prefix_stable_and_well_formed() -> None:
    for name in (*DEFAULT_NAMES, "r16"):
        for user_id in ("u1", "u2", None):
            full = rank_items(name, user_id, 100)
            assert rank_items(name, user_id, 100) == full
            for size in range(1, 100):
                assert rank_items(name, user_id, size) == full[:size]
            ids = [item["id"] for item in full]
            assert len(set(ids)) == 100
            assert all(0 <= int(item_id[1:]) < 1000 and item_id[0] == "i" for item_id in ids)
            scores = [item["score"] for item in full]
            assert all(0 <= score <= 1 and round(score, 4) == score for score in scores)
            assert all(a >= b for a, b in itertools.pairwise(scores))


def test_rankings_differ_per_recommender_and_user_and_are_pinned() -> None:
    assert len({tuple(i["id"] for i in rank_items(name, "u1", 10)) for name in DEFAULT_NAMES}) == 4
    assert rank_items("sml", "u1", 10) != rank_items("sml", "u2", 10)
    assert rank_items("sml", None, 10) != rank_items("sml", "u1", 10)
    # The README shows these; a change of algorithm must be deliberate.
    assert rank_items("sml", "u1", 2) == [
        {"id": "i536", "score": 0.7019},
        {"id": "i378", "score": 0.7007},
    ]


@pytest.mark.slow
def test_rankings_agree_across_processes_whatever_the_hash_seed() -> None:
    script = "import json; from mock_recommenders.ranking import rank_items as r; "
    script += "print(json.dumps([r('sml', 'u1', 5), r('psn', None, 5)]))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert json.loads(done.stdout) == [rank_items("sml", "u1", 5), rank_items("psn", None, 5)]


# POST /test


async def test_each_recommender_answers_its_ranking(
    fleet: MockFleet, session: aiohttp.ClientSession
) -> None:
    for name, size in zip(DEFAULT_NAMES, (1, 7, 42, 100), strict=True):
        body = {"user_id": "u9", "resultSize": size, "context": {"page": "home"}}
        answer = await post(session, fleet.url(name), body, headers={"X-Request-ID": f"r-{name}"})

        assert answer.status == 200
        assert answer.content_type == "application/json"
        assert answer.json() == {
            "items": rank_items(name, "u9", size),
            "recommender": name,
            "user_id": "u9",
            "request_id": f"r-{name}",
        }
        assert len(answer.json()["items"]) == size


async def test_a_sampled_traceparent_is_logged_an_unsampled_one_is_not(
    fleet: MockFleet, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    unsampled = "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    with caplog.at_level("INFO", logger="mock_recommenders.trace"):
        for traceparent in (sampled, unsampled):
            headers = {"traceparent": traceparent, "X-Request-ID": "r-1"}
            assert (await post(session, fleet.url("asc"), {}, headers=headers)).status == 200
        await post(session, fleet.url("asc"), {})

    assert [r.getMessage() for r in caplog.records if r.name == "mock_recommenders.trace"] == [
        f"asc received traceparent {sampled} (request r-1)"
    ]


async def test_defaults_to_ten_items_for_an_anonymous_caller(
    fleet: MockFleet, session: aiohttp.ClientSession
) -> None:
    answer = await post(session, fleet.url("trd"), {})

    assert answer.json() == {
        "items": rank_items("trd", None, 10),
        "recommender": "trd",
        "user_id": None,
        "request_id": None,
    }


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"nope", 400),
        (b"", 400),
        (b"\xff\xfe", 400),
        (b"[1]", 400),
        (b'"x"', 400),
        (b'{"resultSize": 0}', 422),
        (b'{"resultSize": 101}', 422),
        (b'{"resultSize": "10"}', 422),
        (b'{"resultSize": 2.5}', 422),
        (b'{"resultSize": true}', 422),
        (b'{"resultSize": null}', 422),
        (b'{"user_id": 3}', 422),
    ],
)
async def test_rejects_bad_input(
    fleet: MockFleet, session: aiohttp.ClientSession, data: bytes, status: int
) -> None:
    answer = await post(session, fleet.url("sml"), data=data)

    assert (answer.status, answer.content_type) == (status, "application/json")
    assert isinstance(answer.json()["error"], str)


# Behaviour


async def test_the_delay_is_honoured(fleet: MockFleet, session: aiohttp.ClientSession) -> None:
    fleet.set_behaviour("trd", delay_ms=400)

    started = time.perf_counter()
    answer = await post(session, fleet.url("trd"), {"user_id": "u"})
    elapsed = time.perf_counter() - started

    assert answer.status == 200
    assert elapsed >= 0.4  # a sleep is never shorter than asked
    # The others keep no delay: each answers while a call delayed by far more is under way.
    fleet.set_behaviour("trd", delay_ms=20_000)
    slow = asyncio.create_task(post(session, fleet.url("trd"), {}))
    fast = [await post(session, fleet.url(name), {}) for name in ("sml", "asc", "psn")]
    assert not slow.done()
    slow.cancel()
    assert [a.status for a in fast] == [200] * 3


def test_the_jitter_adds_up_to_its_amount() -> None:
    behaviour = Behaviour(delay_ms=20, jitter_ms=10)
    rng = random.Random(1)

    delays = [behaviour.delay_s(rng) for _ in range(200)]

    assert all(0.020 <= delay <= 0.030 for delay in delays)
    assert max(delays) - min(delays) > 0.008
    assert Behaviour(delay_ms=20).delay_s(rng) == 0.020


async def test_status_not_json_and_hang(fleet: MockFleet, session: aiohttp.ClientSession) -> None:
    fleet.set_behaviour("asc", status=503)
    answer = await post(session, fleet.url("asc"), {})
    assert (answer.status, answer.json()) == (503, {"error": "injected status 503"})

    fleet.set_behaviour("asc", status=200, not_json=True)
    answer = await post(session, fleet.url("asc"), {})
    assert (answer.status, answer.content_type, answer.text) == (
        200,
        "text/plain",
        "this is not json",
    )

    fleet.set_behaviour("asc", not_json=False, hang=True)
    with pytest.raises(TimeoutError):
        async with session.post(fleet.url("asc"), json={}, timeout=aiohttp.ClientTimeout(0.3)):
            pass
    assert fleet.stats("asc")["hangs"] == 1

    fleet.behaviour("asc").hang = False  # the live object
    assert (await post(session, fleet.url("asc"), {})).status == 200


async def test_switching_hang_off_releases_the_hanging_calls(
    fleet: MockFleet, session: aiohttp.ClientSession
) -> None:
    fleet.set_behaviour("trd", hang=True)
    calls = [
        asyncio.create_task(post(session, fleet.url("trd"), {"user_id": "h"})) for _ in range(3)
    ]
    for _ in range(500):
        if fleet.stats("trd")["hangs"] == 3:
            break
        await asyncio.sleep(0.01)
    assert fleet.stats("trd")["hangs"] == 3
    assert not any(call.done() for call in calls)

    await asyncio.to_thread(fleet.set_behaviour, "trd", hang=False)

    answers = await asyncio.gather(*calls)
    assert [a.json()["items"] for a in answers] == [rank_items("trd", "h", 10)] * 3


async def test_the_admin_endpoint_releases_hanging_calls(
    fleet: MockFleet, session: aiohttp.ClientSession
) -> None:
    admin = endpoint(fleet, "asc", "/admin/behaviour")
    await call(session, "PUT", admin, {"hang": True})
    hanging = asyncio.create_task(post(session, fleet.url("asc"), {}))
    for _ in range(500):
        if fleet.stats("asc")["hangs"] == 1:
            break
        await asyncio.sleep(0.01)

    await call(session, "PUT", admin, {"hang": False})

    assert (await hanging).status == 200


async def test_stop_releases_a_hanging_call_at_once(session: aiohttp.ClientSession) -> None:
    fleet = MockFleet(("sml",), behaviour=Behaviour(hang=True)).start()
    try:
        call = asyncio.create_task(post(session, fleet.url("sml"), {}))
        for _ in range(100):
            if fleet.stats("sml")["hangs"]:
                break
            await asyncio.sleep(0.01)
        assert not call.done()

        started = time.perf_counter()
        await asyncio.to_thread(fleet.stop)
    finally:
        fleet.stop()  # idempotent

    assert time.perf_counter() - started < 5  # the hang itself would last forever
    assert (await call).status == 200


async def test_set_behaviour_without_a_name_changes_all_and_reset_restores_them(
    session: aiohttp.ClientSession,
) -> None:
    with MockFleet(("a", "b"), behaviour=Behaviour(delay_ms=5)) as fleet:
        fleet.set_behaviour(status=500)
        assert [(await post(session, fleet.url(n), {})).status for n in "ab"] == [500, 500]
        with pytest.raises(ValueError, match="'nope'"):
            fleet.set_behaviour("a", nope=1)

        fleet.reset()

        assert fleet.behaviour("a") == fleet.behaviour("b") == Behaviour(delay_ms=5)
        assert fleet.stats("a") == {"name": "a", "requests": 0, "connections": 0, **ZERO_FAULTS}


# Stats


async def test_stats_count_requests_and_connections(fleet: MockFleet) -> None:
    stats_url, reset_url = endpoint(fleet, "psn", "/stats"), endpoint(fleet, "psn", "/stats/reset")
    async with aiohttp.ClientSession() as keep_alive:
        for _ in range(5):
            assert (await post(keep_alive, fleet.url("psn"), {})).status == 200
    assert fleet.stats("psn") == {"name": "psn", "requests": 5, "connections": 1, **ZERO_FAULTS}

    async with aiohttp.ClientSession() as admin:
        answer = await call(admin, "POST", reset_url)
        assert answer.json() == {"name": "psn", "requests": 0, "connections": 0, **ZERO_FAULTS}
        for _ in range(3):
            async with aiohttp.ClientSession() as one_off:
                assert (await post(one_off, fleet.url("psn"), {})).status == 200
        answer = await call(admin, "GET", stats_url)

    assert answer.json() == {"name": "psn", "requests": 3, "connections": 3, **ZERO_FAULTS}


# Admin


async def test_the_admin_endpoint_changes_a_running_mock(
    fleet: MockFleet, session: aiohttp.ClientSession
) -> None:
    admin = endpoint(fleet, "sml", "/admin/behaviour")
    assert (await call(session, "GET", admin)).json() == dataclasses.asdict(Behaviour())

    changed = await call(session, "PUT", admin, {"status": 502, "jitter_ms": 5})

    assert changed.status == 200
    assert changed.json() == dataclasses.asdict(Behaviour(status=502, jitter_ms=5))
    assert fleet.behaviour("sml") == Behaviour(status=502, jitter_ms=5)
    assert (await call(session, "GET", admin)).json() == changed.json()
    assert (await post(session, fleet.url("sml"), {})).status == 502


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"delay": 5, "status": 200}, "'delay'"),
        ({"hang": "yes"}, "'hang'"),
        ({"delay_ms": "5"}, "'delay_ms'"),
        ({"delay_ms": -1}, "'delay_ms'"),
        ({"status": 200.0}, "'status'"),
        ({"status": 99}, "'status'"),
        ({"error_rate": 1.5}, "'error_rate'"),
        ({"fail_first": 1.5}, "'fail_first'"),
    ],
)
async def test_the_admin_endpoint_refuses_bad_changes_whole(
    fleet: MockFleet, session: aiohttp.ClientSession, change: dict[str, Any], field: str
) -> None:
    fleet.set_behaviour("sml", status=418)

    refused = await call(session, "PUT", endpoint(fleet, "sml", "/admin/behaviour"), change)

    assert refused.status == 422
    assert field in refused.json()["error"]
    assert fleet.behaviour("sml") == Behaviour(status=418)


async def test_the_admin_endpoint_wants_a_json_object(
    fleet: MockFleet, session: aiohttp.ClientSession
) -> None:
    admin = endpoint(fleet, "sml", "/admin/behaviour")
    async with session.put(admin, data=b"{") as response:
        assert response.status == 400
    assert (await call(session, "PUT", admin, [1])).status == 400


def test_every_behaviour_field_can_be_set() -> None:
    behaviour = Behaviour()
    fields = dataclasses.asdict(Behaviour(delay_ms=1, jitter_ms=2, status=500, not_json=True))
    fields.update(hang=True, error_rate=0.5, retry_after_s=1, slow_rate=0.1, slow_ms=3.0)
    fields.update(reset=True, fail_first=2, error_status=502)
    assert set(fields) == {field.name for field in dataclasses.fields(Behaviour)}

    behaviour.update(fields)

    assert behaviour.as_dict() == fields


# Faults beyond delay, status, not_json and hang


async def test_injected_errors_carry_retry_after(
    fleet: MockFleet, session: aiohttp.ClientSession
) -> None:
    fleet.set_behaviour("asc", error_rate=1.0, error_status=502, retry_after_s=2)

    for _ in range(3):
        async with session.post(fleet.url("asc"), json={}) as response:
            assert response.status == 502
            assert response.headers["Retry-After"] == "2"
            assert await response.json() == {"error": "injected error"}
    assert fleet.stats("asc")["errors"] == 3


async def test_fail_first_fails_that_many_calls_each_time_it_is_set(
    fleet: MockFleet, session: aiohttp.ClientSession
) -> None:
    for _ in range(2):
        fleet.set_behaviour("sml", fail_first=2)
        statuses = [(await post(session, fleet.url("sml"), {})).status for _ in range(3)]
        assert statuses == [503, 503, 200]


async def test_a_reset_mid_answer(fleet: MockFleet, session: aiohttp.ClientSession) -> None:
    fleet.set_behaviour("psn", reset=True)

    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(fleet.url("psn"), json={}) as response:
            assert response.status == 200
            await response.read()

    assert fleet.stats("psn")["resets"] == 1


# What the caller sent


async def test_the_last_request_is_recorded(
    fleet: MockFleet, session: aiohttp.ClientSession
) -> None:
    assert fleet.last_request("sml") is None
    body = {"user_id": "u", "resultSize": 3, "x": [1]}

    await post(session, fleet.url("sml"), body, headers={"X-Request-ID": "abc"})

    seen = fleet.last_request("sml")
    assert seen is not None
    assert seen["body"] == body
    assert seen["headers"]["x-request-id"] == "abc"
    assert seen["headers"]["content-type"] == "application/json"
    assert fleet.last_request("asc") is None


# MockFleet itself


def _chosen_ports() -> list[int]:
    """Ports to try, below the range the system hands out on its own.

    No connection of another test can hold one of them; one in use anyway is skipped.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return random.sample(range(10_000, min(low, 30_000)), 50)


def test_the_fleet_binds_the_ports_it_is_given() -> None:
    for port in _chosen_ports():
        fleet = MockFleet(("sml",), ports=[port])
        try:
            fleet.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        break
    else:
        raise AssertionError("every port tried was in use")
    try:
        assert fleet.port("sml") == port
        assert fleet.url("sml") == f"http://127.0.0.1:{port}/test"
        with pytest.raises(RuntimeError):
            fleet.start()
    finally:
        fleet.stop()


def test_a_fleet_that_cannot_bind_every_port_releases_the_others() -> None:
    with loopback_socket() as taken:
        taken.listen()
        for port in _chosen_ports():
            fleet = MockFleet(("sml", "asc"), ports=[port, port_of(taken)])
            with pytest.raises(OSError) as refused:
                fleet.start()
            assert refused.value.errno == errno.EADDRINUSE
            with contextlib.suppress(KeyError):  # KeyError: this one was in use
                if fleet.port("sml") == port:  # it bound this one; the taken one failed
                    break
        else:
            raise AssertionError("every port tried was in use")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # released again


# The command line


@pytest.mark.parametrize(
    ("argv", "plan"),
    [
        ([], [("sml", 5001), ("asc", 5002), ("trd", 5003), ("psn", 5004)]),
        (["--base-port", "0"], [("sml", 0), ("asc", 0), ("trd", 0), ("psn", 0)]),
        (["--name", "psn", "--base-port", "0"], [("psn", 0)]),
        (["--name", "trd"], [("trd", 5003)]),
        (["--name", "r7", "--port", "6000"], [("r7", 6000)]),
        (
            ["--names", "sml,asc,trd,psn,r5", "--base-port", "7000"],
            [("sml", 7000), ("asc", 7001), ("trd", 7002), ("psn", 7003), ("r5", 7004)],
        ),
    ],
)
def test_the_command_line_plans_names_and_ports(argv: list[str], plan: list[Any]) -> None:
    args = parse_arguments(argv)

    assert args.plan == plan
    assert args.host == "127.0.0.1"
    assert args.access_log is False
    assert args.behaviour == Behaviour()


def test_the_command_line_sets_the_behaviour_and_refuses_nonsense() -> None:
    args = parse_arguments(["--delay-ms", "20", "--jitter-ms", "5", "--quiet"])
    assert args.behaviour == Behaviour(delay_ms=20, jitter_ms=5)

    refused = (
        ["--name", "r5"],
        ["--port", "6000"],
        ["--delay-ms", "-1"],
        ["--name", "sml", "--port", "70000"],
        ["--base-port", "65535"],
    )
    for argv in refused:
        with pytest.raises(SystemExit):
            parse_arguments(argv)
    with pytest.raises(SystemExit):
        parse_arguments(["--quiet", "--access-log"])


def _read_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    # A bounded wait: a child that never prints must fail the test, not hang it.
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        assert selector.select(timeout_s), "no start-up line"
    return process.stdout.readline()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_command_line_serves_and_stops_cleanly(signum: signal.Signals) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "mock_recommenders", "--name", "sml", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(process, 30)
        found = re.fullmatch(
            r"mock recommender sml listening on http://127.0.0.1:(\d+)/test\n", line
        )
        assert found, line
        port = int(found[1])
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/test",
            data=b'{"user_id": "u", "resultSize": 3}',
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["items"] == rank_items("sml", "u", 3)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()

    assert process.returncode == 0
    assert "Traceback" not in stderr
    assert stderr == ""


# MockFleetProcess: the same fleet in a child process


@pytest.mark.slow
def test_the_fleet_in_a_child_process_is_driven_like_the_one_in_this_process() -> None:
    with MockFleetProcess(("sml", "trd"), flags=("--delay-ms", "1")) as fleet:
        assert fleet.pid != os.getpid()
        assert fleet.url("trd") == f"http://127.0.0.1:{fleet.port('trd')}/test"
        fleet.set_behaviour("trd", hang=True)
        with pytest.raises(ValueError, match="'nope'"):
            fleet.set_behaviour("sml", nope=1)

        def ask(name: str) -> Any:
            request = urllib.request.Request(fleet.url(name), data=b'{"user_id": "p"}')
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)

        assert ask("sml")["items"] == rank_items("sml", "p", 10)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            hanging = pool.submit(ask, "trd")
            for _ in range(1000):
                if fleet.stats("trd")["hangs"] == 1:
                    break
                time.sleep(0.01)
            assert not hanging.done()

            fleet.reset()  # behaviours back as started: the hang is released

            assert hanging.result(30)["items"] == rank_items("trd", "p", 10)
        assert fleet.stats("trd") == {"name": "trd", "requests": 0, "connections": 0, **ZERO_FAULTS}
        assert fleet.stats("sml")["requests"] == 0

    with pytest.raises(RuntimeError, match="not running"):
        fleet.stats("sml")
    assert not port_is_open(fleet.port("sml")) and not port_is_open(fleet.port("trd"))

"""Soak: 2,000 requests at concurrency 50 through gunicorn, with one recommender misbehaving.

Every request must be answered 200 with flags that match its sources; the gateway's account of
the misbehaving recommender must match what that mock counted; and the workers must not grow:
memory by less than 20 MB, open file descriptors not at all. How fast it answers is the
benchmarks' business: the deadline is long, so that a busy machine changes no answer.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import aiohttp
import pytest

from benchmarks.harness.servers import children, worker_rss_mb
from mock_recommenders import DEFAULT_NAMES, MockFleetProcess
from tests.helpers import gunicorn, until_every_worker_served, wait_until

pytestmark = pytest.mark.slow

Answer = tuple[int, Any, Any]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def drive(url: str, total: int, concurrency: int) -> list[Answer]:
    answers: list[Answer] = []
    counter = iter(range(total))

    async def user(session: aiohttp.ClientSession) -> None:
        for i in counter:
            async with session.post(f"{url}/recommendation", json={"user_id": f"s{i}"}) as r:
                answers.append((r.status, await r.json(), r.headers))

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(user(session) for _ in range(concurrency)))
    return answers


def test_soak_with_a_flaky_slow_recommender(fleet_process: MockFleetProcess) -> None:
    fleet = fleet_process
    fleet.set_behaviour("trd", error_rate=0.2, slow_rate=0.1, slow_ms=300)
    # Idle pooled connections expire fast here, so that counts taken at rest compare the
    # descriptors the workers keep, not how wide the pool happened to be a moment ago.
    overrides = {
        "GATEWAY_DEADLINE_MS": "20000",
        "GATEWAY_POOL__KEEPALIVE_TIMEOUT_S": "0.2",
    }
    with gunicorn(fleet, "--workers", "2", **overrides) as server:

        async def warm_up() -> None:
            await drive(server.url, 300, 50)

        # Warm: pools, caches, threads, and the metric files a worker opens as it first serves
        # (a worker the kernel gave no connection yet would open them during the run).
        asyncio.run(until_every_worker_served(server, warm_up))
        workers = children(server.process.pid)
        fds_at_rest = at_rest(workers)
        memory_before = worker_rss_mb(server.process.pid)
        fleet.reset()
        fleet.set_behaviour("trd", error_rate=0.2, slow_rate=0.1, slow_ms=300)

        answers = asyncio.run(drive(server.url, 2000, 50))

        memory_after = worker_rss_mb(server.process.pid)
        # At rest again: every descriptor the run opened is closed in time.
        wait_until(
            lambda: all(open_fds(p) <= fds_at_rest[p] for p in workers),
            30,
            lambda: f"descriptors at rest {fds_at_rest}, now {[open_fds(p) for p in workers]}",
        )
        counted = {name: fleet.stats(name) for name in DEFAULT_NAMES}

    assert len(answers) == 2000
    assert {status for status, _, _ in answers} == {200}
    for _, body, headers in answers:
        statuses = {name: source["status"] for name, source in body["sources"].items()}
        complete = all(status == "ok" for status in statuses.values())
        assert body["complete"] is complete
        assert headers["X-Fusion-Complete"] == ("true" if complete else "false")
        assert [entry["name"] for entry in body["result"]] == [
            name for name, status in statuses.items() if status == "ok"
        ]
        assert all(statuses[name] == "ok" for name in ("sml", "asc", "psn"))
    trd = [body["sources"]["trd"] for _, body, _ in answers]
    assert 0 < sum(source["status"] == "error" for source in trd) < 200  # most retried well
    # Every attempt the gateway reports reached the mock, and nothing else did.
    assert sum(source["attempts"] for source in trd) == counted["trd"]["requests"]
    assert counted["trd"]["errors"] > 0
    assert {counted[name]["requests"] for name in ("sml", "asc", "psn")} == {2000}
    growth = [after - before for before, after in zip(memory_before, memory_after, strict=True)]
    assert max(growth) < 20, (memory_before, memory_after)


def at_rest(workers: list[int]) -> dict[int, int]:
    """Each worker's open descriptors once the last run's connections are gone.

    Client connections close as the run ends and idle pooled ones expire after 0.2 s; the
    count is taken once it has stopped falling.
    """
    counts = {pid: open_fds(pid) for pid in workers}
    for _ in range(100):
        time.sleep(0.3)
        now = {pid: open_fds(pid) for pid in workers}
        if now == counts:
            return now
        counts = now
    return counts

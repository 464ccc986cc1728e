"""A closed-loop load through a load balancer while one instance behind it is stopped.

Every request is recorded as an `Exchange`: when it was sent and answered (seconds into the
load), its status (or the kind of transport error), the instances the balancer tried for it
(its ``X-Upstream`` header), and whether a 200 carried the right answer: the one each instance
gave for that user when asked directly before the load (`reference_answers`; the mock
recommenders are deterministic per user). `summarize` then counts what was lost against what
was in flight on the stopped instance, and compares throughput, latency and the CPU each group
of processes used before the stop and after it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.harness.balancer import UPSTREAM_HEADER
from benchmarks.harness.loadgen import percentile
from benchmarks.harness.servers import children, cpu_seconds

__all__ = [
    "Exchange",
    "Load",
    "cpu_by_group",
    "drive",
    "essence",
    "reference_answers",
    "summarize",
]

WARMUP_S = 0.5  # the first answers of a run, left out of the "before" window
BUCKET_S = 0.25  # the timeline's resolution
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Exchange:
    """One request through the balancer."""

    started: float  # seconds into the load
    ended: float
    status: str  # the HTTP status, or the kind of transport error
    tried: tuple[str, ...]  # the instances the balancer tried, in order ("127.0.0.1:port")
    correct: bool  # a 200 carrying the reference answer


@dataclass
class Load:
    """What `drive` saw: every exchange, when the instance was told to stop and when it had
    exited (seconds into the load), CPU samples."""

    exchanges: list[Exchange]
    stopped_at: float
    exited_at: float
    cpu: list[tuple[float, dict[str, float]]]  # (seconds into the load, CPU s by group)


def body_for(user: str) -> bytes:
    """The request body the load sends for `user`."""
    return json.dumps({"user_id": user, "resultSize": 10}).encode()


def essence(raw: bytes) -> dict[str, Any] | None:
    """What a right answer must hold: sources' statuses, their predictions, the fused list.

    Leaves out what differs between two right answers (request ids, latencies, attempts);
    None for anything but the gateway's answer.
    """
    try:
        body = json.loads(raw)
        return {
            "complete": body["complete"],
            "sources": {name: source["status"] for name, source in body["sources"].items()},
            # Each recommender echoes the request id it was sent: the gateway's, new each time.
            "result": [
                {"name": e["name"], "prediction": e["prediction"] | {"request_id": None}}
                for e in body["result"]
            ],
            "fusion": body["fusion"],
            "fused": body["fused"],
            "coverage": body["coverage"],
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


async def reference_answers(urls: list[str], users: list[str]) -> dict[str, dict[str, Any]]:
    """Each user's complete answer, asked of every instance directly; they must agree."""
    limit = asyncio.Semaphore(8)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def answer(url: str, user: str) -> dict[str, Any]:
            for _ in range(5):  # a busy machine may time a source out: ask again
                async with limit, session.post(url, data=body_for(user), headers=JSON) as r:
                    found = essence(await r.read()) if r.status == 200 else None
                if found is not None and found["complete"]:
                    return found
            raise RuntimeError(f"{url} gave no complete answer for {user}")

        answers = await asyncio.gather(
            *(answer(f"{url}/recommendation", user) for url in urls for user in users)
        )
    for index, user in enumerate(users):
        if any(answers[index] != answers[i * len(users) + index] for i in range(len(urls))):
            raise RuntimeError(f"the instances give {user} different answers")
    return dict(zip(users, answers[: len(users)], strict=True))


def cpu_by_group(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each group of leader processes and their children.

    Adds this process (``load generator``) and the rest of the machine (``other``: what
    everything else on it used, other users' work included; Linux /proc/stat).
    """
    used = {
        name: cpu_seconds([p for leader in leaders for p in (leader, *children(leader))])
        for name, leaders in groups.items()
    }
    used["load generator"] = cpu_seconds([os.getpid()])
    fields = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    used["other"] = busy - sum(used.values())
    return used


async def drive(
    url: str,
    references: dict[str, dict[str, Any]],
    connections: int,
    duration_s: float,
    stop_after_s: float,
    stop: Callable[[], Awaitable[None]],
    settle_s: float = 1.0,
    cpu: Callable[[], dict[str, float]] | None = None,
) -> Load:
    """`connections` closed loops POST /recommendation to `url` for `duration_s`; `stop()` is
    awaited from `stop_after_s` into the load: it stops an instance and returns once it has
    exited (a killed process dies a moment after the signal; a stopped one drains first).

    `cpu` (CPU seconds by group) is sampled at the edges of the two windows `summarize`
    compares: `WARMUP_S` to the stop, and `settle_s` after it to the end.
    """
    users = list(references)
    exchanges: list[Exchange] = []
    samples: list[tuple[float, dict[str, float]]] = []
    loop = asyncio.get_running_loop()
    began = time.perf_counter()
    stopped_at = exited_at = math.nan
    stopping: list[asyncio.Task[None]] = []

    def sample() -> None:
        if cpu is not None:
            samples.append((time.perf_counter() - began, cpu()))

    async def stop_now() -> None:
        nonlocal stopped_at, exited_at
        sample()
        stopped_at = time.perf_counter() - began
        await stop()
        exited_at = time.perf_counter() - began

    timers = [
        loop.call_later(WARMUP_S, sample),
        loop.call_later(stop_after_s, lambda: stopping.append(loop.create_task(stop_now()))),
        loop.call_later(stop_after_s + settle_s, sample),
        loop.call_later(duration_s, sample),
    ]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def user(number: int) -> None:
            sequence = number
            while (started := time.perf_counter() - began) < duration_s:
                name = users[sequence % len(users)]
                sequence += connections
                try:
                    async with session.post(
                        f"{url}/recommendation", data=body_for(name), headers=JSON
                    ) as response:
                        raw = await response.read()
                        status = str(response.status)
                        tried = response.headers.get(UPSTREAM_HEADER, "")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raw, status, tried = b"", type(exc).__name__, ""
                ended = time.perf_counter() - began
                correct = status == "200" and essence(raw) == references[name]
                addresses = tuple(a.strip() for a in tried.split(",") if a.strip())
                exchanges.append(Exchange(started, ended, status, addresses, correct))

        await asyncio.gather(*(user(n) for n in range(connections)))
    for timer in timers:
        timer.cancel()
    await asyncio.gather(*stopping)
    return Load(exchanges, stopped_at, exited_at, samples)


def _window(exchanges: list[Exchange], start: float, end: float) -> dict[str, float]:
    """The 200s answered in [start, end): per second, and their latency."""
    latencies = sorted(
        (e.ended - e.started) * 1000
        for e in exchanges
        if e.status == "200" and start <= e.ended < end
    )
    return {
        "from_s": round(start, 3),
        "to_s": round(end, 3),
        "ok_rps": round(len(latencies) / (end - start), 1) if end > start else math.nan,
        "p50_ms": round(percentile(latencies, 0.5), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
    }


def _cores(samples: list[tuple[float, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Cores each group used before the stop and after it, from `drive`'s four samples."""
    if len(samples) < 4:
        return {}
    spans = {"before": (samples[0], samples[1]), "after": (samples[2], samples[3])}
    return {
        # `other` is a difference of two readings of the whole machine, a hair below 0 at rest.
        span: {name: max(round((end[name] - start[name]) / (t1 - t0), 2), 0.0) for name in start}
        for span, ((t0, start), (t1, end)) in spans.items()
    }


def summarize(load: Load, stopped: str, settle_s: float, duration_s: float) -> dict[str, Any]:
    """What a load's exchanges show, with `stopped` the address of the instance stopped."""
    exchanges, stopped_at = load.exchanges, load.stopped_at
    lost = [e for e in exchanges if e.status != "200"]
    at_stop = [e for e in exchanges if e.started <= stopped_at < e.ended]
    # Passed to the stopped instance and not answered before the signal, nor sent after it had
    # exited: what it held while it stopped.
    on_stopped = [
        e
        for e in exchanges
        if e.tried[:1] == (stopped,) and e.ended > stopped_at and e.started < load.exited_at
    ]
    late = [e for e in exchanges if e.started >= stopped_at + settle_s]
    buckets = max(math.ceil(max((e.ended for e in exchanges), default=0) / BUCKET_S), 1)
    ok, other = [0] * buckets, [0] * buckets
    for e in exchanges:
        (ok if e.status == "200" else other)[min(int(e.ended / BUCKET_S), buckets - 1)] += 1
    return {
        "stopped_at_s": round(stopped_at, 3),
        "exited_after_ms": round((load.exited_at - stopped_at) * 1000, 1),
        "sent": len(exchanges),
        "statuses": dict(sorted(Counter(e.status for e in exchanges).items())),
        "lost": len(lost),
        # Lost where the balancer tried anything but the stopped instance alone (or nothing: an
        # error between the load generator and the balancer): not explained by the stop.
        "lost_elsewhere": sum(e.tried != (stopped,) for e in lost),
        "wrong": sum(e.status == "200" and not e.correct for e in exchanges),
        "in_flight_at_stop": len(at_stop),
        "in_flight_on_stopped": len(on_stopped),
        "lost_of_those": sum(e.status != "200" for e in on_stopped),
        "retried_of_those": sum(len(e.tried) > 1 for e in on_stopped),
        "retried_in_all": sum(len(e.tried) > 1 for e in exchanges),
        "late_sent": len(late),
        "late_not_right": sum(not e.correct for e in late),
        "before": _window(exchanges, WARMUP_S, stopped_at),
        "after": _window(exchanges, stopped_at + settle_s, duration_s),
        "cpu_cores": _cores(load.cpu),
        "lost_detail": [
            {"started_s": round(e.started, 3), "ended_s": round(e.ended, 3)}
            | {"status": e.status, "tried": list(e.tried)}
            for e in lost[:100]
        ],
        "timeline": {"bucket_s": BUCKET_S, "ok": ok, "other": other},
    }

"""A closed-loop load generator, run in its own process: ``python -m benchmarks.harness.loadgen``.

`concurrency` virtual users each send a request, wait for the whole answer, and send the next,
for `duration` seconds after a warm-up. Two targets:

- ``gateway``: ``POST {url}/recommendation``, one request per iteration;
- ``floor``: the same body straight to every mock recommender at once (`asyncio.gather` over
  one shared session), no gateway between: the latency and throughput no gateway can beat.

Prints one JSON object: latency percentiles (ms), throughput (requests/s), errors.

``--mode closed``/``open`` count the gateway's answers by status (`run_by_status`);
``--mode burst`` opens `--load` connections, then sends one request on each, all at once, and
prints each request's status, latency and send time (`run_burst`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from benchmarks.harness.rawhttp import RawPool

__all__ = [
    "BurstResult",
    "LoadResult",
    "OverloadResult",
    "percentile",
    "run_burst",
    "run_by_status",
    "run_load",
]


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured."""

    concurrency: int
    duration_s: float
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    sent: int = 0
    cpu_ms_per_request: float = math.nan
    first_error: str | None = None


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (NaN for none)."""
    if not sorted_values:
        return math.nan
    rank = max(math.ceil(fraction * len(sorted_values)), 1)
    return sorted_values[rank - 1]


async def run_load(
    send: Callable[[int], Awaitable[bool]], concurrency: int, duration_s: float, warmup_s: float
) -> LoadResult:
    """Drive `send` (True when the answer was good) from `concurrency` closed loops."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    cpu_started = time.process_time()
    first_error: str | None = None
    measuring_from = time.perf_counter() + warmup_s
    stop_at = measuring_from + duration_s

    async def user(number: int) -> None:
        nonlocal errors, first_error, sent
        iteration = 0
        while True:
            started = time.perf_counter()
            if started >= stop_at:
                return
            try:
                good = await send(number * 1_000_003 + iteration)
                error = None if good else "bad answer"
            except Exception as exc:  # a failed request is counted, not fatal
                good, error = False, f"{type(exc).__name__}: {exc}"
            ended = time.perf_counter()
            iteration += 1
            sent += 1
            if started < measuring_from or ended > stop_at:
                continue
            if good:
                latencies.append((ended - started) * 1000)
            else:
                errors += 1
                first_error = first_error or error

    await asyncio.gather(*(user(n) for n in range(concurrency)))
    cpu_ms = (time.process_time() - cpu_started) * 1000
    latencies.sort()
    count = len(latencies)
    return LoadResult(
        concurrency=concurrency,
        duration_s=duration_s,
        requests=count,
        errors=errors,
        throughput_rps=round(count / duration_s, 1),
        p50_ms=round(percentile(latencies, 0.50), 3),
        p95_ms=round(percentile(latencies, 0.95), 3),
        p99_ms=round(percentile(latencies, 0.99), 3),
        mean_ms=round(sum(latencies) / count, 3) if count else math.nan,
        sent=sent,
        cpu_ms_per_request=round(cpu_ms / sent, 3) if sent else math.nan,
        first_error=first_error,
    )


@dataclass(frozen=True)
class OverloadResult:
    """What one run of `run_by_status` measured: answers by status, and how fast each came."""

    mode: str
    load: float  # connections (closed) or requests per second offered (open)
    duration_s: float
    statuses: dict[str, int]
    goodput_rps: float  # 200s per second
    shed_rps: float  # 503s per second
    ok_p50_ms: float
    ok_p99_ms: float
    shed_p50_ms: float
    shed_p99_ms: float
    shed_max_ms: float
    other_max_ms: float  # the slowest answer that was neither 200 nor 503
    offered_rps: float
    cpu_ms_per_request: float = math.nan
    first_error: str | None = None


async def run_by_status(
    send: Callable[[int], Awaitable[tuple[int, float]]],
    mode: str,
    load: float,
    duration_s: float,
    warmup_s: float,
    max_outstanding: int = 4000,
    honour_retry_after: bool = False,
) -> OverloadResult:
    """Drive `send` (which returns the HTTP status and its Retry-After, or raises) and count
    answers by status.

    ``closed``: `load` connections, each sending its next request when the last is answered:
    at once, or (`honour_retry_after`) after the wait a 503 asks for, jittered by +-50%.
    ``open``: `load` requests per second arrive on a fixed schedule whatever the answers (as
    users do); at most `max_outstanding` wait at once, and an arrival beyond that is counted as
    status ``client-limit``.
    """
    latencies: dict[str, list[float]] = {}
    sent = 0
    first_error: str | None = None
    cpu_started = time.process_time()
    measuring_from = time.perf_counter() + warmup_s
    stop_at = measuring_from + duration_s

    async def one(sequence: int) -> float:
        nonlocal sent, first_error
        started = time.perf_counter()
        wait_s = 0.0
        try:
            code, wait_s = await send(sequence)
            status = str(code)
        except Exception as exc:  # counted by its kind, not fatal
            status = type(exc).__name__
            first_error = first_error or f"{status}: {exc}"
        ended = time.perf_counter()
        sent += 1
        if started >= measuring_from and ended <= stop_at:
            latencies.setdefault(status, []).append((ended - started) * 1000)
        return wait_s

    if mode == "closed":

        async def user(number: int) -> None:
            iteration = 0
            while time.perf_counter() < stop_at:
                wait_s = await one(number * 1_000_003 + iteration)
                iteration += 1
                if honour_retry_after and wait_s > 0:
                    # Spread around the wait asked for, as clients' backoff does: a thousand
                    # clients told "1 s" at once would otherwise come back at once.
                    wait_s *= random.uniform(0.5, 1.5)
                    await asyncio.sleep(min(wait_s, stop_at - time.perf_counter()))

        await asyncio.gather(*(user(n) for n in range(int(load))))
    else:
        outstanding: set[asyncio.Task[Any]] = set()
        began = time.perf_counter()
        sequence = 0
        while (now := time.perf_counter()) < stop_at:
            due = int((now - began) * load)  # arrivals due by now
            while sequence < due:
                if len(outstanding) >= max_outstanding:
                    if now >= measuring_from:
                        latencies.setdefault("client-limit", []).append(0.0)
                else:
                    task: asyncio.Task[Any] = asyncio.ensure_future(one(sequence))
                    outstanding.add(task)
                    task.add_done_callback(outstanding.discard)
                sequence += 1
            await asyncio.sleep(0.002)
        if outstanding:
            await asyncio.wait(outstanding)
    cpu_ms = (time.process_time() - cpu_started) * 1000

    def pct(status: str, fraction: float) -> float:
        return round(percentile(sorted(latencies.get(status, [])), fraction), 3)

    others = [v for k, vs in latencies.items() if k not in ("200", "503") for v in vs]
    counts = {status: len(values) for status, values in sorted(latencies.items())}
    return OverloadResult(
        mode=mode,
        load=load,
        duration_s=duration_s,
        statuses=counts,
        goodput_rps=round(counts.get("200", 0) / duration_s, 1),
        shed_rps=round(counts.get("503", 0) / duration_s, 1),
        ok_p50_ms=pct("200", 0.5),
        ok_p99_ms=pct("200", 0.99),
        shed_p50_ms=pct("503", 0.5),
        shed_p99_ms=pct("503", 0.99),
        shed_max_ms=round(max(latencies.get("503", [math.nan])), 3),
        other_max_ms=round(max(others), 3) if others else math.nan,
        offered_rps=round(sum(counts.values()) / duration_s, 1),
        cpu_ms_per_request=round(cpu_ms / sent, 3) if sent else math.nan,
        first_error=first_error,
    )


@dataclass(frozen=True)
class BurstResult:
    """What one burst measured: each request's answer, in the order they were sent."""

    size: int
    connect_ms: float  # opening every connection, before any request was sent
    send_spread_ms: float  # from the first request written to the last
    statuses: list[str]  # the HTTP status, or the exception's name
    latencies_ms: list[float]  # from the request written to its whole answer read
    sent_ms: list[float]  # when each was written, after the first
    messages: list[str | None]  # the error's message of an answer other than 200
    cpu_ms_per_request: float = math.nan
    first_error: str | None = None


def _message(body: bytes) -> str:
    """The ``error.message`` of a JSON error body, else the body's start."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


async def run_burst(
    send: Callable[[int], Awaitable[tuple[int, bytes]]], size: int, connect_ms: float = math.nan
) -> BurstResult:
    """Send `size` requests together (`send` returns the status and the body, or raises).

    Every `send` starts in the same turn of the loop, so each writes its request before any
    waits: nothing serialises them on this side (`send_spread_ms` shows how close they went).
    """
    cpu_started = time.process_time()
    first_error: str | None = None

    async def one(sequence: int) -> tuple[str, float, float, str | None]:
        nonlocal first_error
        started = time.perf_counter()
        message = None
        try:
            code, body = await send(sequence)
            status = str(code)
            if code != 200:
                message = _message(body)
        except Exception as exc:  # counted by its kind, not fatal
            status = type(exc).__name__
            message = f"{status}: {exc}"
            first_error = first_error or message
        return status, started, time.perf_counter(), message

    answers = await asyncio.gather(*(one(sequence) for sequence in range(size)))
    cpu_ms = (time.process_time() - cpu_started) * 1000
    first = min((sent for _, sent, _, _ in answers), default=0.0)
    last = max((sent for _, sent, _, _ in answers), default=0.0)
    return BurstResult(
        size=size,
        connect_ms=connect_ms,
        send_spread_ms=round((last - first) * 1000, 3),
        statuses=[status for status, _, _, _ in answers],
        latencies_ms=[round((ended - sent) * 1000, 3) for _, sent, ended, _ in answers],
        sent_ms=[round((sent - first) * 1000, 3) for _, sent, _, _ in answers],
        messages=[message for _, _, _, message in answers],
        cpu_ms_per_request=round(cpu_ms / size, 3) if size else math.nan,
        first_error=first_error,
    )


async def _burst(args: argparse.Namespace) -> BurstResult:
    """The ``burst`` mode: `--load` connections opened first, then a request on each at once."""
    address = urllib.parse.urlsplit(args.url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    size = int(args.load)
    async with RawPool(host, port, args.timeout_s) as pool:
        started = time.perf_counter()
        await pool.connect(size)
        connect_ms = round((time.perf_counter() - started) * 1000, 3)
        bodies = [_body(sequence, args.result_size) for sequence in range(size)]

        async def send(sequence: int) -> tuple[int, bytes]:
            return await pool.post_for_body("/recommendation", bodies[sequence])

        return await run_burst(send, size, connect_ms)


def _body(sequence: int, result_size: int) -> bytes:
    return json.dumps({"user_id": f"bench-{sequence % 10_000}", "resultSize": result_size}).encode()


async def _by_status(args: argparse.Namespace) -> OverloadResult:
    """The ``closed`` and ``open`` modes, over the lean client (`benchmarks.harness.rawhttp`)."""
    address = urllib.parse.urlsplit(args.url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    async with RawPool(host, port, args.timeout_s) as pool:

        async def status_of(sequence: int) -> tuple[int, float]:
            return await pool.post("/recommendation", _body(sequence, args.result_size))

        return await run_by_status(
            status_of,
            args.mode,
            args.load,
            args.duration,
            args.warmup,
            honour_retry_after=args.honour_retry_after,
        )


async def _main(args: argparse.Namespace) -> LoadResult | OverloadResult | BurstResult:
    if args.mode == "burst":
        return await _burst(args)
    if args.mode != "plain":
        return await _by_status(args)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=args.timeout_s)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def post(url: str, body: bytes) -> bool:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                return response.status == 200

        if args.target == "gateway":
            url = f"{args.url}/recommendation"

            async def send(sequence: int) -> bool:
                return await post(url, _body(sequence, args.result_size))

        else:
            mocks = args.url.split(",")

            async def send(sequence: int) -> bool:
                body = _body(sequence, args.result_size)
                return all(await asyncio.gather(*(post(mock, body) for mock in mocks)))

        return await run_load(send, args.concurrency, args.duration, args.warmup)


def main(argv: list[str] | None = None) -> int:
    """Run one load level and print its result as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.harness.loadgen", description=__doc__
    )
    parser.add_argument("--target", choices=["gateway", "floor"], required=True)
    parser.add_argument("--url", required=True, help="gateway base URL, or comma-separated mocks")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--result-size", type=int, default=10)
    parser.add_argument("--timeout-s", type=float, default=10.0)
    parser.add_argument(
        "--mode",
        choices=["plain", "closed", "open", "burst"],
        default="plain",
        help="plain: --concurrency closed loops, good/bad; closed/open: answers by status, "
        "--load connections (closed) or requests per second (open), gateway only; burst: "
        "--load requests at once, each on its own connection, every answer reported",
    )
    parser.add_argument("--load", type=float, default=0.0)
    parser.add_argument(
        "--honour-retry-after",
        action="store_true",
        help="closed mode: after a 503, wait its Retry-After before the next request",
    )
    args = parser.parse_args(argv)
    if args.mode == "plain":
        result: LoadResult | OverloadResult | BurstResult = asyncio.run(_main(args))
    else:
        import uvloop  # the lean client on the fastest loop there is

        result = uvloop.run(_main(args))
    json.dump(asdict(result), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

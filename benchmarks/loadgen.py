"""A closed-loop load generator, run in its own process: ``python -m benchmarks.loadgen``.

`concurrency` virtual users each send a request, wait for the whole answer, and send the next,
for `duration` seconds after a warm-up. Two targets:

- ``gateway``: ``POST {url}/recommendation``, one request per iteration;
- ``floor``: the same body straight to every mock recommender at once (`asyncio.gather` over
  one shared session), no gateway between: the latency and throughput no gateway can beat.

Prints one JSON object: latency percentiles (ms), throughput (requests/s), errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass

import aiohttp

__all__ = ["LoadResult", "percentile", "run_load"]


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


def _body(sequence: int, result_size: int) -> bytes:
    return json.dumps({"user_id": f"bench-{sequence % 10_000}", "resultSize": result_size}).encode()


async def _main(args: argparse.Namespace) -> LoadResult:
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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__)
    parser.add_argument("--target", choices=["gateway", "floor"], required=True)
    parser.add_argument("--url", required=True, help="gateway base URL, or comma-separated mocks")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--result-size", type=int, default=10)
    parser.add_argument("--timeout-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    result = asyncio.run(_main(args))
    json.dump(asdict(result), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

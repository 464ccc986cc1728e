"""What `/feedback` takes: ``python -m benchmarks feedback``, events per second per worker.

Starts the mocks and the gateway under gunicorn with one worker and feedback on in an SQLite
file, makes `--impressions` answers, then posts clicks on their items for `--duration` seconds
from `--concurrency` connections: one event per request, then batches of `--batch`, `--rounds`
times each, alternated. Reports the median round's events accepted per second (and every
round's), and the worker's CPU per event (the store's work included: it runs in the worker's
threads). The clicks go out through the lean client (`benchmarks.harness.rawhttp`), which leaves the
worker the CPU that aiohttp's client would take on a machine of two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from benchmarks.harness.rawhttp import RawPool
from benchmarks.harness.servers import (
    GATEWAY_COMMAND,
    booted_workers,
    cpu_seconds,
    gateway_env,
    mocks,
    serve_gunicorn,
)
from mock_recommenders import DEFAULT_NAMES

__all__ = ["main", "run"]


async def _answers(url: str, count: int, concurrency: int) -> list[tuple[str, list[str]]]:
    """`count` answers: each one's request id and fused item ids."""
    shown: list[tuple[str, list[str]]] = []
    numbers = iter(range(count))

    async def client(session: aiohttp.ClientSession) -> None:
        for n in numbers:
            body = {"user_id": f"user-{n % 1000}", "resultSize": 10}
            async with session.post(f"{url}/recommendation", json=body) as response:
                answer = await response.json()
            if answer.get("fused"):  # not a 502 or 504 of a machine too busy to answer in time
                shown.append((answer["request_id"], [item["id"] for item in answer["fused"]]))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return shown


async def _post_events(
    url: str, shown: list[tuple[str, list[str]]], batch: int, concurrency: int, duration_s: float
) -> dict[str, float]:
    """Post clicks for `duration_s`: (events accepted, requests, errors, elapsed seconds).

    Through the lean client (`benchmarks.harness.rawhttp`, on uvloop): aiohttp's client would spend
    more CPU per request than the worker it measures, on the same two cores.
    """
    rng = random.Random(7)
    totals = {"accepted": 0.0, "requests": 0.0, "errors": 0.0}
    refused: dict[str, int] = {}
    stop = time.monotonic() + duration_s
    address = urllib.parse.urlsplit(url)

    def event() -> dict[str, str]:
        request_id, items = rng.choice(shown)
        return {"request_id": request_id, "item_id": rng.choice(items), "event": "click"}

    async def client(pool: RawPool) -> None:
        while time.monotonic() < stop:
            body: Any = event() if batch == 1 else {"events": [event() for _ in range(batch)]}
            status, text = await pool.post_for_body("/feedback", json.dumps(body).encode())
            answer = json.loads(text)
            totals["requests"] += 1
            if status == 202:
                totals["accepted"] += answer["accepted"] + answer["duplicates"]
            else:
                totals["errors"] += 1
                why = f"{status} {answer['error']['message'][:80]}"
                refused[why] = refused.get(why, 0) + 1

    started = time.monotonic()
    async with RawPool(address.hostname or "127.0.0.1", address.port or 80) as pool:
        await asyncio.gather(*(client(pool) for _ in range(concurrency)))
    totals["elapsed_s"] = time.monotonic() - started
    for why, count in refused.items():
        print(f"refused {count}x: {why}")
    return totals


def _row(batch: int, concurrency: int, runs: list[dict[str, float]]) -> dict[str, Any]:
    """One batch size's figures: the median round, and every round's events per second."""
    per_s = [run["accepted"] / run["elapsed_s"] for run in runs]
    cpu_ms = [run["cpu_s"] * 1000 / run["accepted"] for run in runs if run["accepted"]]
    return {
        "events_per_request": batch,
        "concurrency": concurrency,
        "rounds": len(runs),
        "events_per_s": round(statistics.median(per_s), 1),
        "events_per_s_rounds": [round(value, 1) for value in per_s],
        "requests_per_s": round(
            statistics.median(run["requests"] / run["elapsed_s"] for run in runs), 1
        ),
        "worker_cpu_ms_per_event": round(statistics.median(cpu_ms), 3) if cpu_ms else None,
        "errors": int(sum(run["errors"] for run in runs)),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure single events and batches, `rounds` times each, alternated; one row each."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    with mocks(list(DEFAULT_NAMES), out / "mocks.log") as fleet:
        recommenders = [{"name": n, "url": fleet.url(n)} for n in DEFAULT_NAMES]
        env = gateway_env(
            recommenders,
            feedback__store=f"sqlite:///{(out / 'feedback.db').resolve()}",
            feedback__salt="benchmark-salt",
            log_requests="false",
        )
        command = [*GATEWAY_COMMAND, "--workers", "1"]
        with serve_gunicorn(command, out / "gateway.log", env) as (url, process):
            workers = booted_workers(process.pid, 1)
            shown = asyncio.run(_answers(url, args.impressions, 16))
            time.sleep(0.5)  # written by the worker's writer thread
            rounds: dict[int, list[dict[str, float]]] = {1: [], args.batch: []}
            for _round in range(args.rounds):
                for batch in rounds:  # alternated: a drift of the machine touches both
                    cpu = cpu_seconds(workers)
                    totals = uvloop.run(
                        _post_events(url, shown, batch, args.concurrency, args.duration)
                    )
                    totals["cpu_s"] = cpu_seconds(workers) - cpu
                    rounds[batch].append(totals)
            rows = [_row(batch, args.concurrency, runs) for batch, runs in rounds.items()]
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run it and print the figures (and save them as JSON in the output folder)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks feedback", description=__doc__)
    parser.add_argument("--impressions", type=int, default=2000, help="answers to click (2000)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per run (4)")
    parser.add_argument("--concurrency", type=int, default=16, help="connections (16)")
    parser.add_argument("--batch", type=int, default=100, help="events per batch (100)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each, alternated (5)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results") / time.strftime("feedback-%Y%m%d-%H%M%S"),
    )
    args = parser.parse_args(argv)
    rows = run(args)
    (args.out / "feedback.json").write_text(json.dumps(rows, indent=2))
    print(
        "| events per request | conc. | events/s (median) | each round | requests/s | "
        "worker CPU ms/event | errors |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        each = ", ".join(f"{value:.0f}" for value in row["events_per_s_rounds"])
        print(
            f"| {row['events_per_request']} | {row['concurrency']} | {row['events_per_s']} | "
            f"{each} | {row['requests_per_s']} | {row['worker_cpu_ms_per_event']} | "
            f"{row['errors']} |"
        )
    return 0

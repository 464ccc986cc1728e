"""What `/feedback` takes: ``python -m benchmarks feedback``, events per second per worker.

Starts the mocks and the gateway under gunicorn with one worker and feedback on in an SQLite
file, makes `--impressions` answers, then posts clicks on their items for `--duration` seconds
from `--concurrency` connections: one event per request, then batches of `--batch`. Reports
the events accepted per second and the worker's CPU per event (the store's work included: it
runs in the worker's threads).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.harness import (
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
    """Post clicks for `duration_s`: (events accepted, requests, errors, elapsed seconds)."""
    rng = random.Random(7)
    counter = itertools.count()
    totals = {"accepted": 0.0, "requests": 0.0, "errors": 0.0}
    refused: dict[str, int] = {}
    stop = time.monotonic() + duration_s

    def event() -> dict[str, str]:
        request_id, items = rng.choice(shown)
        return {"request_id": request_id, "item_id": rng.choice(items), "event": "click"}

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop:
            body: Any = event() if batch == 1 else {"events": [event() for _ in range(batch)]}
            body_bytes = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", "X-Request-ID": f"fb-{next(counter)}"}
            async with session.post(f"{url}/feedback", data=body_bytes, headers=headers) as r:
                answer = await r.json()
            totals["requests"] += 1
            if r.status == 202:
                totals["accepted"] += answer["accepted"] + answer["duplicates"]
            else:
                totals["errors"] += 1
                why = f"{r.status} {answer['error']['message'][:80]}"
                refused[why] = refused.get(why, 0) + 1

    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    totals["elapsed_s"] = time.monotonic() - started
    for why, count in refused.items():
        print(f"refused {count}x: {why}")
    return totals


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure single events and batches; one row each."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
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
            for batch in (1, args.batch):
                cpu = cpu_seconds(workers)
                totals = asyncio.run(
                    _post_events(url, shown, batch, args.concurrency, args.duration)
                )
                used = cpu_seconds(workers) - cpu
                events = totals["accepted"]
                rows.append(
                    {
                        "events_per_request": batch,
                        "concurrency": args.concurrency,
                        "events_per_s": round(events / totals["elapsed_s"], 1),
                        "requests_per_s": round(totals["requests"] / totals["elapsed_s"], 1),
                        "worker_cpu_ms_per_event": round(used * 1000 / events, 3)
                        if events
                        else None,
                        "errors": int(totals["errors"]),
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run it and print the figures (and save them as JSON in the output folder)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks feedback", description=__doc__)
    parser.add_argument("--impressions", type=int, default=2000, help="answers to click (2000)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (5)")
    parser.add_argument("--concurrency", type=int, default=16, help="connections (16)")
    parser.add_argument("--batch", type=int, default=100, help="events per batch (100)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results") / time.strftime("feedback-%Y%m%d-%H%M%S"),
    )
    args = parser.parse_args(argv)
    rows = run(args)
    (args.out / "feedback.json").write_text(json.dumps(rows, indent=2))
    print("| events per request | conc. | events/s | requests/s | worker CPU ms/event | errors |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['events_per_request']} | {row['concurrency']} | {row['events_per_s']} | "
            f"{row['requests_per_s']} | {row['worker_cpu_ms_per_event']} | {row['errors']} |"
        )
    return 0

"""``python -m benchmarks soak``: does the gateway hold steady over half an hour with feedback on?

It starts the four mock recommenders (20 ms each) and the gateway under gunicorn
(`--workers` 2, settings as shipped) with feedback on: the SQLite store in a scratch folder,
or with ``--store redis`` a redis-server of its own (`benchmarks.harness.redisserver`). Then
`--users` (4) closed-loop users, for `--minutes` (30): each POSTs /recommendation (one of
5,000 user ids, 10 items), clicks one item of ``fused`` in 30% of the 200s (POST /feedback),
and GETs /experiments after 1% of its requests. Each user has its connection closed after
every 100th recommendation and opens another: kept for the whole run, the connections are
spread over the workers once, as the kernel pleases (3 and 1 in one try; in another, one
worker's memory never moved, as if it served nothing), and an idle worker's memory says
nothing. Every `--sample-s` (30) seconds, and once before the load, a sample: each worker's
resident memory (RSS) and CPU time by pid, what every request was answered so far by status
(a request that got no answer is counted by its error's name), and the feedback store's size
(the SQLite files, ``-wal`` and ``-shm`` included; Redis's ``used_memory``).

Writes `soak.json` (every sample) and `soak.md` (the samples thinned to about 14 rows, and per
worker the RSS growth in the first and the second half of the run, with its verdict:
`benchmarks.soak.report`) to `docs/benchmarks/soak/` (`--out`), and prints the report. The
store, the gunicorn, mock and redis logs go to a temporary folder removed at the end, or to
`--work`. Exits 1 when a check is not met: a worker still growing in the second half, or
doing less than its part of the work, a /feedback answer other than 202, a request that got
no answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis
import uvloop

from benchmarks.harness.redisserver import serve_redis
from benchmarks.harness.servers import (
    GATEWAY_COMMAND,
    ROOT,
    booted_workers,
    children,
    cpu_seconds,
    gateway_env,
    mocks,
    rss_mb,
    run_with_spinner,
    serve_gunicorn,
    source_commit,
)
from benchmarks.soak.report import checks, clock, markdown, worker_summary, write
from mock_recommenders import DEFAULT_NAMES

__all__ = ["STORES", "SoakPlan", "main", "parse_plan", "run_soak"]

STORES = ("sqlite", "redis")
SQLITE_FILE = "feedback.db"
ENDPOINTS = ("recommendations", "feedback", "experiments")
# A request that gets no answer in this long is counted as an error, and its user goes on.
REQUEST_TIMEOUT_S = 30.0
# After an error, a user waits this long before its next request, so that a gateway that is
# gone is not asked in a busy loop.
AFTER_ERROR_S = 0.1


@dataclass
class SoakPlan:
    """What to run."""

    minutes: float = 30.0
    sample_s: float = 30.0
    workers: int = 2
    users: int = 4
    store: str = "sqlite"
    delay_ms: float = 20.0
    click_share: float = 0.3
    experiments_share: float = 0.01
    user_ids: int = 5000
    result_size: int = 10
    reconnect_every: int = 100


Counts = dict[str, Counter[str]]


class Store:
    """The feedback store's URL for the gateway, and how big it is now, in bytes."""

    def __init__(self, url: str, size: Callable[[], tuple[int, dict[str, int]]]) -> None:
        self.url = url
        self.size = size


def _sqlite(folder: Path) -> Store:
    path = folder.resolve() / SQLITE_FILE

    def size() -> tuple[int, dict[str, int]]:
        files: dict[str, int] = {}
        for file in sorted(folder.glob(f"{SQLITE_FILE}*")):  # the db, -wal, -shm, -journal
            with contextlib.suppress(OSError):
                files[file.name] = file.stat().st_size
        return sum(files.values()), files

    return Store(f"sqlite:///{path}", size)


@contextlib.contextmanager
def _redis(folder: Path) -> Iterator[Store]:
    with serve_redis(folder) as url:
        client = redis.Redis.from_url(url, socket_timeout=5.0)

        def size() -> tuple[int, dict[str, int]]:
            used = int(client.info("memory")["used_memory"])
            return used, {"used_memory": used}

        try:
            yield Store(url, size)
        finally:
            client.close()


async def _user(
    number: int,
    session: aiohttp.ClientSession,
    url: str,
    plan: SoakPlan,
    stop_at: float,
    counts: Counts,
) -> None:
    """One closed-loop user until `stop_at`: recommendation, maybe a click, maybe /experiments."""
    rng = random.Random(number)
    sent = 0
    while time.monotonic() < stop_at:
        user_id = f"soak-{rng.randrange(plan.user_ids)}"
        request = {"user_id": user_id, "resultSize": plan.result_size}
        sent += 1
        # The gateway closes the connection after answering; the next request opens another,
        # on whichever worker accepts it.
        close = {"Connection": "close"} if sent % plan.reconnect_every == 0 else None
        asked = "recommendations"  # the request in flight, for the count of one that fails
        try:
            post = session.post(f"{url}/recommendation", json=request, headers=close)
            async with post as answer:
                body = await answer.json(content_type=None) if answer.status == 200 else None
                await answer.read()
            counts[asked][str(answer.status)] += 1
            if body and body.get("fused") and rng.random() < plan.click_share:
                asked = "feedback"
                event = {
                    "request_id": body["request_id"],
                    "item_id": rng.choice(body["fused"])["id"],
                    "event": "click",
                }
                async with session.post(f"{url}/feedback", json=event) as answer:
                    await answer.read()
                counts[asked][str(answer.status)] += 1
            if rng.random() < plan.experiments_share:
                asked = "experiments"
                async with session.get(f"{url}/experiments") as answer:
                    await answer.read()
                counts[asked][str(answer.status)] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            counts[asked][type(exc).__name__] += 1
            await asyncio.sleep(AFTER_ERROR_S)


def _sample(started: float, master: int, counts: Counts, store: Store) -> dict[str, Any]:
    size, files = store.size()
    workers = children(master)
    rss = {str(pid): rss_mb(pid) for pid in workers}
    return {
        "t_s": round(time.monotonic() - started, 1),
        "rss_mb": {pid: mb for pid, mb in rss.items() if mb is not None},
        "cpu_s": {str(pid): round(cpu_seconds([pid]), 2) for pid in workers},
        **{endpoint: dict(sorted(counts[endpoint].items())) for endpoint in ENDPOINTS},
        "store_bytes": size,
        "store_files": files,
    }


async def _soak(
    plan: SoakPlan, url: str, master: int, store: Store, progress: Callable[[dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """The load and the samples: one before it starts, then every `sample_s`, one at the end."""
    counts: Counts = {endpoint: Counter() for endpoint in ENDPOINTS}
    started = time.monotonic()
    samples = [_sample(started, master, counts, store)]
    stop_at = started + plan.minutes * 60
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        users = asyncio.gather(
            *(_user(n, session, url, plan, stop_at, counts) for n in range(plan.users))
        )
        load = asyncio.ensure_future(users)
        number = 1
        while not load.done():
            due = started + number * plan.sample_s
            # The last sample waits for the users' last answers, however long they take.
            wait = None if due >= stop_at else max(0.0, due - time.monotonic())
            await asyncio.wait([load], timeout=wait)
            samples.append(_sample(started, master, counts, store))
            progress(samples[-1])
            number += 1
        load.result()  # a user that failed on what it does not expect fails the run
    return samples


def run_soak(
    plan: SoakPlan, work: Path, progress: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Start the mocks, the store and the gateway in `work`; soak; the results and checks."""
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with contextlib.ExitStack() as stack:
        fleet = stack.enter_context(
            mocks(list(DEFAULT_NAMES), work / "mocks.log", "--delay-ms", str(plan.delay_ms))
        )
        store = stack.enter_context(_redis(work)) if plan.store == "redis" else _sqlite(work)
        recommenders = [{"name": name, "url": fleet.url(name)} for name in DEFAULT_NAMES]
        env = gateway_env(recommenders, feedback__store=store.url, feedback__salt="soak")
        command = [*GATEWAY_COMMAND, "--workers", str(plan.workers)]
        url, process = stack.enter_context(serve_gunicorn(command, work / "gateway.log", env))
        booted_workers(process.pid, plan.workers)
        samples = uvloop.run(_soak(plan, url, process.pid, store, progress))
    results: dict[str, Any] = {
        "plan": asdict(plan),
        "commit": source_commit(),
        "cpus": os.cpu_count(),
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "store_bytes_is": (
            "Redis's used_memory"
            if plan.store == "redis"
            else f"the size of {SQLITE_FILE} and its -wal and -shm files"
        ),
        "samples": samples,
    }
    results["workers"] = worker_summary(samples)
    results["checks"] = checks(results)
    return results


def parse_plan(argv: list[str] | None = None) -> tuple[SoakPlan, Path, Path | None]:
    """The plan, the output folder and the scratch folder (None: a temporary one)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs (30)")
    parser.add_argument("--sample-s", type=float, default=30.0, help="seconds between samples (30)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (2)")
    parser.add_argument("--users", type=int, default=4, help="closed-loop users (4)")
    parser.add_argument("--store", choices=STORES, default="sqlite", help="feedback store (sqlite)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="each mock's delay (20)")
    parser.add_argument(
        "--out", type=Path, help="where soak.json and soak.md go (default docs/benchmarks/soak)"
    )
    parser.add_argument(
        "--work", type=Path, help="where the store and the logs go (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.sample_s <= 0:
        parser.error("--minutes and --sample-s must be positive")
    if args.workers < 1 or args.users < 1:
        parser.error("--workers and --users must be positive")
    plan = SoakPlan(
        minutes=args.minutes,
        sample_s=args.sample_s,
        workers=args.workers,
        users=args.users,
        store=args.store,
        delay_ms=args.delay_ms,
    )
    return plan, args.out or ROOT / "docs" / "benchmarks" / "soak", args.work


def main(argv: list[str] | None = None) -> int:
    """Run the soak, print its report and write it; 1 if a check was not met."""
    plan, out, work = parse_plan(argv)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        work.mkdir(parents=True, exist_ok=True)

        def run(advance: Callable[[str], None]) -> dict[str, Any]:
            def progress(sample: dict[str, Any]) -> None:
                rss = ", ".join(f"{mb:.1f}" for mb in sample["rss_mb"].values())
                sent = sum(sample["recommendations"].values())
                advance(
                    f"{clock(sample['t_s'])} of {clock(plan.minutes * 60)}: "
                    f"{sent:,} recommendations, workers {rss} MB"
                )

            advance(f"starting the mocks, the {plan.store} store and the gateway")
            return run_soak(plan, work, progress)

        results, console = run_with_spinner(run)
    written = write(results, out)
    console.print(markdown(results))
    console.print(f"written: {', '.join(str(path) for path in written)}")
    return 0 if all(check["met"] for check in results["checks"]) else 1

"""What an impression costs each feedback store, and that retention bounds it:
``python -m benchmarks storage``.

Three measurements, through the stores' own interface (`SQLiteStore`, `RedisStore`), on
answers shaped as the gateway records them (`EncodedImpression.of_answer`): ten items, each
from one to four of four recommenders, seeded so every run sees the same ones; a worker's
flushes of 20; a click on three answers in ten, with the id the gateway gives an event sent
without one (``implicit:click:<item>``), so the duplicates table is counted too.

- **Bytes per impression.** `--impressions` answers into a fresh SQLite file (the used pages
  after a checkpoint, and per table and index where SQLite has `dbstat`), and into an empty
  Redis database (`used_memory` grown). Twice: with item ids like the mocks' (``i123``), and
  with 36-character UUIDs, as many catalogues have.
- **Retention in SQLite.** A clock the benchmark moves: `--rate` answers a (simulated) second
  for three retentions of `--retention-s`, `expire` every minute as the gateway's writer runs
  it; the file's used bytes and the live count sampled six times a retention. Once a retention
  has passed, deleted rows' pages are reused: the file stops growing.
- **Retention in Redis.** Real time (Redis deletes by TTL, on its own clock): answers at
  `--redis-rate` a second for three retentions of `--redis-retention-s`; `used_memory` and
  the keys sampled every second.

Writes `storage.json` and `storage.md` (with the sizing table: a day and a week at 10, 100
and 1,000 answers a second) into `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from benchmarks.harness.answers import fused_item
from benchmarks.harness.redisserver import serve_redis
from benchmarks.harness.servers import source_commit
from gateway.feedback.impressions import EncodedImpression, FeedbackEvent
from gateway.feedback.redis_store import RedisStore
from gateway.feedback.sqlite_store import SQLiteStore
from gateway.feedback.store import FeedbackStore

__all__ = ["main", "measure_bytes", "retention_redis", "retention_sqlite"]

FLUSH = 20
CLICKED = 0.3
RATES = (10, 100, 1000)
WEEK_DAYS = 7
DAY_S = 86_400


def answers(count: int, seed: int, long_ids: bool) -> Iterator[tuple[list[dict[str, Any]], str]]:
    """`count` answers of ten items in `Fuser.fuse`'s form, each with one item to click."""

    def item_id(draw: random.Random) -> str:
        # The UUID is drawn either way, so both forms hold the same answers.
        long_id = str(uuid.UUID(int=draw.getrandbits(128)))
        return long_id if long_ids else f"i{draw.randrange(1000)}"

    draw = random.Random(seed)
    for _ in range(count):
        items = [fused_item(draw, item_id) for _position in range(10)]
        yield items, str(draw.choice(items)["id"])


def feed(
    store: FeedbackStore, count: int, clock: Callable[[], float], seed: int, long_ids: bool
) -> None:
    """Save `count` answers in flushes of `FLUSH`, and click three in ten, as a worker would."""
    draw = random.Random(seed + 1)
    batch: list[EncodedImpression] = []
    clicks: list[FeedbackEvent] = []
    for items, clicked in answers(count, seed, long_ids):
        request_id = f"{draw.getrandbits(128):032x}"
        batch.append(
            EncodedImpression.of_answer(request_id, clock(), None, items, (None,) * len(items))
        )
        if draw.random() < CLICKED:
            clicks.append(FeedbackEvent(request_id, clicked, "click", f"implicit:click:{clicked}"))
        if len(batch) == FLUSH:
            store.save_impressions(batch)
            store.record(clicks)
            batch, clicks = [], []
    store.save_impressions(batch)
    store.record(clicks)


def sqlite_used(path: Path) -> dict[str, Any]:
    """The file's used bytes after a checkpoint, its size, and per table where `dbstat` is."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        (free,) = db.execute("PRAGMA freelist_count").fetchone()
        try:
            parts = dict(
                db.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall()
            )
        except sqlite3.OperationalError:  # built without SQLITE_ENABLE_DBSTAT_VTAB
            parts = {}
    files = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return {"used": (pages - free) * page_size, "file": files, "parts": parts}


def redis_memory(url: str) -> tuple[int, int]:
    """Redis' `used_memory` and its number of keys."""
    client = redis.Redis.from_url(url)
    try:
        memory = int(client.info("memory")["used_memory"])
        return memory, int(client.dbsize())
    finally:
        client.close()


def measure_bytes(folder: Path, count: int, redis_url: str | None) -> dict[str, Any]:
    """Bytes per impression in each store, with short and with long item ids."""
    found: dict[str, Any] = {}
    for long_ids in (False, True):
        ids = "uuid" if long_ids else "short"
        path = folder / f"bytes-{ids}.db"
        sqlite_store = SQLiteStore(path, 7 * DAY_S)
        feed(sqlite_store, count, time.time, 7, long_ids)
        sqlite_store.close()
        used = sqlite_used(path)
        sample = EncodedImpression.of_answer(
            "0" * 32, 0.0, None, next(answers(1, 7, long_ids))[0], (None,) * 10
        )
        found[ids] = {
            "record": len(sample.body),
            "sqlite": used["used"] / count,
            "sqlite_file": used["file"] / count,
            "sqlite_parts": {name: size / count for name, size in used["parts"].items()},
        }
        if redis_url is not None:
            client = redis.Redis.from_url(redis_url)
            client.flushall()
            client.close()
            before, _keys = redis_memory(redis_url)
            store = RedisStore(redis_url, 7 * DAY_S)
            feed(store, count, time.time, 7, long_ids)
            store.close()
            after, keys = redis_memory(redis_url)
            found[ids] |= {"redis": (after - before) / count, "redis_keys": keys}
    return found


class _Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def retention_sqlite(folder: Path, retention_s: float, rate: int) -> list[dict[str, Any]]:
    """Three retentions at `rate` answers a simulated second, expiring every minute."""
    clock = _Clock(1_700_000_000.0)
    path = folder / "retention.db"
    store = SQLiteStore(path, retention_s, clock)
    start, step = clock.now, 60.0
    samples, every = [], retention_s / 6
    next_sample = 0.0
    seed = 0
    while clock.now - start < 3 * retention_s:
        seed += 1
        feed(store, int(rate * step), clock, seed, False)
        clock.now += step
        store.expire()
        elapsed = clock.now - start
        if elapsed >= next_sample:
            next_sample += every
            used = sqlite_used(path)
            samples.append(
                {
                    "retentions": round(elapsed / retention_s, 2),
                    "live": store.stats().impressions_stored,
                    "used_bytes": used["used"],
                    "file_bytes": used["file"],
                }
            )
    store.close()
    return samples


def retention_redis(url: str, retention_s: float, rate: int) -> list[dict[str, Any]]:
    """Three retentions of real time at `rate` answers a second; memory sampled each second."""
    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()
    base, _keys = redis_memory(url)
    store = RedisStore(url, retention_s)
    samples, start, seed = [], time.monotonic(), 0
    while (elapsed := time.monotonic() - start) < 3 * retention_s:
        second = time.monotonic()
        seed += 1
        feed(store, rate, time.time, seed, False)
        memory, keys = redis_memory(url)
        samples.append(
            {
                "retentions": round(elapsed / retention_s, 2),
                "used_bytes": memory - base,
                "keys": keys,
                "live": store.stats().impressions_stored,
            }
        )
        time.sleep(max(0.0, 1.0 - (time.monotonic() - second)))
    store.close()
    return samples


def _size(bytes_: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if bytes_ >= scale:
            return f"{bytes_ / scale:.1f} {unit}"
    return f"{bytes_:.0f} B"


def report(found: dict[str, Any]) -> str:
    """The Markdown report: bytes per impression, the sizing table, and retention."""
    lines = [
        "# Feedback storage: bytes per impression, and retention",
        "",
        f"`python -m benchmarks storage`, commit {found['commit']}, "
        f"{found['impressions']:,} answers of ten items each (3 in 10 clicked).",
        "",
        "| item ids | record (B) | SQLite used (B) | SQLite files (B) | Redis used_memory (B) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for ids, row in found["bytes"].items():
        redis_cell = f"{row['redis']:.0f}" if "redis" in row else "—"
        lines.append(
            f"| {ids} | {row['record']} | {row['sqlite']:.0f} | {row['sqlite_file']:.0f} "
            f"| {redis_cell} |"
        )
    parts = found["bytes"]["short"]["sqlite_parts"]
    if parts:
        lines += ["", "SQLite, short ids, per table and index (bytes per impression):", ""]
        lines += [f"- `{name}`: {size:.0f}" for name, size in sorted(parts.items())]
    lines += [
        "",
        f"## Sizing (short ids; a week is the default retention, {WEEK_DAYS} days)",
        "",
        "| answers a second | SQLite a day | SQLite a week | Redis a day | Redis a week |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    short = found["bytes"]["short"]
    for rate in RATES:
        day = rate * DAY_S
        redis_day = short.get("redis", 0.0) * day
        lines.append(
            f"| {rate:,} | {_size(short['sqlite'] * day)} | {_size(short['sqlite'] * day * 7)} "
            f"| {_size(redis_day) if redis_day else '—'} "
            f"| {_size(redis_day * 7) if redis_day else '—'} |"
        )
    sqlite_run = found["retention_sqlite"]
    lines += [
        "",
        f"## Retention in SQLite ({found['retention_s']:g} s simulated, {found['rate']} "
        "answers a second, `expire` every minute)",
        "",
        "| retentions passed | live count | used bytes | file bytes |",
        "| ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {s['retentions']} | {s['live']:,} | {s['used_bytes']:,} | {s['file_bytes']:,} |"
        for s in sqlite_run
    ]
    redis_run = found.get("retention_redis")
    if redis_run:
        lines += [
            "",
            f"## Retention in Redis ({found['redis_retention_s']:g} s real time, "
            f"{found['redis_rate']} answers a second, deleted by TTL)",
            "",
            "| retentions passed | keys | live count | used_memory grown (bytes) |",
            "| ---: | ---: | ---: | ---: |",
        ]
        thinned = redis_run[:: max(1, len(redis_run) // 12)]
        lines += [
            f"| {s['retentions']} | {s['keys']:,} | {s['live']:,} | {s['used_bytes']:,} |"
            for s in thinned
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure, print the report, and write it with the figures into `--out`."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks storage", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--impressions", type=int, default=50_000, help="answers stored (50000)")
    parser.add_argument(
        "--retention-s", type=float, default=3600.0, help="SQLite's simulated retention (3600)"
    )
    parser.add_argument("--rate", type=int, default=20, help="SQLite: answers a second (20)")
    parser.add_argument(
        "--redis-retention-s", type=float, default=10.0, help="Redis' real retention (10)"
    )
    parser.add_argument("--redis-rate", type=int, default=1000, help="Redis: answers a second")
    parser.add_argument("--no-redis", action="store_true", help="SQLite only")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/storage"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        with contextlib.ExitStack() as stack:
            url = None if args.no_redis else stack.enter_context(serve_redis(folder))
            found: dict[str, Any] = {
                "commit": source_commit(),
                "impressions": args.impressions,
                "retention_s": args.retention_s,
                "rate": args.rate,
                "redis_retention_s": args.redis_retention_s,
                "redis_rate": args.redis_rate,
                "bytes": measure_bytes(folder, args.impressions, url),
                "retention_sqlite": retention_sqlite(folder, args.retention_s, args.rate),
            }
            if url is not None:
                found["retention_redis"] = retention_redis(
                    url, args.redis_retention_s, args.redis_rate
                )
    text = report(found)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "storage.json").write_text(json.dumps(found, indent=1) + "\n")
    (args.out / "storage.md").write_text(text)
    print(text)
    print(f"written to {args.out}{os.sep}storage.md")
    return 0

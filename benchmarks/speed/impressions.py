"""What keeping impressions costs, in process: ``python -m benchmarks impressions``.

The CPU one worker spends per answer shown with feedback on, with no HTTP in the way (the
`features` A/B measures it under load, where a shared machine's noise is larger than the
cost). Two figures, on one `FeedbackService` over an SQLite file in a temporary folder:

- the loop's side: `assign` (the user's pseudonym) and `record` (the impression encoded and
  appended), back to back, best of `--rounds` (thread CPU time);
- the writer's side: `flush` of `--batch` impressions at a time, with `--gap-ms` between
  flushes so that it wakes with cold caches as the writer thread does in a worker, into a file
  already holding `--prefill` impressions; median and mean per impression over `--flushes`.

The answers are ten items each, from one to four of four recommenders with their ranks and
scores, as `Fuser.fuse` makes them (seeded, so every run sees the same ones).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.harness.answers import RECOMMENDERS, fused_item
from gateway.config.feedback import FeedbackSettings
from gateway.core.fusion import FusedRanking
from gateway.feedback.service import FeedbackService

__all__ = ["answers", "main", "measure"]


def answers(count: int, seed: int = 7) -> list[FusedRanking]:
    """`count` fused answers of ten items, in `Fuser.fuse`'s form."""
    draw = random.Random(seed)
    made = []
    for _ in range(count):
        items = [fused_item(draw, lambda d: f"i{d.randrange(1000)}") for _position in range(10)]
        made.append(FusedRanking("rrf", items, 1.0, (None,) * len(items)))
    return made


def measure(
    folder: Path, batch: int, prefill: int, flushes: int, gap_s: float, rounds: int
) -> dict[str, float]:
    """The loop's and the writer's CPU per impression, in µs."""
    settings = FeedbackSettings(store=f"sqlite:///{folder / 'feedback.db'}", salt="benchmark-salt")
    service = FeedbackService(settings, dict.fromkeys(RECOMMENDERS, 1.0), record_metrics=False)
    shown = answers(200)
    sequence = 0

    def show(count: int) -> None:
        nonlocal sequence
        for _ in range(count):
            sequence += 1
            assignment = service.assign(f"user-{sequence % 10_000}", None)
            service.record(f"{sequence:032x}", assignment, shown[sequence % len(shown)])

    for _ in range(prefill // 1000):
        show(1000)
        service.flush()
    loop = []
    for _ in range(rounds):
        started = time.thread_time()
        show(batch)
        loop.append((time.thread_time() - started) / batch)
        service.flush()
    writer = []
    for _ in range(flushes):
        show(batch)
        time.sleep(gap_s)
        started = time.thread_time()
        service.flush()
        writer.append((time.thread_time() - started) / batch)
    service.close()
    return {
        "loop_us": round(min(loop) * 1e6, 1),
        "writer_median_us": round(statistics.median(writer) * 1e6, 1),
        "writer_mean_us": round(statistics.mean(writer) * 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure and print one line per batch size."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks impressions",
        description="What keeping impressions costs a worker, in process.",
    )
    parser.add_argument("--batch", default="6,20", help="impressions per flush (6,20)")
    parser.add_argument("--prefill", type=int, default=20_000, help="impressions stored first")
    parser.add_argument("--flushes", type=int, default=100, help="flushes measured (100)")
    parser.add_argument("--gap-ms", type=float, default=100.0, help="between flushes (100)")
    parser.add_argument("--rounds", type=int, default=200, help="rounds of the loop's side")
    args = parser.parse_args(argv)
    for batch in [int(size) for size in args.batch.split(",") if size.strip()]:
        with tempfile.TemporaryDirectory() as folder:
            found = measure(
                Path(folder), batch, args.prefill, args.flushes, args.gap_ms / 1000, args.rounds
            )
        print(
            f"batch {batch}, {args.prefill} stored: loop {found['loop_us']} µs/answer (best), "
            f"writer {found['writer_median_us']} µs/impression (median; mean "
            f"{found['writer_mean_us']})"
        )
    return 0

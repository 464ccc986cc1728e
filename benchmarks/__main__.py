"""``python -m benchmarks`` (``make bench``): compare the fan-out strategies, side by side.

``python -m benchmarks quality`` (``make quality``) scores the recommenders and the fusion
strategies against the mocks' synthetic truth instead: see `benchmarks.quality`.
``python -m benchmarks features`` measures what each feature of the gateway costs, one
switched off at a time: see `benchmarks.speed.features`; ``python -m benchmarks tracing`` what
tracing costs, off, at 100% and at 1%: see `benchmarks.speed.tracing`. ``python -m benchmarks
scaleout`` (``make scaleout``) runs two gateways behind nginx and stops one mid-load: see
`benchmarks.scaleout`. ``python -m benchmarks feedback`` measures `/feedback`'s events per
second per worker on the SQLite store: see `benchmarks.speed.feedback`; ``python -m benchmarks
impressions`` what keeping impressions costs a worker, in process: see
`benchmarks.speed.impressions`; ``python -m benchmarks storage`` the bytes an impression
takes in each store, and that retention bounds them: see `benchmarks.storage`.
``python -m benchmarks online`` plays simulated users who click, and measures what the gateway
learns from them (interleaving against A/B, learnt weights): see `benchmarks.online`.
``python -m benchmarks soak`` runs the gateway with feedback on under steady load for half an
hour and samples its workers' memory and the feedback store: see `benchmarks.soak`.

Starts the mock recommenders, then the gateway under gunicorn once per strategy (and the
per-call-session reference), drives each with a closed-loop load generator in its own process
at several concurrency levels, measures the floor (the mocks called directly), and writes a
table, `results.json`, `report.md` and PNG plots into the output folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.harness.servers import pick
from benchmarks.speed.report import figures, table, write_all
from benchmarks.speed.run import TARGETS, Plan, run_benchmark

__all__ = ["main"]


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers")
    return values


def parse_plan(argv: list[str] | None = None) -> tuple[Plan, Path]:
    """The plan and output folder the command line asks for."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.splitlines()[0],
        epilog="Ranking quality instead of speed: python -m benchmarks quality --help; "
        "what each feature costs: python -m benchmarks features --help; "
        "what tracing costs: python -m benchmarks tracing --help; "
        "what one recommender call costs each HTTP client: python -m benchmarks clients --help; "
        "goodput under overload: python -m benchmarks overload --help; "
        "two gateways behind nginx, one stopped: python -m benchmarks scaleout --help; "
        "learning from simulated clicks: python -m benchmarks online --help; "
        "bytes per impression in each store: python -m benchmarks storage --help; "
        "memory over half an hour with feedback on: python -m benchmarks soak --help",
    )
    parser.add_argument("--levels", type=_ints, help="concurrency levels (default 1,8,32,64)")
    parser.add_argument("--duration", type=float, help="seconds measured per level (default 10)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per level (default 1)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="each mock's delay")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="each mock's random extra")
    parser.add_argument(
        "--recommenders", type=int, default=4, choices=range(1, 17), metavar="1..16"
    )
    parser.add_argument(
        "--widths",
        type=_ints,
        help="fan-out widths for the speed-up sweep (default 1,4,16; 0 to skip)",
    )
    parser.add_argument("--no-widths", action="store_true", help="skip the width sweep")
    parser.add_argument(
        "--workers", type=int, help="gunicorn workers for the gateway (default: its config)"
    )
    parser.add_argument("--targets", help=f"comma-separated subset of {','.join(TARGETS)}")
    parser.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    parser.add_argument(
        "--out", type=Path, help="output folder (default benchmarks/results/<timestamp>)"
    )
    args = parser.parse_args(argv)

    plan = Plan(
        delay_ms=args.delay_ms,
        jitter_ms=args.jitter_ms,
        recommenders=args.recommenders,
        workers=args.workers,
    )
    if args.quick:
        plan.levels, plan.duration_s, plan.warmup_s, plan.widths = [1, 8], 1.5, 0.3, [1, 4]
    plan.levels = args.levels or plan.levels
    plan.duration_s = args.duration if args.duration is not None else plan.duration_s
    plan.warmup_s = args.warmup if args.warmup is not None else plan.warmup_s
    plan.widths = [] if args.no_widths else (args.widths or plan.widths)
    if any(w > 16 for w in plan.widths):
        parser.error("--widths go from 1 to 16")
    if args.targets:
        try:
            plan.targets = pick(args.targets, TARGETS, "targets")
        except ValueError as exc:
            parser.error(str(exc))
    out = args.out or Path("benchmarks/results") / time.strftime("%Y%m%d-%H%M%S")
    return plan, out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with a progress bar, then print and save the figures."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["quality"]:
        from benchmarks.quality import run as quality

        return quality.main(argv[1:])
    if argv[:1] == ["features"]:
        from benchmarks.speed import features

        return features.main(argv[1:])
    if argv[:1] == ["storage"]:
        from benchmarks.storage import run as storage

        return storage.main(argv[1:])
    if argv[:1] == ["impressions"]:
        from benchmarks.speed import impressions

        return impressions.main(argv[1:])
    if argv[:1] == ["overload"]:
        from benchmarks.speed import overload

        return overload.main(argv[1:])
    if argv[:1] == ["tracing"]:
        from benchmarks.speed import tracing

        return tracing.main(argv[1:])
    if argv[:1] == ["feedback"]:
        from benchmarks.speed import feedback

        return feedback.main(argv[1:])
    if argv[:1] == ["scaleout"]:
        from benchmarks.scaleout import run as scaleout

        return scaleout.main(argv[1:])
    if argv[:1] == ["clients"]:
        from benchmarks.speed import clients

        return clients.main(argv[1:])
    if argv[:1] == ["online"]:
        from benchmarks.online import run as online

        return online.main(argv[1:])
    if argv[:1] == ["soak"]:
        from benchmarks.soak import run as soak

        return soak.main(argv[1:])
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    plan, out = parse_plan(argv)
    out.mkdir(parents=True, exist_ok=True)
    # A wide table even when the output is not a terminal (a log file, CI).
    console = Console(width=None if sys.stdout.isatty() else 140)
    steps = len(plan.targets) * len(plan.levels) + 3 * len(plan.widths)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("starting", total=steps)
        started = [False]

        def advance(description: str) -> None:
            if started[0]:
                progress.advance(task)
            started[0] = True
            progress.update(task, description=description)

        results = run_benchmark(plan, out, advance)
        progress.advance(task)
    written = write_all(results, out)
    console.print(table(results))
    for label, measured, goal, met in figures(results):
        mark = "-" if met is None else ("met" if met else "MISSED")
        console.print(f"  {label}: {measured} (goal {goal}) {mark}")
    console.print(f"\nwritten: {', '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

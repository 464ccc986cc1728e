"""What each feature costs: ``python -m benchmarks features``, an A/B of the gateway's features.

The gateway with its shipped config ("all on") against the same gateway with one feature
switched off at a time, and with all of them off:

- ``metrics off``: `metrics: false` (no Prometheus recording);
- ``request log off``: `log_requests: false` (no JSON line per request);
- ``fusion off``: `fusion: none` (no fused ranking);
- ``breakers off``: `breaker.enabled: false` (no circuit breaker around each call);

and with one feature that ships off switched on:

- ``feedback on``: feedback in an SQLite file in the output folder (each answer's impression
  kept and written by the workers' writer threads; the load sends no clicks).

`--variants "all on,feedback on"` runs only those.

Each variant runs under gunicorn in front of the same mocks, at each concurrency level, and the
whole rotation is repeated (`--repeats`): a feature's cost is a few percent, and this machine's
speed drifts by more than that over minutes, so each figure is the median of its repeats,
measured between the others'. A feature's cost is the gateway's CPU per request with it on
minus with it off, and the throughput given up for it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness.servers import (
    GATEWAY_COMMAND,
    booted_workers,
    gateway_env,
    measure_level,
    mocks,
    run_with_spinner,
    serve_gunicorn,
)
from benchmarks.quality.ranking_metrics import mean_ci
from mock_recommenders import DEFAULT_NAMES

__all__ = ["VARIANTS", "FeaturesPlan", "cost", "main", "median_row", "paired_costs", "run_features"]

VARIANTS: dict[str, dict[str, str]] = {
    "all on": {},
    "metrics off": {"metrics": "false"},
    "request log off": {"log_requests": "false"},
    "fusion off": {"fusion": "none"},
    "breakers off": {"breaker__enabled": "false"},
    "all off": {
        "metrics": "false",
        "log_requests": "false",
        "fusion": "none",
        "breaker__enabled": "false",
    },
    # `{out}`: the run's output folder.
    "feedback on": {
        "feedback__store": "sqlite:///{out}/feedback.db",
        "feedback__salt": "benchmark-salt",
    },
}


@dataclass
class FeaturesPlan:
    """What to measure."""

    levels: list[int] = field(default_factory=lambda: [1, 64])
    duration_s: float = 5.0
    warmup_s: float = 1.0
    repeats: int = 3
    delay_ms: float = 20.0
    workers: int | None = None
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))


def run_features(plan: FeaturesPlan, out: Path, advance: Callable[[str], None]) -> dict[str, Any]:
    """Run every variant `plan.repeats` times in rotation; return medians per variant and level."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with mocks(list(DEFAULT_NAMES), logs / "mocks.log", "--delay-ms", str(plan.delay_ms)) as fleet:
        recommenders = [{"name": n, "url": fleet.url(n)} for n in DEFAULT_NAMES]
        for repeat in range(plan.repeats):
            for variant in plan.variants:
                command = list(GATEWAY_COMMAND)
                if plan.workers is not None:
                    command += ["--workers", str(plan.workers)]
                settings = {k: v.format(out=out.resolve()) for k, v in VARIANTS[variant].items()}
                env = gateway_env(recommenders, **settings)
                log = logs / f"gateway-{variant.replace(' ', '-')}.log"
                with serve_gunicorn(command, log, env) as (url, process):
                    workers = booted_workers(process.pid, plan.workers)
                    watched = {"gateway": workers, "mocks": [fleet.pid]}
                    for level in plan.levels:
                        advance(f"{variant}, concurrency {level}, round {repeat + 1}")
                        run = measure_level("gateway", url, level, plan, watched)
                        samples.setdefault((variant, level), []).append(run)
    rows = [median_row(variant, level, runs) for (variant, level), runs in samples.items()]
    return {
        "plan": plan.__dict__,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
        "costs": costs(rows),
        "paired": paired_costs(samples),
    }


def paired_costs(samples: dict[tuple[str, int], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each feature's cost round by round: its run against "all on"'s of the same round.

    The variants of a round run one after the other, so pairing by round takes out the
    machine's slow drifts between rounds, which medians over rounds keep; the mean over the
    rounds comes with its 95% interval, so a cost the noise could make is seen as such.
    """
    found = []
    for (variant, level), runs in sorted(samples.items(), key=lambda item: item[0][1]):
        bases = samples.get(("all on", level))
        if bases is None or variant == "all on" or len(runs) != len(bases) or len(runs) < 2:
            continue
        on = variant.endswith(" on")
        given_up, added = [], []
        for run, base in zip(runs, bases, strict=True):
            costlier, cheaper = (run, base) if on else (base, run)
            if cheaper["throughput_rps"]:
                given_up.append(1 - costlier["throughput_rps"] / cheaper["throughput_rps"])
            added.append(
                costlier["cpu_ms_per_request"]["gateway"] - cheaper["cpu_ms_per_request"]["gateway"]
            )
        given, given_ci = mean_ci(given_up)
        cpu, cpu_ci = mean_ci(added)
        found.append(
            {
                "feature": variant.removesuffix(" off").removesuffix(" on"),
                "concurrency": level,
                "rounds": len(runs),
                "throughput_given_up": round(given, 4),
                "throughput_given_up_ci95": round(given_ci, 4),
                "cpu_ms_per_request": round(cpu, 3),
                "cpu_ms_per_request_ci95": round(cpu_ci, 3),
            }
        )
    return found


def median_row(variant: str, level: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's medians at one level, over its repeats."""
    return {
        "variant": variant,
        "concurrency": level,
        "runs": len(runs),
        "throughput_rps": round(statistics.median(r["throughput_rps"] for r in runs), 1),
        "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
        "gateway_cpu_ms": round(
            statistics.median(r["cpu_ms_per_request"]["gateway"] for r in runs), 3
        ),
        "mocks_cpu_ms": round(statistics.median(r["cpu_ms_per_request"]["mocks"] for r in runs), 3),
        "errors": sum(r["errors"] for r in runs),
    }


def cost(
    costlier: dict[str, Any], cheaper: dict[str, Any], share_of: dict[str, Any]
) -> dict[str, float | None]:
    """What `costlier` costs over `cheaper` (two median rows at one level): the gateway CPU
    per request it adds, that as a share of `share_of`'s, and the share of throughput it gives
    up."""
    added = costlier["gateway_cpu_ms"] - cheaper["gateway_cpu_ms"]
    return {
        "cpu_ms_per_request": round(added, 3),
        "share_of_cpu": round(added / share_of["gateway_cpu_ms"], 3)
        if share_of["gateway_cpu_ms"]
        else None,
        "throughput_given_up": round(1 - costlier["throughput_rps"] / cheaper["throughput_rps"], 3)
        if cheaper["throughput_rps"]
        else None,
    }


def costs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each feature's cost at each level: CPU per request and throughput, against "all on".

    A feature switched off ("... off") costs what "all on" takes over it; one switched on
    ("feedback on") what it takes over "all on".
    """
    found = []
    by_key = {(r["variant"], r["concurrency"]): r for r in rows}
    for (variant, level), row in sorted(by_key.items(), key=lambda item: item[0][1]):
        base = by_key.get(("all on", level))
        if base is None or variant == "all on":
            continue
        if variant.endswith(" on"):
            measured = cost(row, base, share_of=base)
        else:
            measured = cost(base, row, share_of=base)
        found.append(
            {
                "feature": variant.removesuffix(" off").removesuffix(" on"),
                "concurrency": level,
                **measured,
            }
        )
    return found


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown report."""
    plan = results["plan"]
    lines = [
        "# What each feature costs",
        "",
        f"Started {results['started']}; {plan['repeats']} rounds of every variant, "
        f"{plan['duration_s']:g} s each per level, medians.",
        "",
        "| variant | conc. | req/s | p50 ms | gateway CPU ms/req | mocks CPU ms/req | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sorted(results["rows"], key=lambda r: (r["concurrency"], _order(r["variant"]))):
        lines.append(
            f"| {row['variant']} | {row['concurrency']} | {row['throughput_rps']:.1f} | "
            f"{row['p50_ms']:.2f} | {row['gateway_cpu_ms']:.3f} | {row['mocks_cpu_ms']:.3f} | "
            f"{row['errors']} |"
        )
    lines += [
        "",
        "| feature | conc. | CPU ms per request | share of gateway CPU | throughput given up |",
        "|---|---|---|---|---|",
    ]
    for cost in results["costs"]:
        share = cost["share_of_cpu"]
        given = cost["throughput_given_up"]
        lines.append(
            f"| {cost['feature']} | {cost['concurrency']} | {cost['cpu_ms_per_request']:.3f} | "
            f"{'-' if share is None else f'{share:.1%}'} | "
            f"{'-' if given is None else f'{given:.1%}'} |"
        )
    if results.get("paired"):
        lines += [
            "",
            "Paired by round (each round's variant against that round's \"all on\"; mean and "
            "95% interval over the rounds):",
            "",
            "| feature | conc. | rounds | CPU ms per request | throughput given up |",
            "|---|---|---|---|---|",
        ]
        for pair in results["paired"]:
            lines.append(
                f"| {pair['feature']} | {pair['concurrency']} | {pair['rounds']} | "
                f"{pair['cpu_ms_per_request']:.3f} ± {pair['cpu_ms_per_request_ci95']:.3f} | "
                f"{pair['throughput_given_up']:.1%} ± {pair['throughput_given_up_ci95']:.1%} |"
            )
    return "\n".join(lines) + "\n"


def _order(variant: str) -> int:
    return list(VARIANTS).index(variant)


def parse_plan(argv: list[str] | None = None) -> tuple[FeaturesPlan, Path]:
    """The plan and output folder the command line asks for."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks features",
        description="What each feature of the gateway costs, one switched off at a time.",
    )
    parser.add_argument("--levels", default="1,64", help="concurrency levels (1,64)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per level (5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up (1)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every variant (3)")
    parser.add_argument("--workers", type=int, help="gunicorn workers (default: its config)")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated variants to run (default all: {', '.join(VARIANTS)})",
    )
    parser.add_argument(
        "--out", type=Path, help="output folder (default benchmarks/results/features-<timestamp>)"
    )
    args = parser.parse_args(argv)
    try:
        levels = [int(level) for level in args.levels.split(",") if level.strip()]
    except ValueError:
        parser.error("--levels must be comma-separated integers")
    if not levels or min(levels) < 1 or args.repeats < 1 or args.duration <= 0:
        parser.error("--levels, --repeats and --duration must be positive")
    variants = [variant.strip() for variant in args.variants.split(",") if variant.strip()]
    unknown = [variant for variant in variants if variant not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    plan = FeaturesPlan(
        levels, args.duration, args.warmup, args.repeats, workers=args.workers, variants=variants
    )
    out = args.out or Path("benchmarks/results") / time.strftime("features-%Y%m%d-%H%M%S")
    return plan, out


def main(argv: list[str] | None = None) -> int:
    """Run the A/B with a progress line, then print and save the figures."""
    plan, out = parse_plan(argv)
    out.mkdir(parents=True, exist_ok=True)
    results, console = run_with_spinner(lambda advance: run_features(plan, out, advance))
    (out / "features.json").write_text(json.dumps(results, indent=2))
    report = markdown(results)
    (out / "features.md").write_text(report)
    console.print(report)
    console.print(f"written: {out / 'features.json'}, {out / 'features.md'}")
    return 0

"""Goodput under overload: ``python -m benchmarks overload``.

The gateway with its shipped config (adaptive admission on) under gunicorn, in front of four
mocks answering in 20 ms, one of which (`trd`) hangs on every call, as in issue 12:

1. a warm-up, in which `trd`'s breakers open (its calls time out: that one is its fault);
2. closed loops at `--baseline` connections (64) and at `--connections` (1,000), `--duration`
   seconds each: the 200s per second at 1,000 against those at 64 is the goodput ratio. The
   1,000 run twice: clients that wait the `Retry-After` a 503 asks for, and clients that
   retry at once (a retry storm: on a shared machine the load generator then spends a core
   of its own on bouncing requests);
3. an open-loop sweep (`--rates`, requests per second arriving whatever the answers, as users
   arrive): goodput and shed rate against offered load, plotted.

After each phase it reads the gateway's `/metrics`: the calls by outcome per recommender (a
healthy recommender must never be `circuit_open`), the breakers, the timeouts excused as the
gateway's own overload, and the loop lag. Writes `overload.json`, `overload.md` and
`overload.png` to `benchmarks/results/overload-<timestamp>/` (`--out`).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.harness import (
    GATEWAY_COMMAND,
    PYTHON,
    ROOT,
    booted_workers,
    cpu_seconds,
    gateway_env,
    mocks,
    run_with_spinner,
    serve_gunicorn,
)
from mock_recommenders import DEFAULT_NAMES

__all__ = ["OverloadPlan", "main", "run_overload"]

HANGING = "trd"
HEALTHY = tuple(name for name in DEFAULT_NAMES if name != HANGING)


@dataclass
class OverloadPlan:
    """What to measure."""

    baseline: int = 64
    connections: int = 1000
    duration_s: float = 20.0
    warmup_s: float = 5.0
    rates: list[int] = field(default_factory=lambda: [200, 400, 800, 1600, 3200])
    rate_duration_s: float = 10.0
    delay_ms: float = 20.0
    workers: int | None = None


def _load(
    url: str, mode: str, load: float, duration_s: float, warmup_s: float, honour: bool = False
) -> dict[str, Any]:
    command = [PYTHON, "-m", "benchmarks.loadgen", "--target", "gateway", "--url", url]
    command += ["--mode", mode, "--load", str(load), "--duration", str(duration_s)]
    command += ["--warmup", str(warmup_s)] + (["--honour-retry-after"] if honour else [])
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def read_metrics(url: str) -> dict[str, float]:
    """The gateway's metrics, merged over workers, as ``name{label=value,...}`` -> value."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            values[f"{s.name}{{{labels}}}"] = s.value
    return values


def _calls(metrics: dict[str, float], name: str, outcome: str) -> float:
    return metrics.get(
        f"gateway_recommender_calls_total{{outcome={outcome},recommender={name}}}", 0.0
    )


def _verdict(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the gateway reported about the recommenders between two readings of /metrics."""
    outcomes = ("ok", "timeout", "error", "circuit_open", "shed")
    calls = {
        name: {o: _calls(after, name, o) - _calls(before, name, o) for o in outcomes}
        for name in DEFAULT_NAMES
    }
    excused = {
        name: after.get(f"gateway_overload_timeouts_total{{recommender={name}}}", 0.0)
        - before.get(f"gateway_overload_timeouts_total{{recommender={name}}}", 0.0)
        for name in DEFAULT_NAMES
    }
    lag_count = after.get("gateway_event_loop_lag_seconds_count{}", 0.0) - before.get(
        "gateway_event_loop_lag_seconds_count{}", 0.0
    )
    lag_sum = after.get("gateway_event_loop_lag_seconds_sum{}", 0.0) - before.get(
        "gateway_event_loop_lag_seconds_sum{}", 0.0
    )
    return {
        "calls": calls,
        "excused_timeouts": excused,
        "breaker_open_now": {
            name: after.get(f"gateway_circuit_breaker_open{{recommender={name}}}", 0.0)
            for name in DEFAULT_NAMES
        },
        "mean_loop_lag_ms": round(lag_sum / lag_count * 1000, 2) if lag_count else math.nan,
        "concurrency_limit_now": after.get("gateway_concurrency_limit{}", math.nan),
    }


def run_overload(plan: OverloadPlan, out: Path, advance: Callable[[str], None]) -> dict[str, Any]:
    """Run every phase; return what each measured."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    phases: list[dict[str, Any]] = []
    with mocks(list(DEFAULT_NAMES), logs / "mocks.log", "--delay-ms", str(plan.delay_ms)) as fleet:
        fleet.set_behaviour(HANGING, hang=True)
        recommenders = [{"name": n, "url": fleet.url(n)} for n in DEFAULT_NAMES]
        command = list(GATEWAY_COMMAND)
        if plan.workers is not None:
            command += ["--workers", str(plan.workers)]
        env = gateway_env(recommenders)
        with serve_gunicorn(command, logs / "gateway.log", env) as (url, process):
            workers = booted_workers(process.pid, plan.workers)
            advance(f"warm-up, {plan.baseline} connections")
            _load(url, "closed", plan.baseline, plan.warmup_s, 0.0)
            runs = [("closed", float(plan.baseline), plan.duration_s, False)]
            runs.append(("closed", float(plan.connections), plan.duration_s, True))
            runs.append(("closed", float(plan.connections), plan.duration_s, False))
            runs += [("open", float(rate), plan.rate_duration_s, False) for rate in plan.rates]
            for mode, load, duration, honour in runs:
                unit = "connections" if mode == "closed" else "requests/s offered"
                advance(f"{mode} loop, {load:g} {unit}" + (", honouring Retry-After" * honour))
                before = read_metrics(url)
                cpu_before = cpu_seconds(workers)
                result = _load(url, mode, load, duration, 1.0, honour)
                result["honour_retry_after"] = honour
                result["gateway_cpu_s"] = round(cpu_seconds(workers) - cpu_before, 2)
                result["reported"] = _verdict(before, read_metrics(url))
                phases.append(result)
    return {
        "plan": plan.__dict__,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "phases": phases,
        "goals": goals(phases, plan),
    }


def goals(phases: list[dict[str, Any]], plan: OverloadPlan) -> list[dict[str, Any]]:
    """The figures of issue 12, measured, against their goals, for both kinds of client."""
    closed = [p for p in phases if p["mode"] == "closed"]
    base = next(p for p in closed if p["load"] == float(plan.baseline))
    rows: list[dict[str, Any]] = []
    for over in (p for p in closed if p["load"] == float(plan.connections)):
        who = "honouring Retry-After" if over["honour_retry_after"] else "retrying at once"
        at = f"{plan.connections} connections {who}"
        ratio = over["goodput_rps"] / base["goodput_rps"] if base["goodput_rps"] else math.nan
        non_ok = {k: v for k, v in over["statuses"].items() if k != "200"}
        rows += [
            {
                "figure": f"goodput at {at}, vs at {plan.baseline}",
                "measured": f"{ratio:.2f} ({over['goodput_rps']} vs {base['goodput_rps']} 200s/s)",
                "goal": ">= 0.8",
                "met": ratio >= 0.8,
            },
            {
                "figure": f"answers other than 200 at {at}",
                "measured": ", ".join(f"{v} x {k}" for k, v in non_ok.items()) or "none",
                "goal": "503 only",
                "met": set(non_ok) <= {"503"},
            },
            {
                "figure": f"503 latency at {at}, p99 / max",
                "measured": f"{over['shed_p99_ms']:.1f} / {over['shed_max_ms']:.1f} ms",
                "goal": "<= 50 ms",
                "met": not over["statuses"].get("503") or over["shed_max_ms"] <= 50,
            },
        ]
    healthy_open = sum(
        p["reported"]["calls"][name]["circuit_open"] for p in phases for name in HEALTHY
    )
    rows.append(
        {
            "figure": "calls refused by an open breaker of a healthy recommender, all phases",
            "measured": f"{healthy_open:g}",
            "goal": "0",
            "met": healthy_open == 0,
        }
    )
    return rows


def _fmt(value: Any) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else f"{value}"


def markdown(results: dict[str, Any]) -> str:
    """The report: each phase, what the gateway reported, and the goals."""
    lines = [
        "# Goodput under overload",
        "",
        f"Started {results['started']}; four mocks at {results['plan']['delay_ms']:g} ms, "
        f"`{HANGING}` hanging on every call; the gateway with its shipped config.",
        "",
        "| load | 200/s | 503/s | other | 200 p50 ms | 200 p99 ms | 503 p99 ms | 503 max ms "
        "| lag ms | limit | gateway CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["phases"]:
        load = (
            f"{p['load']:g} connections" if p["mode"] == "closed" else f"{p['load']:g} req/s open"
        )
        if p["honour_retry_after"]:
            load += ", honouring Retry-After"
        other = sum(v for k, v in p["statuses"].items() if k not in ("200", "503"))
        r = p["reported"]
        lines.append(
            f"| {load} | {p['goodput_rps']} | {p['shed_rps']} | {other} | {_fmt(p['ok_p50_ms'])} "
            f"| {_fmt(p['ok_p99_ms'])} | {_fmt(p['shed_p99_ms'])} | {_fmt(p['shed_max_ms'])} "
            f"| {_fmt(r['mean_loop_lag_ms'])} | {_fmt(r['concurrency_limit_now'])} "
            f"| {p['gateway_cpu_s']} |"
        )
    lines += ["", "Calls by outcome per recommender, as the gateway reported them:", ""]
    lines += [
        "| load | recommender | ok | timeout | excused | circuit_open |",
        "|---|---|---|---|---|---|",
    ]
    for p in results["phases"]:
        for name in DEFAULT_NAMES:
            c = p["reported"]["calls"][name]
            excused = p["reported"]["excused_timeouts"][name]
            phase = f"{p['mode']} {p['load']:g}" + " (Retry-After)" * p["honour_retry_after"]
            lines.append(
                f"| {phase} | {name} | {c['ok']:g} | {c['timeout']:g} "
                f"| {excused:g} | {c['circuit_open']:g} |"
            )
    lines += ["", "| figure | measured | goal | met |", "|---|---|---|---|"]
    for g in results["goals"]:
        lines.append(
            f"| {g['figure']} | {g['measured']} | {g['goal']} | {'yes' if g['met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Goodput and shed rate against offered load (the open-loop sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [p for p in results["phases"] if p["mode"] == "open"]
    offered = [p["load"] for p in sweep]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(offered, [p["goodput_rps"] for p in sweep], marker="o", label="200 (goodput)")
    axes.plot(offered, [p["shed_rps"] for p in sweep], marker="s", label="503 (shed)")
    others = [
        sum(v for k, v in p["statuses"].items() if k not in ("200", "503")) / p["duration_s"]
        for p in sweep
    ]
    axes.plot(offered, others, marker="x", label="anything else")
    axes.plot(offered, offered, linestyle=":", color="grey", label="offered")
    axes.set_xlabel("offered load (requests/s, open loop)")
    axes.set_ylabel("answers/s")
    axes.set_title(f"Goodput under overload ({HANGING} hanging)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_plan(argv: list[str] | None = None) -> tuple[OverloadPlan, Path]:
    """The plan and output folder from the command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks overload", description=__doc__)
    parser.add_argument("--baseline", type=int, default=64, help="connections of the baseline")
    parser.add_argument("--connections", type=int, default=1000, help="connections of overload")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per closed phase")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--rates", type=_ints, default=None, help="open-loop requests/s")
    parser.add_argument("--rate-duration", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="short phases, for a smoke run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    plan = OverloadPlan(
        baseline=args.baseline,
        connections=args.connections,
        duration_s=args.duration,
        warmup_s=args.warmup,
        rate_duration_s=args.rate_duration,
        workers=args.workers,
    )
    if args.rates:
        plan.rates = args.rates
    if args.quick:
        plan.duration_s, plan.warmup_s, plan.rate_duration_s = 3.0, 2.0, 2.0
        plan.connections, plan.rates = min(plan.connections, 300), [200, 800]
    out = args.out or ROOT / "benchmarks" / "results" / time.strftime("overload-%Y%m%d-%H%M%S")
    return plan, out


def main(argv: list[str] | None = None) -> int:
    """Run the overload benchmark, print its report and write it."""
    plan, out = parse_plan(argv)
    out.mkdir(parents=True, exist_ok=True)
    results, console = run_with_spinner(lambda advance: run_overload(plan, out, advance))
    (out / "overload.json").write_text(json.dumps(results, indent=2))
    report = markdown(results)
    (out / "overload.md").write_text(report)
    plot(results, out / "overload.png")
    console.print(report)
    console.print(f"written to {out}")
    return 0 if all(g["met"] for g in results["goals"]) else 1

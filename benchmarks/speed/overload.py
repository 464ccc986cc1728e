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
gateway's own overload, and the loop lag.

Then bursts (`--bursts`, 150 and 500 requests, at each of `--burst-delays`, 5 and 20 ms, all
four mocks healthy): for each, a fresh gateway of 2 workers with `deadline_ms` 900, warmed up
until both workers have served a request, left idle for a second, then the burst: every
connection opened first, then one request on each, all sent together. Each request's status
and latency; the 503s by reason (the `/metrics` delta of `gateway_shed_requests_total`, and
each body's message); the admission queue's wait, when the gateway reports it.
`--only bursts` runs only those, `--only sustained` only the phases above.

Writes `overload.json`, `overload.md`, `overload.png` (the sweep) and `overload-bursts.png`
(each burst's latencies) to `benchmarks/results/overload-<timestamp>/` (`--out`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.harness.loadgen import percentile
from benchmarks.harness.servers import (
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

__all__ = ["OverloadPlan", "burst_summary", "main", "run_burst", "run_overload"]

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
    sustained: bool = True  # the closed loops and the open sweep
    bursts: list[int] = field(default_factory=lambda: [150, 500])
    burst_delays_ms: list[float] = field(default_factory=lambda: [5.0, 20.0])
    burst_deadline_ms: float = 900.0
    burst_workers: int = 2
    burst_idle_s: float = 1.0


def _load(
    url: str, mode: str, load: float, duration_s: float, warmup_s: float, honour: bool = False
) -> dict[str, Any]:
    command = [PYTHON, "-m", "benchmarks.harness.loadgen", "--target", "gateway", "--url", url]
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
    """Run every phase, then every burst; return what each measured."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    phases: list[dict[str, Any]] = []
    if plan.sustained:
        phases = _sustained(plan, logs, advance)
    bursts: list[dict[str, Any]] = []
    if plan.bursts and plan.burst_delays_ms:
        with mocks(list(DEFAULT_NAMES), logs / "mocks-bursts.log") as fleet:
            recommenders = [{"name": n, "url": fleet.url(n)} for n in DEFAULT_NAMES]
            for delay_ms in plan.burst_delays_ms:
                fleet.set_behaviour(delay_ms=delay_ms)  # all four healthy, none hanging
                for size in plan.bursts:
                    advance(f"burst of {size} at once, mocks at {delay_ms:g} ms")
                    bursts.append(run_burst(recommenders, size, delay_ms, plan, logs))
    return {
        "plan": plan.__dict__,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "phases": phases,
        "bursts": bursts,
        "goals": goals(phases, plan, bursts),
    }


def _sustained(
    plan: OverloadPlan, logs: Path, advance: Callable[[str], None]
) -> list[dict[str, Any]]:
    """The closed loops and the open sweep, `trd` hanging."""
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
    return phases


# --- Bursts ----------------------------------------------------------------------------------

SHED_COUNTER = "gateway_shed_requests_total"
QUEUE_WAIT = "gateway_admission_queue_wait_seconds"


def _split(key: str) -> tuple[str, dict[str, str]]:
    """``name{a=1,b=2}`` (a key of `read_metrics`) -> the name and its labels."""
    name, _, rest = key.partition("{")
    labels = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part)
    return name, labels


def shed_by_reason(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The requests admission shed between two readings of /metrics, by their `reason` label
    (``unlabelled``: the counter as it was before it had one), summed over any other label."""
    reasons: dict[str, float] = {}
    for key, value in after.items():
        name, labels = _split(key)
        if name == SHED_COUNTER:
            reason = labels.get("reason", "unlabelled")
            reasons[reason] = reasons.get(reason, 0.0) + value - before.get(key, 0.0)
    return dict(sorted(reasons.items()))


def queue_wait(
    before: dict[str, float], after: dict[str, float]
) -> dict[str, dict[str, float]] | None:
    """How long requests waited in the admission queue between two readings, by `outcome` and
    over all: the count and the p99 in ms (the upper bound of the bucket that holds it;
    infinite past the last). None: the gateway has no such histogram."""
    buckets: dict[str, dict[float, float]] = {}
    for key, value in after.items():
        name, labels = _split(key)
        if name == f"{QUEUE_WAIT}_bucket" and "le" in labels:
            bound = float(labels["le"])
            outcome = labels.get("outcome")
            for each in ("all",) if outcome is None else (outcome, "all"):
                counts = buckets.setdefault(each, {})
                counts[bound] = counts.get(bound, 0.0) + value - before.get(key, 0.0)
    if not buckets:
        return None
    waits: dict[str, dict[str, float]] = {}
    for outcome, counts in sorted(buckets.items()):
        bounds = sorted(counts)
        total = counts[bounds[-1]]  # cumulative: the last bucket (+Inf) holds every one
        p99 = next((b for b in bounds if total and counts[b] >= 0.99 * total), math.nan)
        waits[outcome] = {"count": total, "p99_ms": round(p99 * 1000, 3)}
    return waits


def shed_reason(message: str) -> str:
    """The reason a 503's message gives: ``queue_full``, ``deadline``, ``limit`` or ``other``."""
    text = message.lower()
    if "full" in text:
        return "queue_full"
    if "deadline" in text:
        return "deadline"
    if "limit" in text:
        return "limit"
    return "other"


def _figures(values: Iterable[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(percentile(ordered, 0.50), 1),
        "p90": round(percentile(ordered, 0.90), 1),
        "p99": round(percentile(ordered, 0.99), 1),
        "max": round(ordered[-1], 1) if ordered else math.nan,
    }


def burst_summary(load: dict[str, Any], deadline_ms: float) -> dict[str, Any]:
    """One burst's answers (a `BurstResult` as JSON): statuses, latencies, what the 503s said."""
    statuses: list[str] = load["statuses"]
    latencies: list[float] = load["latencies_ms"]
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    ok = [ms for status, ms in zip(statuses, latencies, strict=True) if status == "200"]
    said = zip(statuses, load["messages"], strict=True)
    shed = [message or "" for status, message in said if status == "503"]
    reasons: dict[str, int] = {}
    messages: dict[str, int] = {}
    for message in shed:
        reasons[shed_reason(message)] = reasons.get(shed_reason(message), 0) + 1
        worded = re.sub(r"\d+(\.\d+)?", "N", message)  # one line per wording, not per number
        messages[worded] = messages.get(worded, 0) + 1
    return {
        "statuses": dict(sorted(counts.items())),
        "ok_ms": _figures(ok),
        "all_ms": _figures(latencies),
        "ok_within_deadline": sum(1 for ms in ok if ms <= deadline_ms),
        "shed_from_body": dict(sorted(reasons.items())),
        "shed_messages": messages,
        "send_spread_ms": load["send_spread_ms"],
        "connect_ms": load["connect_ms"],
        "first_error": load.get("first_error"),
    }


def _served_by(log: Path, offset: int) -> dict[str, dict[str, int]]:
    """The /recommendation requests each worker (pid) logged past `offset` of `log`, by status.

    A shed request has no line of its own: these are the requests admitted."""
    served: dict[str, dict[str, int]] = {}
    with log.open("rb") as lines:
        lines.seek(offset)
        text = lines.read().decode(errors="replace")
    for line in text.splitlines():
        if not line.startswith("{"):
            continue  # gunicorn's own lines
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("message") == "request" and record.get("path") == "/recommendation":
            by_status = served.setdefault(str(record.get("process")), {})
            status = str(record.get("status"))
            by_status[status] = by_status.get(status, 0) + 1
    return served


def _count(served: dict[str, dict[str, int]], status: str) -> int:
    return sum(by_status.get(status, 0) for by_status in served.values())


def _warm_up(url: str, log: Path, offset: int, workers: int, rounds: int = 20) -> int:
    """Requests, `2 * workers` at once, each on a connection of its own, until every worker has
    served one (which worker accepts a connection is the kernel's choice); how many were sent."""
    body = json.dumps({"user_id": "warm-up", "resultSize": 10}).encode()
    headers = {"Content-Type": "application/json"}

    def post(_: int) -> None:
        request = urllib.request.Request(f"{url}/recommendation", body, headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
        except urllib.error.HTTPError:
            pass  # answered: that is all a warm-up needs

    sent = 0
    with concurrent.futures.ThreadPoolExecutor(2 * workers) as pool:
        for _ in range(rounds):
            list(pool.map(post, range(2 * workers)))
            sent += 2 * workers
            time.sleep(0.1)  # a worker writes its log lines every 20 ms
            if len(_served_by(log, offset)) >= workers:
                break
    return sent


def _burst_load(url: str, size: int) -> dict[str, Any]:
    command = [PYTHON, "-m", "benchmarks.harness.loadgen", "--target", "gateway", "--url", url]
    command += ["--mode", "burst", "--load", str(size), "--timeout-s", "30"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def run_burst(
    recommenders: list[dict[str, str]],
    size: int,
    delay_ms: float,
    plan: OverloadPlan,
    logs: Path,
) -> dict[str, Any]:
    """One burst of `size` requests at once on a fresh, idle gateway of `plan.burst_workers`."""
    command = [*GATEWAY_COMMAND, "--workers", str(plan.burst_workers)]
    env = gateway_env(recommenders, deadline_ms=plan.burst_deadline_ms)
    log = logs / f"gateway-burst-{delay_ms:g}ms-{size}.log"
    offset = log.stat().st_size if log.exists() else 0
    with serve_gunicorn(command, log, env) as (url, process):
        workers = booted_workers(process.pid, plan.burst_workers)
        warm_up = _warm_up(url, log, offset, plan.burst_workers)
        warmed = len(_served_by(log, offset))
        time.sleep(plan.burst_idle_s)  # idle: nothing in flight, the loops' lag at rest
        before = read_metrics(url)
        cpu_before = cpu_seconds(workers)
        served_from = log.stat().st_size
        load = _burst_load(url, size)
        cpu_s = cpu_seconds(workers) - cpu_before
        after = read_metrics(url)
        served = _served_by(log, served_from)
        answered, give_up = load["statuses"].count("200"), time.monotonic() + 2.0
        while _count(served, "200") < answered and time.monotonic() < give_up:
            time.sleep(0.05)  # the workers write their last lines every 20 ms
            served = _served_by(log, served_from)
    return {
        "size": size,
        "delay_ms": delay_ms,
        "deadline_ms": plan.burst_deadline_ms,
        "workers": plan.burst_workers,
        "warm_up_requests": warm_up,
        "workers_warmed": warmed,
        "limit_before": before.get("gateway_concurrency_limit{}", math.nan),
        **burst_summary(load, plan.burst_deadline_ms),
        "shed_reported": shed_by_reason(before, after),
        "queue_wait": queue_wait(before, after),
        "served_by_worker": served,
        "gateway_cpu_s": round(cpu_s, 2),
        "reported": _verdict(before, after),
        "requests": {k: load[k] for k in ("statuses", "latencies_ms", "sent_ms")},
    }


def goals(
    phases: list[dict[str, Any]], plan: OverloadPlan, bursts: Iterable[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """The figures of issue 12, measured, against their goals, for both kinds of client; and
    the bursts' (every request 200 within the deadline)."""
    closed = [p for p in phases if p["mode"] == "closed"]
    base = next((p for p in closed if p["load"] == float(plan.baseline)), None)
    overs = [p for p in closed if p["load"] == float(plan.connections)] if base else []
    rows: list[dict[str, Any]] = []
    for over in overs:
        assert base is not None
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
    if phases:
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
    return rows + [_burst_goal(burst) for burst in bursts]


def _burst_goal(burst: dict[str, Any]) -> dict[str, Any]:
    size, deadline = burst["size"], burst["deadline_ms"]
    measured = f"{burst['ok_within_deadline']}/{size} 200 within {deadline:g} ms"
    others = {k: v for k, v in burst["statuses"].items() if k != "200"}
    if others:
        measured += "; " + ", ".join(f"{v} x {k}" for k, v in others.items())
    shed = {k: v for k, v in burst["shed_reported"].items() if v}
    if shed:
        measured += " (shed: " + ", ".join(f"{k} {v:g}" for k, v in shed.items()) + ")"
    at = f"burst {size} at {burst['delay_ms']:g} ms"
    return {
        "figure": f"{at}: every request 200 within the deadline",
        "measured": measured,
        "goal": f"all {size} 200, all within {deadline:g} ms",
        "met": burst["ok_within_deadline"] == size,
    }


def _fmt(value: Any) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else f"{value}"


def markdown(results: dict[str, Any]) -> str:
    """The report: each phase, what the gateway reported, and the goals."""
    lines = ["# Goodput under overload", "", f"Started {results['started']}."]
    if results["phases"]:
        lines += _sustained_markdown(results)
    if results.get("bursts"):
        lines += _bursts_markdown(results)
    lines += ["", "| figure | measured | goal | met |", "|---|---|---|---|"]
    for g in results["goals"]:
        lines.append(
            f"| {g['figure']} | {g['measured']} | {g['goal']} | {'yes' if g['met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def _sustained_markdown(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Four mocks at {results['plan']['delay_ms']:g} ms, "
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
    return lines


def _spread(figures: dict[str, float]) -> str:
    return " / ".join(_fmt(figures[k]) for k in ("p50", "p90", "p99", "max"))


def _bursts_markdown(results: dict[str, Any]) -> list[str]:
    plan = results["plan"]
    lines = [
        "",
        f"Bursts: a fresh gateway of {plan['burst_workers']} workers, `deadline_ms` "
        f"{plan['burst_deadline_ms']:g}, the four mocks healthy; warmed up until every worker "
        f"served a request, idle {plan['burst_idle_s']:g} s, then every connection opened and "
        "one request sent on each, all together. Latencies in ms, from the request written to "
        "its whole answer read; shed by reason as `/metrics` counted them (`unlabelled`: a "
        "counter without the label), and as the 503s' messages say; the admission queue's "
        "wait p99 by outcome, a bucket's upper bound (none in /metrics: no such histogram, or "
        "no request waited).",
        "",
        "| burst | 200 | 503 | other | 200 within deadline | 200 p50 / p90 / p99 / max "
        "| all p50 / p90 / p99 / max | shed (/metrics) | shed (messages) | queue wait p99 ms "
        "| 200s per worker | send spread ms | gateway CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in results["bursts"]:
        other = sum(v for k, v in b["statuses"].items() if k not in ("200", "503"))
        shed = ", ".join(f"{k} {v:g}" for k, v in b["shed_reported"].items() if v) or "0"
        said = ", ".join(f"{k} {v}" for k, v in b["shed_from_body"].items()) or "0"
        waits = b["queue_wait"]
        wait = (
            ", ".join(f"{k} {_fmt(w['p99_ms'])}" for k, w in waits.items() if k != "all")
            if waits
            else "none in /metrics"
        )
        per_worker = " / ".join(str(w.get("200", 0)) for w in b["served_by_worker"].values())
        lines.append(
            f"| {b['size']} at {b['delay_ms']:g} ms | {b['statuses'].get('200', 0)} "
            f"| {b['statuses'].get('503', 0)} | {other} | {b['ok_within_deadline']} "
            f"| {_spread(b['ok_ms'])} | {_spread(b['all_ms'])} | {shed} | {said} | {wait or '-'} "
            f"| {per_worker or '-'} | {_fmt(b['send_spread_ms'])} | {b['gateway_cpu_s']} |"
        )
    worded = {m: 0 for b in results["bursts"] for m in b["shed_messages"]}
    if worded:
        lines += ["", "What the 503s said (numbers as N):", ""]
        lines += [f"- {message}" for message in worded]
    return lines


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


def plot_bursts(results: dict[str, Any], path: Path) -> None:
    """Each burst's latencies, every request, as the share answered by each time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for b in results["bursts"]:
        requests = b["requests"]
        ms = sorted(requests["latencies_ms"])
        share = [(i + 1) / len(ms) for i in range(len(ms))]
        ok = requests["statuses"].count("200")
        label = f"{b['size']} at {b['delay_ms']:g} ms ({ok} x 200)"
        axes.step(ms, share, where="post", label=label)
    deadline = results["plan"]["burst_deadline_ms"]
    axes.axvline(deadline, linestyle=":", color="grey", label=f"deadline ({deadline:g} ms)")
    axes.set_xlabel("latency, ms (every answer: 200 or not)")
    axes.set_ylabel("share of the burst answered")
    axes.set_title("Bursts on an idle gateway")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


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
    parser.add_argument(
        "--bursts", type=_ints, default=None, help="requests per burst, at once (default 150,500)"
    )
    parser.add_argument(
        "--burst-delays",
        type=_floats,
        default=None,
        help="the mocks' delay in ms for the bursts, each burst at each (default 5,20)",
    )
    parser.add_argument(
        "--only",
        choices=["sustained", "bursts"],
        default=None,
        help="sustained: only the closed loops and the open sweep; bursts: only the bursts",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short phases and one burst of 50, for a smoke run"
    )
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
        plan.bursts, plan.burst_delays_ms = [50], [5.0]
    if args.bursts:
        plan.bursts = args.bursts
    if args.burst_delays:
        plan.burst_delays_ms = args.burst_delays
    if args.only == "bursts":
        plan.sustained = False
    elif args.only == "sustained":
        plan.bursts = []
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
    if any(p["mode"] == "open" for p in results["phases"]):
        plot(results, out / "overload.png")
    if results["bursts"]:
        plot_bursts(results, out / "overload-bursts.png")
    console.print(report)
    console.print(f"written to {out}")
    return 0 if all(g["met"] for g in results["goals"]) else 1

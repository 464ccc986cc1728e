"""What tracing costs: ``python -m benchmarks tracing``, an A/B of the gateway with tracing.

Variants, each under gunicorn in front of the same mocks, in rotation (`--repeats`), medians:

- ``tracing off``: the shipped config;
- ``tracing 100%``: every request traced (9 spans with four recommenders), exported over
  OTLP/HTTP in the SDK's batches to a receiver this benchmark runs (`benchmarks.harness.otlpsink`,
  which decodes and counts them: the receiver's CPU is not the gateway's);
- ``tracing 1%``: a 1% ratio sampler: the other 99% make non-recording spans and send an
  unsampled traceparent;
- ``before tracing`` (with ``--baseline DIR``): the gateway's code from DIR, a checkout made
  before tracing existed (``git archive main | tar -x -C DIR``), so that "off" can be told
  from "not there".

A variant's cost is its gateway CPU per request minus that of ``tracing off``, and the
throughput it gives up. On a shared machine that difference is noisy; ``--spans`` measures the
tracing calls of one request on their own instead (`span_costs`: the spans a request with four
recommenders makes, through the real batch processor, its exporter discarding them).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness.otlpsink import OtlpSink
from benchmarks.harness.servers import (
    GATEWAY_COMMAND,
    GUNICORN,
    booted_workers,
    gateway_env,
    measure_level,
    mocks,
    run_with_spinner,
    serve_gunicorn,
)
from benchmarks.speed.features import cost, median_row
from gateway.core.request_id import REQUEST_ID_HEADER
from mock_recommenders import DEFAULT_NAMES

__all__ = ["TracingPlan", "main", "run_tracing"]

BASE = "tracing off"


@dataclass
class TracingPlan:
    """What to measure."""

    levels: list[int] = field(default_factory=lambda: [64])
    duration_s: float = 10.0
    warmup_s: float = 1.0
    repeats: int = 3
    delay_ms: float = 20.0
    workers: int | None = None
    baseline: Path | None = None
    spans_only: bool = False


def _variants(plan: TracingPlan, sink_url: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each variant's gunicorn command and settings."""
    command = list(GATEWAY_COMMAND)
    if plan.workers is not None:
        command += ["--workers", str(plan.workers)]
    # Admission fixed at max_in_flight: on a shared machine the adaptive limit follows the
    # loop's lag, and shed requests (cheap 503s) would skew one variant's CPU per request.
    fixed = {"admission__adaptive": "false"}
    on = fixed | {"tracing__enabled": "true", "tracing__endpoint": sink_url}
    variants = {
        BASE: (command, fixed),
        "tracing 100%": (command, on),
        "tracing 1%": (command, on | {"tracing__sample_ratio": "0.01"}),
    }
    if plan.baseline is not None:
        base = str(plan.baseline.resolve())
        before = [GUNICORN, "-c", f"{base}/gunicorn.conf.py", "gateway.asgi:app"]
        before += ["--chdir", base, *command[4:]]
        variants["before tracing"] = (before, fixed | {"PYTHONPATH": base})
    return variants


def run_tracing(plan: TracingPlan, out: Path, advance: Callable[[str], None]) -> dict[str, Any]:
    """Run every variant `plan.repeats` times in rotation; return medians and costs."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    spans: dict[str, int] = {}
    with (
        OtlpSink(keep=False) as sink,
        mocks(list(DEFAULT_NAMES), logs / "mocks.log", "--delay-ms", str(plan.delay_ms)) as fleet,
    ):
        recommenders = [{"name": n, "url": fleet.url(n)} for n in DEFAULT_NAMES]
        for repeat in range(plan.repeats):
            for variant, (command, settings) in _variants(plan, sink.url).items():
                extra = {k: v for k, v in settings.items() if k == "PYTHONPATH"}
                env = gateway_env(
                    recommenders, **{k: v for k, v in settings.items() if k not in extra}
                )
                env.update(extra)
                log = logs / f"gateway-{variant.replace(' ', '-').replace('%', '')}.log"
                before = sink.spans
                with serve_gunicorn(command, log, env) as (url, process):
                    workers = booted_workers(process.pid, plan.workers)
                    watched = {"gateway": workers, "mocks": [fleet.pid]}
                    for level in plan.levels:
                        advance(f"{variant}, concurrency {level}, round {repeat + 1}")
                        run = measure_level("gateway", url, level, plan, watched)
                        samples.setdefault((variant, level), []).append(run)
                # Stopped: every span the workers made has been flushed to the sink.
                spans[variant] = spans.get(variant, 0) + sink.spans - before
    rows = [median_row(variant, level, runs) for (variant, level), runs in samples.items()]
    for row in rows:
        row["throughput_spread"] = _spread(samples[(row["variant"], row["concurrency"])])
    return {
        "plan": {**plan.__dict__, "baseline": str(plan.baseline) if plan.baseline else None},
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
        "spans_received": spans,
        "costs": costs(rows),
    }


def _spread(runs: list[dict[str, Any]]) -> float:
    """The run-to-run noise of throughput: (max - min) / median of the repeats."""
    values = [r["throughput_rps"] for r in runs]
    median = statistics.median(values)
    return round((max(values) - min(values)) / median, 3) if median else 0.0


def costs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each variant against ``tracing off``: CPU per request added, throughput given up."""
    by_key = {(r["variant"], r["concurrency"]): r for r in rows}
    found = []
    for (variant, level), row in sorted(by_key.items(), key=lambda item: item[0][1]):
        base = by_key.get((BASE, level))
        if base is None or variant == BASE:
            continue
        found.append({"variant": variant, "concurrency": level, **cost(row, base, share_of=base)})
    return found


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown report."""
    plan = results["plan"]
    lines = [
        "# What tracing costs",
        "",
        f"Started {results['started']}; {plan['repeats']} rounds of every variant, "
        f"{plan['duration_s']:g} s each per level, medians; mocks answer after "
        f"{plan['delay_ms']:g} ms.",
        "",
        "| variant | conc. | req/s | req/s spread | p50 ms | gateway CPU ms/req "
        "| mocks CPU ms/req | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(results["rows"], key=lambda r: (r["concurrency"], r["variant"])):
        lines.append(
            f"| {row['variant']} | {row['concurrency']} | {row['throughput_rps']:.1f} | "
            f"{row['throughput_spread']:.1%} | {row['p50_ms']:.2f} | "
            f"{row['gateway_cpu_ms']:.3f} | {row['mocks_cpu_ms']:.3f} | {row['errors']} |"
        )
    lines += [
        "",
        f"| against {BASE} | conc. | CPU ms per request | share of gateway CPU | "
        "throughput given up |",
        "|---|---|---|---|---|",
    ]
    for found in results["costs"]:
        share, given = found["share_of_cpu"], found["throughput_given_up"]
        lines.append(
            f"| {found['variant']} | {found['concurrency']} | {found['cpu_ms_per_request']:+.3f} | "
            f"{'-' if share is None else f'{share:+.1%}'} | "
            f"{'-' if given is None else f'{given:+.1%}'} |"
        )
    received = ", ".join(f"{v}: {n}" for v, n in results["spans_received"].items())
    lines += ["", f"Spans received by the OTLP sink, all rounds: {received}."]
    return "\n".join(lines) + "\n"


def spans_markdown(found: dict[str, float]) -> str:
    """`span_costs` as a markdown table."""
    lines = [
        "Tracing calls of one request on their own (9 spans with four recommenders, batch "
        "processor, export discarded; best of 7 rounds of 2,000):",
        "",
        "| tracing | µs per request |",
        "|---|---|",
    ]
    lines += [f"| {label} | {micros:.1f} |" for label, micros in found.items()]
    return "\n".join(lines) + "\n"


def span_costs(rounds: int = 7, number: int = 2000) -> dict[str, float]:
    """Microseconds of tracing per request (best of `rounds`): off, on at 100% and at 1%."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from gateway.config.settings import TracingSettings
    from gateway.observability.otel import OtelTracing
    from gateway.observability.tracing import NO_TRACING, Tracing

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    def request(tracing: Tracing) -> None:
        # What routes.py and fanout.py do for one request that every recommender answers.
        with tracing.request({}, "r") as span:
            for name in DEFAULT_NAMES:
                with tracing.call(name) as call:
                    with tracing.attempt(name, "http://127.0.0.1:5001/test", 0, False) as one:
                        one.headers({REQUEST_ID_HEADER: "r"})
                        one.answered(200)
                    call.finished("ok", 1, None)
            span.answered(200, True, 1.0, "rrf")

    found = {}
    variants: dict[str, Tracing] = {"off": NO_TRACING}
    for label, ratio in (("100%", 1.0), ("1%", 0.01)):
        # The batch processor, as served; only the export itself is left out.
        settings = TracingSettings(enabled=True, sample_ratio=ratio)
        variants[label] = OtelTracing(settings, BatchSpanProcessor(Discard()))
    for label, tracing in variants.items():
        timer = timeit.Timer(functools.partial(request, tracing))
        best = min(timer.repeat(repeat=rounds, number=number))
        found[label] = round(best / number * 1e6, 1)
        tracing.shutdown()
    return found


def parse_plan(argv: list[str] | None = None) -> tuple[TracingPlan, Path]:
    """The plan and output folder the command line asks for."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks tracing",
        description="What tracing costs the gateway: off, on at 100% and at 1%.",
    )
    parser.add_argument("--levels", default="64", help="concurrency levels (64)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level (10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up (1)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every variant (3)")
    parser.add_argument("--workers", type=int, help="gunicorn workers (default: its config)")
    parser.add_argument(
        "--baseline", type=Path, help="a checkout without tracing, run as 'before tracing'"
    )
    parser.add_argument(
        "--spans", action="store_true", help="only the tracing calls' own cost (a few seconds)"
    )
    parser.add_argument(
        "--out", type=Path, help="output folder (default benchmarks/results/tracing-<timestamp>)"
    )
    args = parser.parse_args(argv)
    try:
        levels = [int(level) for level in args.levels.split(",") if level.strip()]
    except ValueError:
        parser.error("--levels must be comma-separated integers")
    if not levels or min(levels) < 1 or args.repeats < 1 or args.duration <= 0:
        parser.error("--levels, --repeats and --duration must be positive")
    if args.baseline is not None and not (args.baseline / "gateway").is_dir():
        parser.error(f"--baseline {args.baseline} has no gateway/ package")
    plan = TracingPlan(levels, args.duration, args.warmup, args.repeats, workers=args.workers)
    plan.baseline = args.baseline
    plan.spans_only = args.spans
    out = args.out or Path("benchmarks/results") / time.strftime("tracing-%Y%m%d-%H%M%S")
    return plan, out


def main(argv: list[str] | None = None) -> int:
    """Run the A/B with a progress line, then print and save the figures."""
    plan, out = parse_plan(argv)
    out.mkdir(parents=True, exist_ok=True)
    spans = span_costs()
    if plan.spans_only:
        print(spans_markdown(spans))
        return 0
    results, console = run_with_spinner(lambda advance: run_tracing(plan, out, advance))
    results["span_costs_us"] = spans
    (out / "tracing.json").write_text(json.dumps(results, indent=2))
    report = markdown(results) + "\n" + spans_markdown(spans)
    (out / "tracing.md").write_text(report)
    console.print(report)
    console.print(f"written: {out / 'tracing.json'}, {out / 'tracing.md'}")
    return 0

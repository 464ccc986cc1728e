"""Turning a benchmark's results into figures: derived ratios, a table, markdown, PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.speed.run import TARGETS

__all__ = ["derive", "figures", "markdown", "plot", "table", "write_all"]

Row = dict[str, Any]

# The figures issues #3 and #11 ask of the async strategy, as (label, measured, goal, met).
Figure = tuple[str, str, str, bool | None]

# Speed-up of async over sequential at concurrency 1 that issue #3 asks for, by fan-out width.
SPEEDUP_GOALS = {4: 3.6, 16: 10.0}


# Targets renamed since: the name in older result files, and the name now.
_RENAMED_TARGETS = {"sync": "sequential"}


def _find(rows: list[Row], target: str, concurrency: int, width: int | None = None) -> Row | None:
    for row in rows:
        same_width = width is None or row["recommenders"] == width
        if row["target"] == target and row["concurrency"] == concurrency and same_width:
            return row
    return None


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else math.nan


def derive(results: dict[str, Any]) -> None:
    """Add to every row its speed-up over `sequential` and its ratios to the floor, in place.

    Results written before the rename name the `sequential` target `sync`: read as `sequential`.
    """
    for rows in (results["runs"], results["widths"]):
        for row in rows:
            row["target"] = _RENAMED_TARGETS.get(row["target"], row["target"])
        for row in rows:
            sequential = _find(rows, "sequential", row["concurrency"], row["recommenders"])
            floor = _find(rows, "floor", row["concurrency"], row["recommenders"])
            row["speedup_vs_sequential"] = (
                _ratio(row["throughput_rps"], sequential["throughput_rps"]) if sequential else None
            )
            row["throughput_vs_floor"] = (
                _ratio(row["throughput_rps"], floor["throughput_rps"]) if floor else None
            )
            row["p50_over_floor_ms"] = round(row["p50_ms"] - floor["p50_ms"], 3) if floor else None


def figures(results: dict[str, Any]) -> list[Figure]:
    """The async strategy's figures against the goals (issues #3, #11 and #25)."""
    runs, widths = results["runs"], results["widths"]
    found: list[Figure] = []
    width = results["plan"]["recommenders"]
    levels = results["plan"]["levels"]
    one = _find(runs, "async", 1)
    if one is not None and one["p50_over_floor_ms"] is not None:
        over = one["p50_over_floor_ms"]
        found.append(
            ("p50 over the floor at concurrency 1", f"{over:.2f} ms", "<= 1.0 ms", over <= 1.0)
        )
        reference = _find(runs, "per-call-session", 1)
        if reference is not None and reference["p50_over_floor_ms"]:
            share = _ratio(over, reference["p50_over_floor_ms"])
            found.append(
                (
                    "p50 over the floor at concurrency 1, as a share of per-call-session's",
                    f"{share:.2f}",
                    "<= 0.3",
                    share <= 0.3,
                )
            )
    if one is not None and one["speedup_vs_sequential"] is not None:
        speedup = one["speedup_vs_sequential"]
        goal = SPEEDUP_GOALS.get(width)
        found.append(
            (
                f"speed-up over sequential at concurrency 1, {width} recommenders",
                f"{speedup:.2f}x",
                f">= {goal}x" if goal else "-",
                speedup >= goal if goal else None,
            )
        )
    for row in sorted(widths, key=lambda r: r["recommenders"]):
        if row["target"] != "async" or row["speedup_vs_sequential"] is None:
            continue
        goal = SPEEDUP_GOALS.get(row["recommenders"])
        found.append(
            (
                f"speed-up over sequential at concurrency 1, {row['recommenders']} recommenders"
                " (sweep)",
                f"{row['speedup_vs_sequential']:.2f}x",
                f">= {goal}x" if goal else "-",
                row["speedup_vs_sequential"] >= goal if goal else None,
            )
        )
    top = max(levels)
    high = _find(runs, "async", top)
    if high is not None:
        if high["throughput_vs_floor"] is not None:
            ratio = high["throughput_vs_floor"]
            found.append(
                (
                    f"throughput vs the floor at concurrency {top}",
                    f"{ratio:.2f}",
                    ">= 0.75",
                    ratio >= 0.75,
                )
            )
        tutorial = _find(runs, "per-call-session", top)
        if tutorial is not None:
            ratio = _ratio(high["throughput_rps"], tutorial["throughput_rps"])
            found.append(
                (
                    f"throughput vs per-call-session at concurrency {top}",
                    f"{ratio:.2f}x",
                    ">= 6x",
                    ratio >= 6,
                )
            )
        gateway_cpu = high.get("cpu_ms_per_request", {}).get("gateway")
        if gateway_cpu is not None:
            found.append(
                (
                    f"gateway CPU per request at concurrency {top}",
                    f"{gateway_cpu:.2f} ms",
                    "<= 0.9 ms",
                    gateway_cpu <= 0.9,
                )
            )
        floor = _find(runs, "floor", top)
        if floor is not None and cpu_total(high) > 0:
            # With every core busy, throughput goes as 1 / (CPU per request, all processes).
            ceiling = cpu_total(floor) / cpu_total(high)
            label = f"CPU-bound ceiling of the floor ratio at concurrency {top}"
            found.append((label, f"{ceiling:.2f}", "-", None))
    errors = sum(row["errors"] for row in runs if row["target"] == "async")
    if any(row["target"] == "async" for row in runs):
        found.append(("errors at any level", str(errors), "0", errors == 0))
    memory = results["memory_mb"].get(f"async@{width}")
    if memory:
        found.append(
            (
                "resident memory per worker after the run",
                f"{max(memory):.1f} MB",
                "< 80 MB",
                max(memory) < 80,
            )
        )
    return found


def _cell(value: Any, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}{unit}"
    return f"{value}{unit}"


def cpu_total(row: Row) -> float:
    """CPU milliseconds that every process together spent per request."""
    return float(sum(row.get("cpu_ms_per_request", {}).values()))


COLUMNS = (
    ("target", "target", ""),
    ("concurrency", "conc.", ""),
    ("p50_ms", "p50 ms", ""),
    ("p95_ms", "p95 ms", ""),
    ("p99_ms", "p99 ms", ""),
    ("throughput_rps", "req/s", ""),
    ("errors", "errors", ""),
    ("speedup_vs_sequential", "vs sequential", "x"),
    ("throughput_vs_floor", "vs floor", ""),
    ("p50_over_floor_ms", "p50 - floor ms", ""),
)


def _rows_in_order(rows: list[Row]) -> list[Row]:
    order = {name: i for i, name in enumerate(TARGETS)}
    return sorted(
        rows, key=lambda r: (r["recommenders"], r["concurrency"], order.get(r["target"], 9))
    )


def table(results: dict[str, Any]) -> Any:
    """The results as a `rich` table for the terminal."""
    from rich.table import Table

    plan = results["plan"]
    view = Table(
        title=f"{plan['recommenders']} recommenders at {plan['delay_ms']:g} ms "
        f"(+{plan['jitter_ms']:g} ms jitter), {plan['duration_s']:g} s per level"
    )
    for _, heading, _ in COLUMNS:
        view.add_column(heading, justify="left" if heading == "target" else "right")
    for row in _rows_in_order(results["runs"]):
        view.add_row(*(_cell(row.get(key), unit) for key, _, unit in COLUMNS))
    return view


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown report."""
    plan, machine = results["plan"], results["machine"]
    lines = [
        "# Fan-out benchmark",
        "",
        f"{machine['cores']} cores, Python {machine['python']}, {machine['platform']}; "
        f"started {results['started']}, from commit {results.get('commit', '?')}.",
        f"{plan['recommenders']} mock recommenders answering in {plan['delay_ms']:g} ms "
        f"(+ up to {plan['jitter_ms']:g} ms jitter); closed-loop load, {plan['warmup_s']:g} s "
        f"warm-up and {plan['duration_s']:g} s measured per level.",
        "",
        "| " + " | ".join(heading for _, heading, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in _rows_in_order(results["runs"]):
        lines.append("| " + " | ".join(_cell(row.get(k), u) for k, _, u in COLUMNS) + " |")
    if results["widths"]:
        lines += [
            "",
            "## Fan-out width, concurrency 1",
            "",
            "| recommenders | floor p50 ms | sequential p50 ms | async p50 ms"
            " | async vs sequential |",
            "|---|---|---|---|---|",
        ]
        for width in sorted({r["recommenders"] for r in results["widths"]}):
            cells = [
                _find(results["widths"], t, 1, width) for t in ("floor", "sequential", "async")
            ]
            p50s = [_cell(c["p50_ms"]) if c else "-" for c in cells]
            speedup = _cell(cells[2].get("speedup_vs_sequential"), "x") if cells[2] else "-"
            lines.append(f"| {width} | " + " | ".join(p50s) + f" | {speedup} |")
    cpu_rows = [r for r in _rows_in_order(results["runs"]) if r.get("cpu_ms_per_request")]
    if cpu_rows:
        lines += [
            "",
            "## CPU per request (ms), by process group",
            "",
            "| target | conc. | gateway | mocks | load generator | total |",
            "|---|---|---|---|---|---|",
        ]
        for row in cpu_rows:
            cpu = row["cpu_ms_per_request"]
            cells = [cpu.get(group) for group in ("gateway", "mocks", "load generator")]
            lines.append(
                f"| {row['target']} | {row['concurrency']} | "
                + " | ".join(_cell(c) for c in cells)
                + f" | {_cell(cpu_total(row))} |"
            )
    if results["memory_mb"]:
        lines += ["", "## Resident memory per worker after the run (MB)", ""]
        lines += [f"- {target}: {sizes}" for target, sizes in results["memory_mb"].items()]
    found = figures(results)
    if found:
        lines += [
            "",
            "## The async strategy against the goals",
            "",
            "| figure | measured | goal | met |",
            "|---|---|---|---|",
        ]
        for label, measured, goal, met in found:
            verdict = "-" if met is None else ("yes" if met else "no")
            lines.append(f"| {label} | {measured} | {goal} | {verdict} |")
    lines += ["", "Plots: `latency.png`, `throughput.png`, `fanout.png`.", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """Latency and throughput against concurrency, and speed-up against fan-out width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    runs = results["runs"]
    targets = [t for t in TARGETS if any(r["target"] == t for r in runs)]
    styles = {
        "floor": ("black", "", "--"),
        "sequential": ("C3", "o", "-"),
        "threads": ("C1", "s", "-"),
        "async-gthread": ("C0", "v", "--"),
        "async": ("C2", "^", "-"),
        "per-call-session": ("C4", "d", "-"),
    }
    for metric, label, name, log in (
        ("p50_ms", "p50 latency (ms)", "latency.png", True),
        ("throughput_rps", "throughput (requests/s)", "throughput.png", False),
    ):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for target in targets:
            rows = sorted(
                (r for r in runs if r["target"] == target), key=lambda r: r["concurrency"]
            )
            color, marker, line = styles[target]
            levels = [r["concurrency"] for r in rows]
            axes.plot(
                levels, [r[metric] for r in rows], color=color, marker=marker, ls=line, label=target
            )
            if metric == "p50_ms":
                p99 = [r["p99_ms"] for r in rows]
                axes.plot(levels, p99, color=color, marker=marker, ls=":", alpha=0.5)
        axes.set_xscale("log", base=2)
        if log:
            axes.set_yscale("log")
        axes.set_xlabel("concurrency (closed-loop users)")
        axes.set_ylabel(label + (" (dotted: p99)" if metric == "p50_ms" else ""))
        axes.set_title(f"{label} vs concurrency, {results['plan']['recommenders']} recommenders")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(out / name, dpi=110)
        plt.close(figure)
        written.append(out / name)
    widths = results["widths"]
    if widths:
        figure, axes = plt.subplots(figsize=(7, 4.5))
        ws = sorted({r["recommenders"] for r in widths})
        # A missing figure is drawn as a gap (NaN), not as zero.
        speedups = [
            (_find(widths, "async", 1, w) or {}).get("speedup_vs_sequential") or math.nan
            for w in ws
        ]
        axes.plot(ws, speedups, "C2^-", label="async vs sequential (throughput at concurrency 1)")
        axes.plot(ws, ws, "k:", label="ideal: the number of recommenders")
        axes.set_xlabel("recommenders per request")
        axes.set_ylabel("speed-up over sequential")
        axes.set_title("Speed-up against fan-out width")
        axes.grid(True, alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(out / "fanout.png", dpi=110)
        plt.close(figure)
        written.append(out / "fanout.png")
    return written


def write_all(results: dict[str, Any], out: Path) -> list[Path]:
    """Derive, then write `results.json`, `report.md` and the plots into `out`."""
    derive(results)
    results["figures"] = [
        {"figure": label, "measured": measured, "goal": goal, "met": met}
        for label, measured, goal, met in figures(results)
    ]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(markdown(results))
    return [out / "results.json", out / "report.md", *plot(results, out)]

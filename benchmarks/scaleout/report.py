"""The scale-out benchmark's report (`benchmarks.scaleout`): markdown, a plot, the files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from benchmarks.scaleout.failover import WARMUP_S

__all__ = ["markdown", "plot", "write"]


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def markdown(results: dict[str, Any]) -> str:
    """The report: what each scenario lost and kept, throughput around the stop, the checks."""
    plan = results["plan"]
    lines = [
        "# Scale-out behind nginx",
        "",
        f"Started {results['started']}. Two gateway instances (gunicorn, {plan['workers']} "
        f"worker{'s' * (plan['workers'] != 1)} each, settings as shipped"
        + "".join(f", {key.replace('__', '.')}: {value}" for key, value in plan["settings"].items())
        + f") behind {results['nginx_version']}, four mocks at {plan['delay_ms']:g} ms; "
        f"{plan['connections']} closed-loop connections through nginx for "
        f"{plan['duration_s']:g} s, the first instance stopped at {plan['stop_after_s']:g} s: "
        "`kill` is SIGKILL to its process group (a crash), `term` SIGTERM to its master. "
        "nginx retries on the other instance as `proxy_next_upstream` says "
        "(`proxy_next_upstream_tries 2`).",
        "",
        "`in flight`: requests sent through nginx and not yet answered at the signal; "
        "`held`: those nginx had passed to the stopped instance, with any it passed to it "
        "until it had exited (which a killed process does a moment after the signal, and a "
        "stopped one once it has finished its requests); `retried`: answered by the other "
        "instance after nginx tried the stopped one.",
        "",
        "| scenario | proxy_next_upstream | sent | answers | lost | in flight | held "
        "| held, lost | held, retried | retried in all | exited after ms | wrong 200s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results["scenarios"]:
        answers = ", ".join(f"{count} x {status}" for status, count in s["statuses"].items())
        lines.append(
            f"| {s['scenario']} | `{s['retry']}` | {s['sent']} | {answers} | **{s['lost']}** "
            f"| {s['in_flight_at_stop']} | {s['in_flight_on_stopped']} | {s['lost_of_those']} "
            f"| {s['retried_of_those']} | {s['retried_in_all']} | {s['exited_after_ms']} "
            f"| {s['wrong']} |"
        )
    lines += [
        "",
        f"Throughput (200s per second) and latency of the 200s, from {WARMUP_S:g} s to the "
        f"stop, and from {plan['settle_s']:g} s after it to the end:",
        "",
        "| scenario | before: 200/s | p50 ms | p99 ms | after: 200/s | p50 ms | p99 ms "
        "| after / before |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in results["scenarios"]:
        b, a = s["before"], s["after"]
        ratio = a["ok_rps"] / b["ok_rps"] if b["ok_rps"] else math.nan
        lines.append(
            f"| {s['scenario']} | {b['ok_rps']} | {_ms(b['p50_ms'])} | {_ms(b['p99_ms'])} "
            f"| {a['ok_rps']} | {_ms(a['p50_ms'])} | {_ms(a['p99_ms'])} | {ratio:.2f} |"
        )
    lines += [
        "",
        "CPU used in those windows, in cores (of the machine's "
        f"{os.cpu_count()}; `other` is everything else on it, other users' work included):",
        "",
    ]
    groups = ["gateways", "nginx", "mocks", "load generator", "other"]
    lines += [
        f"| scenario | window | {' | '.join(groups)} | total |",
        "|---|---|" + "---|" * (len(groups) + 1),
    ]
    for s in results["scenarios"]:
        for window, cores in s["cpu_cores"].items():
            shown = " | ".join(f"{cores.get(g, math.nan):.2f}" for g in groups)
            lines.append(f"| {s['scenario']} | {window} | {shown} | {sum(cores.values()):.2f} |")
    lines += ["", "What nginx logged (errors and warnings):", ""]
    for s in results["scenarios"]:
        said = "; ".join(f"{n} x {m}" for m, n in s["nginx_complaints"].items()) or "nothing"
        lines.append(f"- {s['scenario']}: {said}")
    lines += ["", "| check | measured | goal | met |", "|---|---|---|---|"]
    for c in results["checks"]:
        lines.append(
            f"| {c['figure']} | {c['measured']} | {c['goal']} | {'yes' if c['met'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Answers per second through nginx against time, one panel per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["scenarios"]
    figure, panels = plt.subplots(
        len(runs), 1, figsize=(7, 2.2 * len(runs) + 0.6), sharex=True, squeeze=False
    )
    for axes, s in zip(panels[:, 0], runs, strict=True):
        width = s["timeline"]["bucket_s"]
        times = [i * width for i in range(len(s["timeline"]["ok"]))]
        rates = [n / width for n in s["timeline"]["ok"]]
        axes.step(times, rates, where="post", label="200")
        axes.bar(
            times,
            [n / width for n in s["timeline"]["other"]],
            width=width,
            align="edge",
            color="tab:red",
            label="lost (not 200)",
        )
        axes.axvline(s["stopped_at_s"], color="grey", linestyle=":", label=f"{s['stop']}")
        axes.set_title(f"{s['scenario']}: proxy_next_upstream {s['retry']}", fontsize=9)
        axes.set_ylabel("answers/s")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="lower left")
    # The answers still coming in after the load stopped sending are left out.
    panels[-1, 0].set_xlim(0, results["plan"]["duration_s"])
    panels[-1, 0].set_xlabel("seconds into the load")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """`scaleout.json`, `scaleout.md` and `scaleout.png` in `out`; their paths."""
    paths = [out / "scaleout.json", out / "scaleout.md", out / "scaleout.png"]
    paths[0].write_text(json.dumps(results, indent=2))
    paths[1].write_text(markdown(results))
    plot(results, paths[2])
    return paths

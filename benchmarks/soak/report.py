"""The soak's verdict and report (`benchmarks.soak`): each worker's memory by half, markdown, files.

A worker's run is split at the sample nearest half-time. The growth of its RSS over a half is
the least-squares line through that half's samples, times the half's length: one sample that
happens to catch a collection, or a burst of allocation, does not decide it. A worker is
**flat after warm-up** when its growth in the second half is under `FLAT_MB` (2 MB) *and*
under `FLAT_SHARE` (3%) of its RSS at half-time, both per `FLAT_PER_S` (15 minutes, the
second half of the default 30-minute run) and scaled to the half's length; else it is **still
growing**. Scaled, because a leak grows with time: 1 MB in the second minute of a 2-minute
run is 15 MB in 15 minutes, and is not flat; a run that short can hardly be called flat at
all, which is what it should say.

The first half is the warm-up, whatever it grows: caches, pools, the allocator's arenas (a
run before this suite grew a worker from 68 to 74 MB in its first 15 minutes, then held
within 0.4 MB). The samples of a flat worker wander (that run's other worker: 63.3, 65.3,
64.5 MB) and the fitted line keeps the trend, not the wander; 2 MB in 15 minutes, at that
run's 60 requests per second per worker, is a leak of about 40 bytes per request.

A worker's verdict means something only if it worked: the checks want each worker to have
used at least `MIN_CPU_SHARE` (a quarter) of an even share of the workers' CPU time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = [
    "FLAT_MB",
    "FLAT_PER_S",
    "FLAT_SHARE",
    "MIN_CPU_SHARE",
    "allowed_growth",
    "checks",
    "clock",
    "fitted_growth",
    "markdown",
    "thin",
    "worker_summary",
    "write",
]

FLAT_MB = 2.0
FLAT_SHARE = 0.03
FLAT_PER_S = 900.0
# A worker that did less than a quarter of an even share of the work was hardly soaked.
MIN_CPU_SHARE = 0.25
TABLE_ROWS = 14
FLAT = "flat after warm-up"
GROWING = "still growing"


def fitted_growth(points: list[tuple[float, float]]) -> float | None:
    """The growth over `points` (time, MB) of the least-squares line through them; None for
    fewer than two distinct times."""
    if len(points) < 2:
        return None
    mean_t = sum(t for t, _ in points) / len(points)
    mean_mb = sum(mb for _, mb in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return None
    slope = sum((t - mean_t) * (mb - mean_mb) for t, mb in points) / spread
    return slope * (points[-1][0] - points[0][0])


def allowed_growth(half_mb: float, half_s: float) -> float:
    """The most a worker of `half_mb` may grow in a second half of `half_s` and be flat."""
    return min(FLAT_MB, FLAT_SHARE * half_mb) * half_s / FLAT_PER_S


def worker_summary(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per worker pid: its RSS at the start, at half-time and at the end, its growth in each
    half and the verdict; the CPU time it used in the run, and its share of the workers'."""
    first_t, end_t = samples[0]["t_s"], samples[-1]["t_s"]
    pids = list(dict.fromkeys(pid for sample in samples for pid in sample["rss_mb"]))
    cpu = {pid: [s["cpu_s"][pid] for s in samples if pid in s["cpu_s"]] for pid in pids}
    used = {pid: seconds[-1] - seconds[0] if seconds else 0.0 for pid, seconds in cpu.items()}
    rows = []
    for pid in pids:
        series = [(s["t_s"], s["rss_mb"][pid]) for s in samples if pid in s["rss_mb"]]
        middle = min(range(len(series)), key=lambda i: abs(series[i][0] - end_t / 2))
        first, second = fitted_growth(series[: middle + 1]), fitted_growth(series[middle:])
        half_mb = series[middle][1]
        allowed = allowed_growth(half_mb, series[-1][0] - series[middle][0])
        if series[0][0] != first_t or series[-1][0] != end_t:
            verdict = "not there the whole run (replaced?)"
        elif first is None or second is None:
            verdict = "too few samples"
        elif second < allowed:
            verdict = FLAT
        else:
            verdict = GROWING
        rows.append(
            {
                "pid": pid,
                "start_mb": series[0][1],
                "half_mb": half_mb,
                "half_t_s": series[middle][0],
                "end_mb": series[-1][1],
                "first_half_growth_mb": None if first is None else round(first, 2),
                "second_half_growth_mb": None if second is None else round(second, 2),
                "allowed_growth_mb": round(allowed, 3),
                "second_half_range_mb": [
                    min(mb for _, mb in series[middle:]),
                    max(mb for _, mb in series[middle:]),
                ],
                "verdict": verdict,
                "cpu_s": round(used[pid], 2),
                "cpu_share": round(used[pid] / sum(used.values()), 3)
                if any(used.values())
                else 0.0,
            }
        )
    return rows


def _failed(counts: dict[str, int]) -> int:
    """The requests that got no answer: counted by error name, not status."""
    return sum(n for key, n in counts.items() if not key.isdigit())


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each worker flat after warm-up; every /feedback answered 202; every request answered."""
    rows: list[dict[str, Any]] = []

    def row(figure: str, measured: str, goal: str, met: bool) -> None:
        rows.append({"figure": figure, "measured": measured, "goal": goal, "met": met})

    for worker in results["workers"]:
        growth = worker["second_half_growth_mb"]
        share = "" if growth is None else f" ({growth / worker['half_mb']:+.1%})"
        row(
            f"worker {worker['pid']}: RSS growth in the second half",
            f"{_mb(growth)} MB{share}: {worker['verdict']}",
            f"under {worker['allowed_growth_mb']:.2f} MB",
            worker["verdict"] == FLAT,
        )
    least = MIN_CPU_SHARE / max(1, len(results["workers"]))
    for worker in results["workers"]:
        row(
            f"worker {worker['pid']}: its share of the workers' CPU in the run",
            f"{worker['cpu_share']:.0%} ({worker['cpu_s']:.1f} s)",
            f"at least {least:.0%}",
            worker["cpu_share"] >= least,
        )
    last = results["samples"][-1]
    feedback = last["feedback"]
    other = {status: n for status, n in feedback.items() if status != "202"}
    row(
        "/feedback answers other than 202",
        f"{sum(other.values()):,} of {sum(feedback.values()):,}{_statuses(other, ' ')}",
        "0",
        not other,
    )
    failed = {endpoint: _failed(last[endpoint]) for endpoint in ("recommendations", "experiments")}
    row(
        "requests that got no answer (/recommendation, /experiments)",
        f"{failed['recommendations']}, {failed['experiments']}",
        "0",
        not any(failed.values()),
    )
    return rows


def thin(samples: list[dict[str, Any]], rows: int = TABLE_ROWS) -> list[dict[str, Any]]:
    """Every k-th sample, so that about `rows` are left, the first and the last always kept."""
    step = max(1, math.ceil((len(samples) - 1) / (rows - 1)))
    kept = samples[::step]
    return kept if kept[-1] is samples[-1] else [*kept, samples[-1]]


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def clock(seconds: float) -> str:
    """Seconds as minutes and seconds, ``m:ss``."""
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _statuses(counts: dict[str, int], lead: str = "") -> str:
    if not counts:
        return ""
    return lead + "(" + ", ".join(f"{status}: {n:,}" for status, n in counts.items()) + ")"


def markdown(results: dict[str, Any]) -> str:
    """The report: the setup, the totals, the verdict per worker, the samples, the checks."""
    plan, samples, workers = results["plan"], results["samples"], results["workers"]
    last = samples[-1]
    lines = [
        f"# Soak: {plan['minutes']:g} minutes with feedback on ({plan['store']})",
        "",
        f"Started {results['started']}, commit {results['commit']}, {results['cpus']} cores. "
        f"The gateway under gunicorn ({plan['workers']} workers, settings as shipped) with "
        f"feedback on, the {plan['store']} store; four mocks at {plan['delay_ms']:g} ms. "
        f"{plan['users']} closed-loop users POST /recommendation (of {plan['user_ids']:,} user "
        f"ids, {plan['result_size']} items), click one fused item of {plan['click_share']:.0%} "
        f"of the 200s (POST /feedback) and GET /experiments after {plan['experiments_share']:.0%} "
        f"of their requests, each user's connection closed after every "
        f"{plan['reconnect_every']}th recommendation. Every {plan['sample_s']:g} s, and once "
        f"before the load: each worker's RSS and CPU time (by pid), the answers so far by "
        f"status, the store's size ({results['store_bytes_is']}).",
        "",
        "Answered in all (requests that got no answer are counted by their error's name):",
        "",
    ]
    for endpoint, label in (
        ("recommendations", "POST /recommendation"),
        ("feedback", "POST /feedback"),
        ("experiments", "GET /experiments"),
    ):
        lines.append(
            f"- {label}: {sum(last[endpoint].values()):,} {_statuses(last[endpoint])}".rstrip()
        )
    lines += [
        f"- the store at the end: {last['store_bytes'] / 1e6:.1f} MB "
        f"{_statuses(last['store_files'])}".rstrip(),
        "",
        "## Memory, per worker",
        "",
        "Growth over a half: the least-squares line through its samples, over its length. "
        f"**{FLAT}** when the second half's is under {FLAT_MB:g} MB and under "
        f"{FLAT_SHARE:.0%} of the RSS at half-time per {FLAT_PER_S / 60:g} minutes, scaled to "
        f"the half's length (`allowed`), else **{GROWING}**.",
        "",
        "| worker pid | RSS at start MB | at half-time | at the end | growth, first half "
        "| growth, second half | allowed | second half, min-max | verdict | CPU s (share) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in workers:
        low, high = w["second_half_range_mb"]
        lines.append(
            f"| {w['pid']} | {w['start_mb']:.1f} | {w['half_mb']:.1f} ({clock(w['half_t_s'])}) "
            f"| {w['end_mb']:.1f} | {_mb(w['first_half_growth_mb'])} "
            f"| {_mb(w['second_half_growth_mb'])} | {w['allowed_growth_mb']:.2f} "
            f"| {low:.1f}-{high:.1f} | **{w['verdict']}** "
            f"| {w['cpu_s']:.1f} ({w['cpu_share']:.0%}) |"
        )
    lines += [""]
    lines += [f"Worker {w['pid']}: {w['verdict']}." for w in workers]
    pids = [w["pid"] for w in workers]
    shown = thin(samples)
    lines += [
        "",
        "## Samples",
        "",
        f"{len(shown)} of the {len(samples)} samples. `rec/s`: recommendations answered per "
        "second since the row above; `not 200`, `not 202`: so far, of all answered or failed.",
        "",
        "| elapsed | "
        + " | ".join(f"RSS {pid} MB" for pid in pids)
        + " | recommendations | rec/s | not 200 | /feedback | not 202 | store MB |",
        "|---|" + "---|" * (len(pids) + 6),
    ]
    previous: dict[str, Any] | None = None
    for s in shown:
        sent = sum(s["recommendations"].values())
        rate = "-"
        if previous is not None and s["t_s"] > previous["t_s"]:
            before = sum(previous["recommendations"].values())
            rate = f"{(sent - before) / (s['t_s'] - previous['t_s']):.0f}"
        rss = " | ".join(f"{s['rss_mb'][pid]:.1f}" if pid in s["rss_mb"] else "-" for pid in pids)
        clicks = sum(s["feedback"].values())
        lines.append(
            f"| {clock(s['t_s'])} | {rss} | {sent:,} | {rate} "
            f"| {sent - s['recommendations'].get('200', 0):,} | {clicks:,} "
            f"| {clicks - s['feedback'].get('202', 0):,} | {s['store_bytes'] / 1e6:.1f} |"
        )
        previous = s
    lines += ["", "| check | measured | goal | met |", "|---|---|---|---|"]
    for c in results["checks"]:
        met = "yes" if c["met"] else "no"
        lines.append(f"| {c['figure']} | {c['measured']} | {c['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """`soak.json` and `soak.md` in `out`; their paths."""
    paths = [out / "soak.json", out / "soak.md"]
    paths[0].write_text(json.dumps(results, indent=1))
    paths[1].write_text(markdown(results))
    return paths

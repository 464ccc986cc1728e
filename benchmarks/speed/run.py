"""The benchmark run: mocks, one gunicorn per target, a load generator per level, the figures.

Targets, measured in this order at every concurrency level:

- ``floor``: the load generator fans out to the mocks itself (no gateway);
- ``sequential``, ``threads``, ``async``: the gateway under gunicorn with its shipped config (the
  uvicorn worker: one event loop per worker serves HTTP and the fan-out), `GATEWAY_STRATEGY` set;
- ``async-gthread``: the async fan-out served the way before it, `GATEWAY_SERVER=gthread` (a
  thread per request, each view handed to a loop thread);
- ``per-call-session``: `benchmarks.speed.tutorial_app`, gunicorn as tutorials configure it.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness.servers import (
    GATEWAY_COMMAND,
    GUNICORN,
    booted_workers,
    gateway_env,
    measure_level,
    mocks,
    serve_gunicorn,
    source_commit,
    worker_rss_mb,
)
from mock_recommenders import DEFAULT_NAMES

__all__ = ["GATEWAY_TARGETS", "TARGETS", "Plan", "run_benchmark"]

GATEWAY_TARGETS = ("sequential", "threads", "async-gthread", "async")
TARGETS = ("floor", *GATEWAY_TARGETS, "per-call-session")


@dataclass
class Plan:
    """What to measure."""

    levels: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    duration_s: float = 10.0
    warmup_s: float = 1.0
    delay_ms: float = 20.0
    jitter_ms: float = 0.0
    recommenders: int = 4
    widths: list[int] = field(default_factory=lambda: [1, 4, 16])
    workers: int | None = None
    targets: list[str] = field(default_factory=lambda: list(TARGETS))

    def load_seconds(self) -> float:
        """Seconds of load the plan generates (for the progress bar)."""
        main = len(self.targets) * len(self.levels)
        widths = len(self.widths) * 3
        return (main + widths) * (self.duration_s + self.warmup_s)


def _server(target: str, urls: list[str], names: list[str], plan: Plan, log: Path) -> Any:
    recommenders = [{"name": n, "url": u} for n, u in zip(names, urls, strict=True)]
    if target == "per-call-session":
        env = gateway_env(recommenders)
        command = [GUNICORN, "-c", "benchmarks/speed/tutorial_gunicorn.conf.py"]
        command += ["benchmarks.speed.tutorial_app:app"]
    else:
        # Sequential calls to 16 recommenders at 20 ms need more than the default deadline.
        deadline_ms = max(1000, 4 * len(names) * (plan.delay_ms + plan.jitter_ms))
        strategy, server = (
            ("async", "gthread") if target == "async-gthread" else (target, "uvicorn")
        )
        env = gateway_env(recommenders, strategy=strategy, server=server, deadline_ms=deadline_ms)
        command = list(GATEWAY_COMMAND)
        if plan.workers is not None:
            command += ["--workers", str(plan.workers)]
    return serve_gunicorn(command, log, env)


def _measure(
    target: str,
    names: list[str],
    urls: list[str],
    levels: list[int],
    plan: Plan,
    logs: Path,
    mocks_pid: int,
    advance: Callable[[str], None],
) -> tuple[list[dict[str, Any]], list[float]]:
    runs = []
    if target == "floor":
        for level in levels:
            advance(f"floor, {len(names)} recommenders, concurrency {level}")
            runs.append(measure_level("floor", ",".join(urls), level, plan, {"mocks": [mocks_pid]}))
        return runs, []
    server = _server(target, urls, names, plan, logs / f"{target}-{len(names)}.log")
    cores = os.cpu_count() or 1
    workers = 2 * cores + 1 if target == "per-call-session" else (plan.workers or cores)
    with server as (url, process):
        watched = {"gateway": booted_workers(process.pid, workers), "mocks": [mocks_pid]}
        for level in levels:
            advance(f"{target}, {len(names)} recommenders, concurrency {level}")
            runs.append(measure_level(target, url, level, plan, watched))
        memory = worker_rss_mb(process.pid)
    return runs, memory


def run_benchmark(plan: Plan, out: Path, advance: Callable[[str], None]) -> dict[str, Any]:
    """Run `plan`, writing logs under `out`; return the results (see `benchmarks.speed.report`)."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "plan": plan.__dict__,
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": source_commit(),
        "runs": [],
        "memory_mb": {},
        "widths": [],
    }

    def sweep(width: int, targets: list[str], levels: list[int]) -> list[dict[str, Any]]:
        names = [f"r{i + 1}" for i in range(width)] if width != 4 else list(DEFAULT_NAMES)
        rows = []
        delays = ("--delay-ms", str(plan.delay_ms), "--jitter-ms", str(plan.jitter_ms))
        with mocks(names, logs / f"mocks-{width}.log", *delays) as fleet:
            urls = [fleet.url(name) for name in names]
            for target in targets:
                runs, memory = _measure(target, names, urls, levels, plan, logs, fleet.pid, advance)
                rows += [{"target": target, "recommenders": width, **run} for run in runs]
                if memory:
                    results["memory_mb"][f"{target}@{width}"] = memory
        return rows

    results["runs"] = sweep(plan.recommenders, plan.targets, plan.levels)
    for width in plan.widths:
        results["widths"] += sweep(width, ["floor", "sequential", "async"], [1])
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return results

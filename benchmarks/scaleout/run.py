"""Scale-out, shown on one machine: ``python -m benchmarks scaleout`` (``make scaleout``).

Two gateway instances, each a gunicorn of its own (one worker by default: the pair then has one
worker per core, as one gateway as shipped has on this 2-core machine; more would only contend
for the same cores), behind nginx (`benchmarks.harness.balancer`), in front of four mocks at 20 ms.
Each scenario gets a fresh pair and a fresh nginx:

1. each instance is asked directly for every user's answer: the reference (the mocks are
   deterministic per user, so both must give the same one);
2. `--connections` closed loops POST /recommendation through nginx for `--duration` seconds;
3. at `--stop-after` seconds the first instance is stopped: ``kill`` sends SIGKILL to its whole
   process group (master and workers: a crash), ``term`` sends SIGTERM to its master (a process
   manager's stop: gunicorn finishes what it has in flight);
4. every answer is recorded: its status, when it was sent and answered, which instances nginx
   tried (``X-Upstream``), and whether a 200 is the reference answer.

``kill`` and ``term`` run with nginx's default ``proxy_next_upstream error timeout``: a POST is
retried on the other instance only if it was never sent to the first (a refused connection),
so the POSTs in flight on a crashed instance are answered 502. ``kill-retry`` and
``term-retry`` add ``non_idempotent``: a POST already sent is retried too (safe here: a
recommendation is a read). Writes `scaleout.json`, `scaleout.md` and `scaleout.png`
(`benchmarks.scaleout.report`) to `benchmarks/results/scaleout-<timestamp>/` (`--out`), and
each scenario's logs (nginx's config, error and access logs, both gunicorns') under `logs/`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from benchmarks.harness.balancer import (
    DEFAULT_RETRY,
    find_nginx,
    leftover_processes,
    nginx_complaints,
    serve_nginx,
    wait_ready,
)
from benchmarks.harness.servers import (
    GATEWAY_COMMAND,
    ROOT,
    children,
    gateway_env,
    mocks,
    run_with_spinner,
)
from benchmarks.scaleout.failover import cpu_by_group, drive, reference_answers, summarize
from benchmarks.scaleout.report import markdown, write
from mock_recommenders import DEFAULT_NAMES, MockFleetProcess
from mock_recommenders.loopback import loopback_socket, port_of
from mock_recommenders.process import stop_process

__all__ = [
    "SCENARIOS",
    "Instance",
    "ScaleoutPlan",
    "checks",
    "main",
    "run_scaleout",
    "run_scenario",
]

RETRY_SENT = f"{DEFAULT_RETRY} non_idempotent"


@dataclass(frozen=True)
class Scenario:
    """How the first instance is stopped, and what nginx retries on the other."""

    stop: str  # "kill": SIGKILL to its process group; "term": SIGTERM to its master
    retry: str  # nginx's proxy_next_upstream


SCENARIOS = {
    "kill": Scenario("kill", DEFAULT_RETRY),
    "kill-retry": Scenario("kill", RETRY_SENT),
    "term": Scenario("term", DEFAULT_RETRY),
    "term-retry": Scenario("term", RETRY_SENT),
}


@dataclass
class ScaleoutPlan:
    """What to run."""

    connections: int = 32
    duration_s: float = 8.0
    stop_after_s: float = 3.0
    settle_s: float = 1.0  # answers to requests sent this long after the stop must all be right
    delay_ms: float = 20.0
    workers: int = 1
    users: int = 50
    scenarios: list[str] = field(default_factory=lambda: ["kill", "kill-retry", "term"])
    # Gateway settings, as `gateway_env` takes them. Admission is fixed at `max_in_flight`, as
    # in the tests: on a busy machine the adaptive limit follows the loop's lag (other users'
    # work included) down and sheds requests (503) for reasons that have nothing to do with
    # the stop. `--adaptive-admission` keeps it.
    settings: dict[str, str] = field(default_factory=lambda: {"admission__adaptive": "false"})
    nginx: str | None = None  # the binary; found on PATH, /usr/sbin or /sbin when None


class Instance:
    """One gateway instance: gunicorn, master and workers, in a process group of its own."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        with loopback_socket() as listener:
            self.port = port_of(listener)
            with log.open("ab") as sink:
                self.process = subprocess.Popen(
                    [*command, "--bind", f"fd://{listener.fileno()}"],
                    cwd=ROOT,
                    env=env,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    pass_fds=(listener.fileno(),),
                    start_new_session=True,
                )
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self.log = log
        self.leftover: list[int] = []

    def wait_ready(self) -> None:
        """Return once its /readyz answers 200."""
        wait_ready(f"{self.url}/readyz", self.process, self.log)

    async def stop_by(self, how: str) -> None:
        """``kill``: SIGKILL to master and workers at once; ``term``: SIGTERM to the master.

        Returns once the master and every worker have exited.
        """
        pids = [self.process.pid, *children(self.process.pid)]
        # Opened before the signal: a process handle, never a pid the system could reuse.
        handles = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                handles.append(os.pidfd_open(pid))
        try:
            if how == "kill":
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.send_signal(signal.SIGTERM)
            await asyncio.gather(*(_exited(handle) for handle in handles))
        finally:
            for handle in handles:
                os.close(handle)

    def stop(self) -> None:
        """SIGTERM unless it has exited; wait; record any process of its group left over."""
        stop_process(self.process, timeout_s=35)
        self.leftover = leftover_processes(self.process.pid)


async def _exited(handle: int) -> None:
    """Return once the process of pidfd `handle` has exited (it becomes readable)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def readable() -> None:
        loop.remove_reader(handle)
        done.set_result(None)

    loop.add_reader(handle, readable)
    await done


def run_scenario(
    name: str, plan: ScaleoutPlan, nginx: str, fleet: MockFleetProcess, logs: Path
) -> dict[str, Any]:
    """A fresh pair of instances behind a fresh nginx; load; stop the first; the summary."""
    scenario = SCENARIOS[name]
    folder = logs / name
    folder.mkdir(parents=True, exist_ok=True)
    command = [*GATEWAY_COMMAND, "--workers", str(plan.workers)]
    recommenders = [{"name": n, "url": fleet.url(n)} for n in DEFAULT_NAMES]
    with contextlib.ExitStack() as stack:
        metrics = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scaleout-")))
        instances = []
        for label in ("a", "b"):
            # Each gunicorn's metrics files in a folder of ours: a killed one cannot remove its.
            (metrics / label).mkdir()
            env = gateway_env(recommenders, **plan.settings)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics / label)
            instance = Instance(command, env, folder / f"gateway-{label}.log")
            stack.callback(instance.stop)
            instances.append(instance)
        for instance in instances:
            instance.wait_ready()
        stopped, survivor = instances
        users = [f"scaleout-{n}" for n in range(plan.users)]
        references = asyncio.run(reference_answers([i.url for i in instances], users))
        ports = [i.port for i in instances]
        balancer = stack.enter_context(serve_nginx(nginx, ports, folder, scenario.retry))
        groups = {
            "gateways": [i.process.pid for i in instances],
            "nginx": [balancer.process.pid],
            "mocks": [fleet.pid],
        }
        load = uvloop.run(
            drive(
                balancer.url,
                references,
                connections=plan.connections,
                duration_s=plan.duration_s,
                stop_after_s=plan.stop_after_s,
                stop=lambda: stopped.stop_by(scenario.stop),
                settle_s=plan.settle_s,
                cpu=lambda: cpu_by_group(groups),
            )
        )
    return {
        "scenario": name,
        "stop": scenario.stop,
        "retry": scenario.retry,
        "stopped": stopped.address,
        "survivor": survivor.address,
        **summarize(load, stopped.address, plan.settle_s, plan.duration_s),
        "nginx_exit_code": balancer.exit_code,
        "nginx_complaints": nginx_complaints(folder / "error.log"),
        "leftover_processes": balancer.leftover + stopped.leftover + survivor.leftover,
    }


def run_scaleout(plan: ScaleoutPlan, out: Path, advance: Callable[[str], None]) -> dict[str, Any]:
    """Every scenario of `plan`, in front of one fleet of mocks; the results and checks."""
    nginx = plan.nginx or find_nginx()
    if nginx is None:
        raise RuntimeError("nginx is not installed (make tools: apt-get install nginx-light)")
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runs = []
    with mocks(list(DEFAULT_NAMES), logs / "mocks.log", "--delay-ms", str(plan.delay_ms)) as fleet:
        for name in plan.scenarios:
            advance(f"{name}: {plan.connections} connections, {plan.duration_s:g} s")
            runs.append(run_scenario(name, plan, nginx, fleet, logs))
    results: dict[str, Any] = {
        "plan": plan.__dict__ | {"nginx": nginx},
        "nginx_version": version.stderr.strip().removeprefix("nginx version: "),
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "scenarios": runs,
    }
    results["checks"] = checks(results)
    return results


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per scenario: what was lost, whether every 200 was right, whether all stopped cleanly."""
    settle = results["plan"]["settle_s"]
    rows: list[dict[str, Any]] = []

    def row(figure: str, measured: str, goal: str, met: bool) -> None:
        rows.append({"figure": figure, "measured": measured, "goal": goal, "met": met})

    for s in results["scenarios"]:
        name, lost = s["scenario"], s["lost"]
        if s["stop"] == "kill" and s["retry"] == DEFAULT_RETRY:
            row(
                f"{name}: lost, against the requests the killed instance held",
                f"{lost} of {s['in_flight_on_stopped']} ({s['lost_elsewhere']} elsewhere)",
                "at most those",
                lost <= s["in_flight_on_stopped"] and s["lost_elsewhere"] == 0,
            )
        else:
            row(f"{name}: lost", f"{lost}", "0", lost == 0)
        row(f"{name}: 200s that are not the reference answer", f"{s['wrong']}", "0", not s["wrong"])
        row(
            f"{name}: requests sent {settle:g} s or more after the stop not answered right",
            f"{s['late_not_right']} of {s['late_sent']}",
            "0",
            s["late_sent"] > 0 and not s["late_not_right"],
        )
        row(
            f"{name}: nginx's exit code; processes left over",
            f"{s['nginx_exit_code']}; {s['leftover_processes'] or 'none'}",
            "0; none",
            s["nginx_exit_code"] == 0 and not s["leftover_processes"],
        )
    return rows


def parse_plan(argv: list[str] | None = None) -> tuple[ScaleoutPlan, Path]:
    """The plan and output folder from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks scaleout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--connections", type=int, default=32, help="closed loops (32)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load (8)")
    parser.add_argument(
        "--stop-after", type=float, default=3.0, help="seconds into the load to stop one (3)"
    )
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers per instance (1)")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="each mock's delay (20)")
    parser.add_argument(
        "--scenarios",
        default="kill,kill-retry,term",
        help=f"comma-separated, of {', '.join(SCENARIOS)} (kill,kill-retry,term)",
    )
    parser.add_argument(
        "--adaptive-admission",
        action="store_true",
        help="keep the gateway's adaptive admission (on a busy machine it sheds, 503)",
    )
    parser.add_argument("--nginx", help="the nginx binary (default: found on PATH or /usr/sbin)")
    parser.add_argument(
        "--out", type=Path, help="output folder (default benchmarks/results/scaleout-<timestamp>)"
    )
    args = parser.parse_args(argv)
    scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    if not scenarios or set(scenarios) - set(SCENARIOS):
        parser.error(f"--scenarios are among {', '.join(SCENARIOS)}")
    if args.connections < 1 or args.workers < 1:
        parser.error("--connections and --workers must be positive")
    if not 0 < args.stop_after < args.duration - 1:
        parser.error("--stop-after must leave more than 1 s of --duration after it")
    plan = ScaleoutPlan(
        connections=args.connections,
        duration_s=args.duration,
        stop_after_s=args.stop_after,
        delay_ms=args.delay_ms,
        workers=args.workers,
        scenarios=scenarios,
        nginx=args.nginx,
    )
    if args.adaptive_admission:
        plan.settings = {}
    out = args.out or ROOT / "benchmarks" / "results" / time.strftime("scaleout-%Y%m%d-%H%M%S")
    return plan, out


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios, print the report and write it; 1 if a check was not met."""
    plan, out = parse_plan(argv)
    out.mkdir(parents=True, exist_ok=True)
    results, console = run_with_spinner(lambda advance: run_scaleout(plan, out, advance))
    written = write(results, out)
    console.print(markdown(results))
    console.print(f"written: {', '.join(str(p) for p in written)}")
    return 0 if all(c["met"] for c in results["checks"]) else 1

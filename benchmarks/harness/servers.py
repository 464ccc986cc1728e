"""The harness every benchmark stands on: mocks and gunicorn started on free ports, a load
level measured in a load generator of its own, the CPU and memory of the processes watched.

The suites (`benchmarks.speed`, `benchmarks.quality`, `benchmarks.online`,
`benchmarks.scaleout`, `benchmarks.soak`) start what they measure with these.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mock_recommenders import MockFleetProcess
from mock_recommenders.loopback import loopback_socket, port_of
from mock_recommenders.process import stop_process

__all__ = [
    "GATEWAY_COMMAND",
    "GUNICORN",
    "PYTHON",
    "ROOT",
    "booted_workers",
    "children",
    "cpu_seconds",
    "gateway_env",
    "measure_level",
    "mocks",
    "pick",
    "rss_mb",
    "run_with_spinner",
    "serve_gunicorn",
    "source_commit",
    "worker_rss_mb",
]

ROOT = Path(__file__).resolve().parent.parent.parent
PYTHON = sys.executable
GUNICORN = str(Path(PYTHON).parent / "gunicorn")
READY_WITHIN_S = 30.0


def pick(text: str, known: Iterable[str], what: str) -> list[str]:
    """The names in comma-separated `text`, in `known`'s order; ValueError naming any unknown."""
    known = list(known)
    wanted = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(wanted - set(known))
    if unknown or not wanted:
        raise ValueError(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return [name for name in known if name in wanted]


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    give_up = time.monotonic() + READY_WITHIN_S
    while time.monotonic() < give_up:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited at start-up:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (OSError, http.client.HTTPException):
            # HTTPException: a server still starting may close a connection unanswered.
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {READY_WITHIN_S:.0f} s")


@contextlib.contextmanager
def serve_gunicorn(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run gunicorn `command` on a loopback port the system picks; yields its URL and process.

    The port is bound here and handed over (``--bind fd://N``): no other process can take it
    between its choice and its use.
    """
    with loopback_socket() as listener:
        url = f"http://127.0.0.1:{port_of(listener)}"
        with log.open("ab") as sink:
            process = subprocess.Popen(
                [*command, "--bind", f"fd://{listener.fileno()}"],
                cwd=ROOT,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=(listener.fileno(),),
            )
    try:
        _wait_ready(f"{url}/readyz", process, log)
        yield url, process
    finally:
        stop_process(process, timeout_s=35)


def mocks(names: list[str], log: Path, *flags: str) -> MockFleetProcess:
    """Mock recommenders `names` in a process of their own, on free ports (a context manager)."""
    return MockFleetProcess(names, flags, log)


def gateway_env(recommenders: list[dict[str, Any]], **settings: object) -> dict[str, str]:
    """This process's environment without its `GATEWAY_*` variables, plus the given settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_RECOMMENDERS"] = json.dumps(recommenders)
    env.update((f"GATEWAY_{key.upper()}", str(value)) for key, value in settings.items())
    return env


GATEWAY_COMMAND = [GUNICORN, "-c", "gunicorn.conf.py", "gateway.asgi:app"]


def rss_mb(pid: int) -> float | None:
    """Resident memory of process `pid` in MB (Linux /proc); None once it has exited."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def worker_rss_mb(master_pid: int) -> list[float]:
    """Resident memory of each child (worker) of a gunicorn master, in MB (Linux /proc)."""
    sizes = (rss_mb(child) for child in children(master_pid))
    return [size for size in sizes if size is not None]


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time the processes `pids` have used so far (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def children(pid: int) -> list[int]:
    """The child processes of `pid` (a gunicorn master's workers)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def booted_workers(master_pid: int, count: int | None = None) -> list[int]:
    """The workers of a gunicorn master, once all `count` (default: one per core) have booted."""
    count = count or os.cpu_count() or 1
    give_up = time.monotonic() + READY_WITHIN_S
    while len(workers := children(master_pid)) < count and time.monotonic() < give_up:
        time.sleep(0.05)
    # A worker is forked before it has loaded the app; give the last one time to boot.
    time.sleep(0.5)
    return workers


class _Timing(Protocol):
    duration_s: float
    warmup_s: float


def measure_level(
    target: str, url: str, concurrency: int, plan: _Timing, watched: dict[str, list[int]]
) -> dict[str, Any]:
    """One load level; adds the CPU that each `watched` group of processes spent per request."""
    before = {group: cpu_seconds(pids) for group, pids in watched.items()}
    command = [PYTHON, "-m", "benchmarks.harness.loadgen", "--target"]
    command += ["floor" if target == "floor" else "gateway", "--url", url]
    command += ["--concurrency", str(concurrency), "--duration", str(plan.duration_s)]
    command += ["--warmup", str(plan.warmup_s)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    sent = result["sent"] or 1
    result["cpu_ms_per_request"] = {"load generator": result.pop("cpu_ms_per_request")}
    for group, pids in watched.items():
        spent = cpu_seconds(pids) - before[group]
        result["cpu_ms_per_request"][group] = round(spent * 1000 / sent, 3)
    return result


def source_commit() -> str:
    """The commit the measured code is from (with ``+changes`` when the tree differs), or ``?``."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "?"
    return f"{head}+changes" if head and changed else (head or "?")


T = TypeVar("T")

if TYPE_CHECKING:
    from rich.console import Console


def run_with_spinner(run: Callable[[Callable[[str], None]], T]) -> tuple[T, Console]:
    """Run `run(advance)` under a spinner that shows the step `advance` names last.

    Returns what `run` returned, and the console to print the figures on (wide when the output
    is not a terminal: a log file, CI).
    """
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(width=None if sys.stdout.isatty() else 140)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("starting the mocks", total=None)
        result = run(lambda text: progress.update(task, description=text))
    return result, console

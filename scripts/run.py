"""`make run`: the four mock recommenders and the gateway under gunicorn, stopped together.

Starts `python -m mock_recommenders` (ports 5001-5004) and gunicorn (port 5000), waits until
every one of them answers, prints a `curl` line to try, and on Ctrl-C (or when either process
dies) stops both.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("sml", "asc", "trd", "psn")
READY_WITHIN_S = 30.0


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait_ready(
    processes: dict[str, subprocess.Popen[bytes]], urls: list[str], stop: threading.Event
) -> None:
    give_up = time.monotonic() + READY_WITHIN_S
    while urls and not stop.is_set():
        for name, process in processes.items():
            if process.poll() is not None:
                raise SystemExit(f"run: {name} exited with code {process.returncode} at start-up")
        if time.monotonic() > give_up:
            raise SystemExit(f"run: no answer within {READY_WITHIN_S:.0f} s from {urls[0]}")
        urls = [url for url in urls if not _answers(url)]
        if urls:
            stop.wait(0.2)


def _stop(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes.values():
        try:
            process.wait(timeout=35)
        except subprocess.TimeoutExpired:
            process.kill()


def main(argv: list[str] | None = None) -> int:
    """Run until Ctrl-C or until one of the processes dies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5000, help="the gateway's port")
    parser.add_argument(
        "--mock-base-port", type=int, default=5001, help="the first of the four mocks' ports"
    )
    args = parser.parse_args(argv)
    gateway = f"http://127.0.0.1:{args.port}"
    mock_ports = [args.mock_base_port + i for i in range(len(NAMES))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.mock_base_port != 5001:
        # The packaged config points at 5001-5004; other ports need their own list.
        env["GATEWAY_RECOMMENDERS"] = json.dumps(
            [
                {"name": name, "url": f"http://127.0.0.1:{port}/test", "timeout_ms": 500}
                for name, port in zip(NAMES, mock_ports, strict=True)
            ]
        )
    python = sys.executable
    processes = {
        "mock recommenders": subprocess.Popen(
            [python, "-m", "mock_recommenders", "--base-port", str(args.mock_base_port)],
            cwd=ROOT,
        ),
        "gateway": subprocess.Popen(
            [
                str(Path(python).parent / "gunicorn"),
                *("-c", "gunicorn.conf.py", "gateway.wsgi:app"),
                *("--bind", f"127.0.0.1:{args.port}"),
            ],
            cwd=ROOT,
            env=env,
        ),
    }
    # Set explicitly: a process started in the background inherits SIGINT ignored, and the
    # children may see Ctrl-C before this process does, so their exit is not an error then.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    curl = (
        f"curl -s -X POST {gateway}/recommendation -H 'Content-Type: application/json' "
        """-d '{"user_id": "u1", "resultSize": 3}'"""
    )
    urls = [f"http://127.0.0.1:{port}/stats" for port in mock_ports] + [f"{gateway}/readyz"]
    try:
        _wait_ready(processes, urls, stop)
        if stop.is_set():
            return 0
        print(
            f"\nReady: the gateway on {gateway}, mock recommenders on ports "
            f"{mock_ports[0]}-{mock_ports[-1]}.\nTry it:\n\n  {curl}\n\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stop.is_set() and all(p.poll() is None for p in processes.values()):
            stop.wait(0.5)
        if stop.wait(1.0):
            return 0
        dead = [name for name, process in processes.items() if process.poll() is not None]
        print(f"run: {', '.join(dead)} stopped; stopping the rest", file=sys.stderr)
        return 1
    finally:
        _stop(processes)


if __name__ == "__main__":
    sys.exit(main())

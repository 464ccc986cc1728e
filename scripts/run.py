"""`make run`: the four mock recommenders and the gateway under gunicorn, stopped together.

Starts `python -m mock_recommenders` (ports 5001-5004) and gunicorn (port 5000), waits until
every one of them answers, prints a `curl` line to try, and on Ctrl-C (or when either process
dies) stops both.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = "http://127.0.0.1:5000"
MOCK_PORTS = (5001, 5002, 5003, 5004)
READY_WITHIN_S = 30.0

CURL = (
    f"curl -s -X POST {GATEWAY}/recommendation -H 'Content-Type: application/json' "
    """-d '{"user_id": "u1", "resultSize": 3}'"""
)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait_ready(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    urls = [f"http://127.0.0.1:{port}/stats" for port in MOCK_PORTS] + [f"{GATEWAY}/readyz"]
    give_up = time.monotonic() + READY_WITHIN_S
    while urls:
        for name, process in processes.items():
            if process.poll() is not None:
                raise SystemExit(f"run: {name} exited with code {process.returncode} at start-up")
        if time.monotonic() > give_up:
            raise SystemExit(f"run: no answer within {READY_WITHIN_S:.0f} s from {urls[0]}")
        urls = [url for url in urls if not _answers(url)]
        if urls:
            time.sleep(0.2)


def _stop(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes.values():
        try:
            process.wait(timeout=35)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> int:
    """Run until Ctrl-C or until one of the processes dies."""
    python = sys.executable
    bin_dir = Path(python).parent
    processes = {
        "mock recommenders": subprocess.Popen([python, "-m", "mock_recommenders"], cwd=ROOT),
        "gateway": subprocess.Popen(
            [str(bin_dir / "gunicorn"), "-c", "gunicorn.conf.py", "gateway.wsgi:app"],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        ),
    }
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        _wait_ready(processes)
        print(f"\nReady: the gateway on {GATEWAY}, mock recommenders on ports 5001-5004.")
        print(f"Try it:\n\n  {CURL}\n\nCtrl-C stops everything.\n", flush=True)
        while all(process.poll() is None for process in processes.values()):
            time.sleep(0.5)
        dead = [name for name, process in processes.items() if process.poll() is not None]
        print(f"run: {', '.join(dead)} stopped; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(processes)


if __name__ == "__main__":
    sys.exit(main())

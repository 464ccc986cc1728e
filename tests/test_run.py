"""`make run`'s launcher (`scripts/run.py`): everything starts, answers, and stops on Ctrl-C."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time

import requests

from tests.conftest import ROOT


def free_port_run(count: int) -> int:
    """The first of `count` consecutive loopback ports that were all free a moment ago."""
    for _ in range(200):
        base = random.randint(20_000, 60_000)
        try:
            sockets = []
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise RuntimeError("no run of free ports found")


def port_is_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_make_run_starts_everything_prints_curl_and_stops_on_ctrl_c() -> None:
    gateway_port = free_port_run(1)
    mock_base = free_port_run(4)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    process = subprocess.Popen(
        [sys.executable, "scripts/run.py", "--port", str(gateway_port)]
        + ["--mock-base-port", str(mock_base)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives `make run`
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        give_up = time.monotonic() + 60
        while not any(line.startswith("  curl ") for line in lines):
            assert time.monotonic() < give_up, "".join(lines)
            line = process.stdout.readline()
            assert line, "run.py ended before it was ready:\n" + "".join(lines)
            lines.append(line)

        curl = next(line for line in lines if line.startswith("  curl "))
        assert f"http://127.0.0.1:{gateway_port}/recommendation" in curl
        response = requests.post(
            f"http://127.0.0.1:{gateway_port}/recommendation",
            json={"user_id": "u1", "resultSize": 3},
            timeout=5,
        )
        assert response.status_code == 200
        assert response.json()["complete"] is True

        # Ctrl-C: the terminal signals the whole foreground process group.
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=40)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    assert process.returncode == 0, output
    assert "Traceback" not in "".join(lines) + output
    ports = [gateway_port, *range(mock_base, mock_base + 4)]
    assert not any(port_is_open(port) for port in ports)

"""`make run`'s launcher (`scripts/run.py`): everything starts, answers, and stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.helpers import ROOT, port_is_open

pytestmark = pytest.mark.slow


def test_make_run_starts_everything_prints_curl_and_stops_on_ctrl_c() -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    process = subprocess.Popen(
        [sys.executable, "scripts/run.py", "--port", "0", "--mock-base-port", "0"],
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

        ready = next(line for line in lines if line.startswith("Ready: "))
        gateway_port, *mock_ports = (int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", ready))
        assert len(mock_ports) == 4
        curl = next(line for line in lines if line.startswith("  curl "))
        assert f"http://127.0.0.1:{gateway_port}/recommendation" in curl
        response = requests.post(
            f"http://127.0.0.1:{gateway_port}/recommendation",
            json={"user_id": "u1", "resultSize": 3},
            timeout=30,
        )
        assert response.status_code == 200
        assert list(response.json()["sources"]) == ["sml", "asc", "trd", "psn"]

        # Ctrl-C: the terminal signals the whole foreground process group.
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=40)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    assert process.returncode == 0, output
    assert "Traceback" not in "".join(lines) + output
    assert not any(port_is_open(port) for port in [gateway_port, *mock_ports])

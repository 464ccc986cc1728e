"""`make run`'s launcher (`scripts/run.py`): everything starts, answers, and stops on Ctrl-C."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from model_servers.processes import missing_model_servers
from tests.helpers import ROOT, port_is_open
from tests.tools import REQUIRE_TOOLS_VARIABLE


def _run_module() -> Any:
    """scripts/run.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("run_script", ROOT / "scripts" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_feedback_is_on_in_the_embedded_store_with_a_salt_kept_across_runs(
    tmp_path: Path,
) -> None:
    feedback_environment = _run_module().feedback_environment
    first = feedback_environment({}, tmp_path / "feedback")
    second = feedback_environment({}, tmp_path / "feedback")

    assert first["GATEWAY_FEEDBACK__STORE"] == f"sqlite:///{tmp_path / 'feedback' / 'feedback.db'}"
    assert len(first["GATEWAY_FEEDBACK__SALT"]) == 64
    assert second == first  # the same pseudonyms and arms next time
    assert (tmp_path / "feedback" / "salt").stat().st_mode & 0o077 == 0
    assert feedback_environment({"GATEWAY_FEEDBACK__STORE": ""}, tmp_path / "x") == {}
    salted = feedback_environment({"GATEWAY_FEEDBACK__SALT": "mine"}, tmp_path / "y")
    assert "GATEWAY_FEEDBACK__SALT" not in salted
    assert not (tmp_path / "y" / "salt").exists()


@pytest.mark.slow
def test_make_run_starts_everything_prints_curl_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    process = subprocess.Popen(
        [sys.executable, "scripts/run.py", "--port", "0", "--mock-base-port", "0"]
        + ["--feedback-dir", str(tmp_path / "feedback")],
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
        while not any(line.startswith("Ctrl-C stops everything") for line in lines):
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
        # Feedback is on, in the embedded store: a click on what was shown is counted.
        assert any(f"{gateway_port}/feedback" in line for line in lines)
        shown = response.json()
        click = {"request_id": shown["request_id"], "item_id": shown["fused"][0]["id"]}
        clicked = requests.post(
            f"http://127.0.0.1:{gateway_port}/feedback",
            json={**click, "event": "click"},
            timeout=30,
        )
        assert clicked.status_code == 202, clicked.text
        assert (tmp_path / "feedback" / "feedback.db").exists()

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


@pytest.mark.slow
def test_with_models_the_gateway_calls_the_real_model_servers_beside_the_mocks(
    tmp_path: Path,
) -> None:
    missing = missing_model_servers()
    if missing is not None:
        if os.environ.get(REQUIRE_TOOLS_VARIABLE) == "1":
            pytest.fail(f"{missing}, and {REQUIRE_TOOLS_VARIABLE}=1 requires them")
        pytest.skip(missing)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    env["GATEWAY_FEEDBACK__STORE"] = ""  # off: not what this test is about
    process = subprocess.Popen(
        [sys.executable, "scripts/run.py", "--port", "0", "--mock-base-port", "0", "--with-models"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        give_up = time.monotonic() + 120
        while not any(line.startswith("Ctrl-C stops everything") for line in lines):
            assert time.monotonic() < give_up, "".join(lines)
            line = process.stdout.readline()
            assert line, "run.py ended before it was ready:\n" + "".join(lines)
            lines.append(line)
        ready = next(line for line in lines if line.startswith("Ready: "))
        assert (
            "als-v1" in ready and "(KServe V1)" in ready and "(MLServer, Open Inference)" in ready
        )
        gateway_port, *others = (int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", ready))
        response = requests.post(
            f"http://127.0.0.1:{gateway_port}/recommendation",
            json={"user_id": "test-3", "resultSize": 3},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        sources = response.json()["sources"]
        assert list(sources) == ["sml", "asc", "trd", "psn", "als-v1", "als-v2"]
        assert {s["status"] for s in sources.values()} == {"ok"}

        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    assert process.returncode == 0, output
    assert "Traceback" not in "".join(lines) + output
    assert not any(port_is_open(port) for port in [gateway_port, *others])

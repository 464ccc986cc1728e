"""Scale-out behind nginx (`benchmarks.scaleout`): two gateways, one killed mid-load.

A short run through the benchmark's own functions, at low concurrency, against the real nginx:
what is lost when an instance is killed, with nginx's default retries and with
`non_idempotent`; that every 200 is the right answer and the survivor answers everything sent
once nginx knows; that nginx and both gunicorns stop and leave nothing behind. Counts, never
speed; the accounting itself (`summarize`, the checks, the report) is tested on made-up
exchanges.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.scaleout.failover import Exchange, Load, summarize
from benchmarks.scaleout.report import markdown, plot
from benchmarks.scaleout.run import ScaleoutPlan, checks, run_scenario
from mock_recommenders import MockFleetProcess
from tests.tools import require_tool

A, B = "127.0.0.1:1001", "127.0.0.1:1002"


def plan() -> ScaleoutPlan:
    """Three seconds of load at 8 connections, the kill at one; a deadline no busy machine
    reaches, and admission fixed (as `tests.helpers.settings_for` explains)."""
    return ScaleoutPlan(
        connections=8,
        duration_s=3.0,
        stop_after_s=1.0,
        settle_s=1.0,
        users=16,
        settings={"deadline_ms": "20000", "admission__adaptive": "false"},
    )


def run(name: str, fleet: MockFleetProcess, tmp_path: Path) -> dict[str, Any]:
    nginx = require_tool("nginx")
    fleet.set_behaviour(delay_ms=20)  # requests stay in flight long enough to be caught
    return run_scenario(name, plan(), nginx, fleet, tmp_path)


def assert_served_right_and_stopped_cleanly(result: dict[str, Any]) -> None:
    assert result["wrong"] == 0  # every 200 was the reference answer
    # Once nginx knows, the survivor answers everything, and answers it right.
    assert result["late_sent"] > 0
    assert result["late_not_right"] == 0
    assert result["nginx_exit_code"] == 0
    assert result["leftover_processes"] == []


@pytest.mark.slow
def test_with_non_idempotent_no_request_is_lost_when_an_instance_is_killed(
    fleet_process: MockFleetProcess, tmp_path: Path
) -> None:
    result = run("kill-retry", fleet_process, tmp_path)

    assert result["retry"] == "error timeout non_idempotent"
    assert result["statuses"] == {"200": result["sent"]}
    assert result["lost"] == 0
    # nginx did try the killed instance and took the request to the survivor.
    assert result["retried_in_all"] >= 1
    assert_served_right_and_stopped_cleanly(result)


@pytest.mark.slow
def test_with_nginx_defaults_only_requests_the_killed_instance_held_are_lost(
    fleet_process: MockFleetProcess, tmp_path: Path
) -> None:
    result = run("kill", fleet_process, tmp_path)

    assert result["retry"] == "error timeout"
    assert result["in_flight_on_stopped"] > 0  # the kill caught requests in flight
    assert result["lost"] <= result["in_flight_on_stopped"]
    assert result["lost_elsewhere"] == 0
    assert set(result["statuses"]) <= {"200", "502"}  # nginx answers 502 for what it lost
    assert all(d["tried"] == [result["stopped"]] for d in result["lost_detail"])
    assert_served_right_and_stopped_cleanly(result)
    assert "proxy_next_upstream error timeout;" in (tmp_path / "kill" / "nginx.conf").read_text()


def exchange(started: float, ended: float, status: str = "200", *tried: str) -> Exchange:
    return Exchange(started, ended, status, tried or (B,), status == "200")


def test_what_the_stopped_instance_held_is_told_from_what_was_lost_elsewhere(
    tmp_path: Path,
) -> None:
    load = Load(
        exchanges=[
            exchange(0.6, 0.9, "200", A),  # answered by A before the kill
            exchange(0.9, 1.1, "502", A),  # held by A at the kill: lost
            exchange(1.02, 1.1, "502", A),  # passed to A as it died: lost
            exchange(0.95, 1.2, "200", A, B),  # held by A, retried on B
            exchange(1.2, 1.3, "200", A, B),  # refused by A after it died, retried
            exchange(1.5, 1.6, "503", B),  # shed by the survivor: lost, not to the kill
            exchange(2.1, 2.2),
            exchange(2.2, 2.3),
            Exchange(2.3, 2.4, "200", (B,), correct=False),  # a wrong answer
        ],
        stopped_at=1.0,
        exited_at=1.05,
        cpu=[(0.5, {"gateways": 1.0}), (1.0, {"gateways": 1.5}), (2.0, {"gateways": 2.0})]
        + [(3.0, {"gateways": 2.5})],
    )
    found = summarize(load, A, settle_s=1.0, duration_s=3.0)

    assert found["statuses"] == {"200": 6, "502": 2, "503": 1}
    assert (found["lost"], found["lost_elsewhere"], found["wrong"]) == (3, 1, 1)
    assert found["in_flight_at_stop"] == 2
    assert found["in_flight_on_stopped"] == 3
    assert (found["lost_of_those"], found["retried_of_those"], found["retried_in_all"]) == (2, 1, 2)
    assert (found["late_sent"], found["late_not_right"]) == (3, 1)
    assert found["before"]["ok_rps"] == 2.0  # one 200 in half a second
    assert found["cpu_cores"] == {"before": {"gateways": 1.0}, "after": {"gateways": 0.5}}
    assert found["exited_after_ms"] == 50.0

    result = {
        "scenario": "kill",
        "stop": "kill",
        "retry": "error timeout",
        "stopped": A,
        "survivor": B,
        **found,
        "nginx_exit_code": 0,
        "nginx_complaints": {"upstream prematurely closed connection": 2},
        "leftover_processes": [],
    }
    results: dict[str, Any] = {
        "plan": plan().__dict__,
        "nginx_version": "nginx/1.22.1",
        "started": "now",
        "scenarios": [result],
    }
    results["checks"] = checks(results)
    met = {c["figure"]: c["met"] for c in results["checks"]}
    # Lost on the survivor, and a wrong answer: both fail their checks.
    assert met["kill: lost, against the requests the killed instance held"] is False
    assert met["kill: 200s that are not the reference answer"] is False
    assert met["kill: nginx's exit code; processes left over"] is True
    report = markdown(results)
    assert "| kill | `error timeout` | 9 | 6 x 200, 2 x 502, 1 x 503 | **3** | 2 | 3 |" in report
    plot(results, tmp_path / "scaleout.png")
    assert (tmp_path / "scaleout.png").stat().st_size > 10_000

"""The overload benchmark's parts: its load generator, its lean client, its report.

The load is counted, never timed: `run_by_status` against a scripted `send`, the lean client
against the gateway served in-process, the report and the plot from a made-up run.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

from benchmarks.loadgen import run_by_status
from benchmarks.overload import OverloadPlan, goals, markdown, plot
from benchmarks.rawhttp import RawPool
from gateway import create_app
from mock_recommenders import DEFAULT_NAMES, MockFleet
from tests.helpers import Serve, settings_for


def test_answers_are_counted_by_status_and_retry_after_is_waited() -> None:
    sent: list[int] = []

    async def send(sequence: int) -> tuple[int, float]:
        sent.append(sequence)
        await asyncio.sleep(0.001)
        if sequence % 2:
            return 503, 60.0  # come back in a minute: past the end of the run
        if sequence % 5 == 0:
            raise ConnectionError("reset")
        return 200, 0.0

    result = asyncio.run(
        run_by_status(send, "closed", 4, duration_s=0.3, warmup_s=0.0, honour_retry_after=True)
    )

    # Each user's first odd sequence number got a 503 asking for a minute: it sent nothing after.
    by_user: dict[int, list[int]] = {}
    for sequence in sent:
        by_user.setdefault(sequence // 1_000_003, []).append(sequence)
    assert sorted(by_user) == [0, 1, 2, 3]
    for sequences in by_user.values():
        assert sequences[-1] % 2 == 1 and all(s % 2 == 0 for s in sequences[:-1])
    assert set(result.statuses) <= {"200", "503", "ConnectionError"}
    assert result.statuses["503"] == 4
    assert result.first_error == "ConnectionError: reset"
    assert result.goodput_rps == round(result.statuses["200"] / 0.3, 1)


def test_an_open_loop_sends_on_schedule_whatever_the_answers() -> None:
    async def send(sequence: int) -> tuple[int, float]:
        await asyncio.sleep(0.05)  # slower than the arrivals: they pile up, as users do
        return 200, 0.0

    result = asyncio.run(run_by_status(send, "open", 200, duration_s=0.5, warmup_s=0.0))

    # About 100 arrivals in half a second, most answered within it; one client waiting for
    # each answer before the next would have sent 10.
    assert 20 <= result.statuses["200"] <= 110
    assert result.ok_p50_ms >= 50


def test_the_lean_client_reads_statuses_and_retry_after_from_the_gateway(
    fleet: MockFleet, serve: Serve
) -> None:
    url = serve(create_app(settings_for(fleet, max_in_flight=1)))
    port = int(url.rsplit(":", 1)[1])
    fleet.set_behaviour(hang=True)

    async def run() -> list[tuple[int, float]]:
        async with RawPool("127.0.0.1", port, timeout_s=30) as pool:
            held = asyncio.ensure_future(pool.post("/recommendation", b"{}"))
            while sum(fleet.stats(n)["hangs"] for n in DEFAULT_NAMES) < 4:  # noqa: ASYNC110 - the mocks count in another thread
                await asyncio.sleep(0.01)
            shed = [await pool.post("/recommendation", b"{}") for _ in range(3)]
            await asyncio.to_thread(fleet.set_behaviour, hang=False)
            served = await held
            return [*shed, served, await pool.post("/recommendation", b"[")]

    answers = asyncio.run(run())
    assert answers == [(503, 1.0)] * 3 + [(200, 0.0), (400, 0.0)]


def phase(mode: str, load: float, honour: bool, statuses: dict[str, int]) -> dict[str, Any]:
    calls = {o: 0.0 for o in ("ok", "timeout", "error", "circuit_open", "shed")}
    return {
        "mode": mode,
        "load": load,
        "honour_retry_after": honour,
        "duration_s": 10.0,
        "statuses": statuses,
        "goodput_rps": statuses.get("200", 0) / 10,
        "shed_rps": statuses.get("503", 0) / 10,
        "ok_p50_ms": 90.0,
        "ok_p99_ms": 150.0,
        "shed_p50_ms": 5.0,
        "shed_p99_ms": 40.0 if honour else 120.0,
        "shed_max_ms": 45.0 if honour else 150.0,
        "gateway_cpu_s": 20.0,
        "reported": {
            "calls": {n: dict(calls) for n in DEFAULT_NAMES},
            "excused_timeouts": {n: 0.0 for n in DEFAULT_NAMES},
            "breaker_open_now": {n: 0.0 for n in DEFAULT_NAMES},
            "mean_loop_lag_ms": math.nan,
            "concurrency_limit_now": 64.0,
        },
    }


def test_the_report_holds_the_figures_against_their_goals(tmp_path: Path) -> None:
    phases = [
        phase("closed", 64, False, {"200": 6000}),
        phase("closed", 1000, True, {"200": 5000, "503": 8000}),
        phase("closed", 1000, False, {"200": 2000, "503": 60000, "ConnectionError": 3}),
        phase("open", 400, False, {"200": 4000}),
        phase("open", 1600, False, {"200": 5000, "503": 11000}),
    ]
    phases[2]["reported"]["calls"]["asc"]["circuit_open"] = 2.0
    results: dict[str, Any] = {"started": "now", "plan": OverloadPlan().__dict__, "phases": phases}
    results["goals"] = goals(phases, OverloadPlan())

    met = {g["figure"]: g["met"] for g in results["goals"]}
    assert met["goodput at 1000 connections honouring Retry-After, vs at 64"] is True  # 0.83
    assert met["goodput at 1000 connections retrying at once, vs at 64"] is False  # 0.33
    assert met["answers other than 200 at 1000 connections retrying at once"] is False
    assert met["503 latency at 1000 connections honouring Retry-After, p99 / max"] is True
    assert met["calls refused by an open breaker of a healthy recommender, all phases"] is False

    report = markdown(results)
    assert "| 1000 connections, honouring Retry-After | 500.0 | 800.0 | 0 |" in report
    assert "3 x ConnectionError" in report
    plot(results, tmp_path / "overload.png")
    assert (tmp_path / "overload.png").stat().st_size > 10_000

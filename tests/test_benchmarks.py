"""The benchmark harness runs end to end (`--quick`) and writes every output it promises.

Speed is not asserted here; the harness measures it. These tests check behaviour: every
target and level is measured without errors, and the figures are derived and written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.loadgen import percentile
from benchmarks.report import derive, figures
from tests.conftest import ROOT


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.95) == 7.0


def test_derived_ratios() -> None:
    def row(target: str, rps: float, p50: float) -> dict[str, object]:
        return {
            "target": target,
            "concurrency": 1,
            "recommenders": 4,
            "throughput_rps": rps,
            "p50_ms": p50,
            "errors": 0,
        }

    results = {
        "plan": {"recommenders": 4, "levels": [1]},
        "runs": [row("floor", 46.0, 21.5), row("sync", 11.0, 86.0), row("async", 44.0, 22.4)],
        "widths": [],
        "memory_mb": {"async@4": [51.0, 50.2]},
    }
    derive(results)

    async_row = results["runs"][2]
    assert async_row["speedup_vs_sync"] == 4.0
    assert async_row["throughput_vs_floor"] == 0.96
    assert async_row["p50_over_floor_ms"] == 0.9
    found = {label: (measured, met) for label, measured, _, met in figures(results)}
    assert found["p50 over the floor at concurrency 1"] == ("0.90 ms", True)
    assert found["speed-up over sync at concurrency 1, 4 recommenders"] == ("4.00x", True)
    assert found["resident memory per worker after the run"] == ("51.0 MB", True)


@pytest.mark.timeout(180)
def test_quick_run_writes_the_table_json_report_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert "speed-up over sync at concurrency 1" in done.stdout
    for name in ("results.json", "report.md", "latency.png", "throughput.png", "fanout.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    measured = {(r["target"], r["concurrency"]) for r in results["runs"]}
    assert measured == {
        (target, level)
        for target in ("floor", "sync", "threads", "async", "per-call-session")
        for level in (1, 8)
    }
    for run in results["runs"] + results["widths"]:
        assert run["errors"] == 0, run
        assert run["requests"] > 0
        assert run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
    assert {r["recommenders"] for r in results["widths"]} == {1, 4}
    assert len(results["memory_mb"]["async@4"]) >= 1
    assert "| async | 1 |" in (out / "report.md").read_text()

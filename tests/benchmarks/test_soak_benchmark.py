"""The soak benchmark (`benchmarks.soak`): its verdict by hand, and a few seconds of it end to end.

The verdict, the thinning and the checks are tested on made-up samples. The end-to-end runs
(SQLite, and Redis where redis-server is installed) last a few seconds with a sample a second:
they check what was counted and written, never how fast, nor whether memory was flat so soon.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.soak.report import (
    FLAT_MB,
    FLAT_PER_S,
    allowed_growth,
    checks,
    fitted_growth,
    thin,
    worker_summary,
)
from tests.helpers import ROOT
from tests.tools import require_tool

VERDICTS = {"flat after warm-up", "still growing", "too few samples"}


def sample(
    t_s: float, rss: dict[str, float], cpu: dict[str, float] | None = None, **counts: dict[str, int]
) -> dict[str, Any]:
    return {
        "t_s": t_s,
        "rss_mb": rss,
        "cpu_s": {pid: t_s / 10 for pid in rss} if cpu is None else cpu,
        "recommendations": counts.get("recommendations", {"200": 10}),
        "feedback": counts.get("feedback", {"202": 3}),
        "experiments": counts.get("experiments", {}),
        "store_bytes": 1000,
        "store_files": {"feedback.db": 1000},
    }


def test_fitted_growth_is_the_least_squares_line_over_the_span() -> None:
    assert fitted_growth([(0, 10.0), (10, 12.0), (20, 14.0)]) == pytest.approx(4.0)
    # One high sample in the middle tilts the line not at all.
    assert fitted_growth([(0, 10.0), (10, 13.0), (20, 10.0)]) == pytest.approx(0.0)
    assert fitted_growth([(0, 10.0), (10, 9.0)]) == pytest.approx(-1.0)
    assert fitted_growth([(5, 10.0)]) is None
    assert fitted_growth([(5, 10.0), (5, 11.0)]) is None


def test_a_worker_that_grows_only_in_the_first_half_is_flat_after_warm_up() -> None:
    # Half an hour sampled every 5 minutes: "1" warms up from 60 to 70 MB, then wanders within
    # a megabyte; "2" grows steadily, 3 MB in the second half.
    warm = [60, 65, 70, 70.5, 69.8, 70.6, 70.2]
    leaky = [60, 61, 62, 63, 64, 65, 66]
    samples = [sample(300.0 * i, {"1": warm[i], "2": leaky[i]}) for i in range(len(warm))]

    first, second = worker_summary(samples)

    assert (first["pid"], first["verdict"]) == ("1", "flat after warm-up")
    assert (first["start_mb"], first["half_mb"], first["half_t_s"], first["end_mb"]) == (
        60,
        70.5,
        900.0,
        70.2,
    )
    assert first["first_half_growth_mb"] > 9
    assert first["allowed_growth_mb"] == FLAT_MB  # a 15-minute half, 3% of 70.5 MB above it
    assert abs(first["second_half_growth_mb"]) < FLAT_MB
    assert first["second_half_range_mb"] == [69.8, 70.6]
    assert second["verdict"] == "still growing"
    assert second["second_half_growth_mb"] == pytest.approx(3.0)
    assert (first["cpu_s"], first["cpu_share"]) == (180.0, 0.5)
    assert [c["met"] for c in checks({"workers": [first, second], "samples": samples})] == [
        True,  # 1 flat
        False,  # 2 still growing
        True,  # 1's share of the CPU
        True,  # 2's
        True,  # every /feedback 202
        True,  # every request answered
    ]


def test_a_worker_that_did_little_of_the_work_fails_its_check() -> None:
    cpu = [{"1": 0.0, "2": 0.0}, {"1": 10.0, "2": 1.5}, {"1": 20.0, "2": 2.0}]
    samples = [sample(10.0 * i, {"1": 60, "2": 60}, cpu[i]) for i in range(3)]

    busy, idle = worker_summary(samples)

    assert (busy["cpu_s"], idle["cpu_s"]) == (20.0, 2.0)
    assert idle["cpu_share"] == pytest.approx(2 / 22, abs=1e-3)
    shares = [
        c for c in checks({"workers": [busy, idle], "samples": samples}) if "CPU" in c["figure"]
    ]
    assert [(c["met"], c["goal"]) for c in shares] == [
        (True, "at least 12%"),
        (False, "at least 12%"),
    ]


def test_growth_under_2_mb_but_over_3_percent_is_still_growing() -> None:
    small = [20, 20, 20, 20, 20.5, 21.0, 21.5]  # +1.5 MB of 20 in 15 minutes: 7.5%
    samples = [sample(300.0 * i, {"7": small[i]}) for i in range(len(small))]

    (worker,) = worker_summary(samples)

    assert worker["second_half_growth_mb"] < FLAT_MB
    assert worker["allowed_growth_mb"] == pytest.approx(0.6)
    assert worker["verdict"] == "still growing"


def test_what_a_worker_may_grow_is_scaled_to_the_length_of_the_half() -> None:
    # +0.9 MB in the second half: flat over 15 minutes, a leak over one.
    rss = [63.0, 67.0, 69.0, 69.3, 69.6, 69.9]

    for spacing, verdict in ((300.0, "flat after warm-up"), (20.0, "still growing")):
        samples = [sample(spacing * i, {"1": mb}) for i, mb in enumerate(rss)]
        (worker,) = worker_summary(samples)
        assert worker["second_half_growth_mb"] == pytest.approx(0.9)
        assert worker["verdict"] == verdict
    assert allowed_growth(70.0, FLAT_PER_S) == FLAT_MB
    assert allowed_growth(70.0, 60.0) == pytest.approx(FLAT_MB / 15)
    assert allowed_growth(50.0, FLAT_PER_S) == pytest.approx(1.5)


def test_a_worker_missing_from_part_of_the_run_gets_no_verdict_of_flat() -> None:
    samples = [sample(0, {"1": 60}), sample(10, {"1": 60}), sample(20, {"1": 60, "9": 50})]
    samples.append(sample(30, {"1": 60, "9": 50}))

    steady, replacement = worker_summary(samples)

    assert steady["verdict"] == "flat after warm-up"
    assert replacement["verdict"] == "not there the whole run (replaced?)"


def test_the_checks_count_feedback_not_202_and_requests_that_got_no_answer() -> None:
    last = sample(
        10,
        {"1": 60},
        recommendations={"200": 90, "503": 2, "ServerDisconnectedError": 1},
        feedback={"202": 30, "503": 1},
        experiments={"200": 1},
    )
    results = {"workers": worker_summary([sample(0, {"1": 60}), last]), "samples": [last]}
    assert results["workers"][0]["cpu_share"] == 1.0

    found = {c["figure"]: c for c in checks(results)}

    feedback = found["/feedback answers other than 202"]
    assert (feedback["measured"], feedback["met"]) == ("1 of 31 (503: 1)", False)
    unanswered = found["requests that got no answer (/recommendation, /experiments)"]
    assert (unanswered["measured"], unanswered["met"]) == ("1, 0", False)


def test_thinning_keeps_about_14_rows_with_the_first_and_the_last() -> None:
    samples = [sample(30.0 * i, {}) for i in range(61)]  # 30 minutes, a sample every 30 s

    shown = thin(samples)

    assert [s["t_s"] for s in shown] == [150.0 * i for i in range(13)]
    assert len(thin(samples[:13])) == 13
    uneven = thin(samples[:50])
    assert 12 <= len(uneven) <= 15 and uneven[0] is samples[0] and uneven[-1] is samples[49]


def soak(out: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run ``python -m benchmarks soak`` for 6 s, a sample a second; its process and soak.json."""
    command = [sys.executable, "-m", "benchmarks", "soak", "--minutes", "0.1", "--sample-s", "1"]
    command += ["--out", str(out), "--work", str(out / "work"), *flags]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert (out / "soak.json").exists(), done.stderr[-3000:]
    return done, json.loads((out / "soak.json").read_text())


def assert_counted_and_written(
    done: subprocess.CompletedProcess[str], results: dict[str, Any], out: Path
) -> None:
    # Exit 1 only for a check not met (a worker may well still grow 6 s in).
    met = all(check["met"] for check in results["checks"])
    assert done.returncode == (0 if met else 1), done.stderr[-3000:]
    samples = results["samples"]
    assert len(samples) >= 4  # one before the load, then one a second
    assert samples[0]["t_s"] == 0 and sum(samples[0]["recommendations"].values()) == 0
    assert [s["t_s"] for s in samples] == sorted(s["t_s"] for s in samples)
    pids = {w["pid"] for w in results["workers"]}
    assert len(pids) == 2  # --workers 2: each by its pid, not summed
    for s in samples:
        assert set(s["rss_mb"]) == pids and all(mb > 0 for mb in s["rss_mb"].values())
        assert set(s["cpu_s"]) == pids
        assert s["store_bytes"] == sum(s["store_files"].values())
    last = samples[-1]
    assert last["recommendations"].get("200", 0) > 0
    # Every click was answered 202: counted for the gateway's experiment, none refused.
    assert set(last["feedback"]) == {"202"} and last["feedback"]["202"] > 0
    assert last["store_bytes"] > 0
    # The counts only grow.
    for before, after in itertools.pairwise(samples):
        for endpoint in ("recommendations", "feedback"):
            assert sum(after[endpoint].values()) >= sum(before[endpoint].values())
    for worker in results["workers"]:
        assert worker["verdict"] in VERDICTS
    assert sum(w["cpu_share"] for w in results["workers"]) == pytest.approx(1.0, abs=0.01)
    report = (out / "soak.md").read_text()
    for worker in results["workers"]:
        assert f"Worker {worker['pid']}: {worker['verdict']}." in report
    assert f"- POST /feedback: {last['feedback']['202']:,} (202: " in report
    table = report.split("## Samples", 1)[1].split("| check |", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and ":" in line[:8]]
    assert len(rows) == len(thin(samples))
    assert "| /feedback answers other than 202 | 0 of " in report
    assert "Worker " in done.stdout  # the report is printed too


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_few_seconds_of_soak_on_sqlite_are_sampled_counted_and_written(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    done, results = soak(out)

    assert_counted_and_written(done, results, out)
    assert results["plan"]["store"] == "sqlite"
    assert "feedback.db" in results["samples"][-1]["store_files"]
    assert "feedback.db-wal" in results["samples"][-1]["store_files"]  # WAL mode


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_few_seconds_of_soak_on_redis_are_sampled_counted_and_written(tmp_path: Path) -> None:
    require_tool("redis-server")
    out = tmp_path / "soak"
    done, results = soak(out, "--store", "redis")

    assert_counted_and_written(done, results, out)
    assert results["plan"]["store"] == "redis"
    assert set(results["samples"][-1]["store_files"]) == {"used_memory"}

"""Tests of benchmarks/storage: bytes per impression in each store, and retention bounding them."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.storage.run import main
from tests.tools import require_tool


def test_the_storage_benchmark_measures_both_stores_and_a_retention_that_holds(
    tmp_path: Path,
) -> None:
    require_tool("redis-server")
    out = tmp_path / "out"

    code = main(
        ["--impressions", "400", "--retention-s", "600", "--rate", "2"]
        + ["--redis-retention-s", "2", "--redis-rate", "100", "--out", str(out)]
    )
    found = json.loads((out / "storage.json").read_text())
    report = (out / "storage.md").read_text()

    assert code == 0
    for ids in ("short", "uuid"):
        row = found["bytes"][ids]
        assert 0 < row["record"] < row["sqlite"] <= row["sqlite_file"]
        assert row["redis"] > 0
    # Longer item ids, longer records.
    assert found["bytes"]["uuid"]["record"] > found["bytes"]["short"]["record"]
    # SQLite: after one retention the live count stays at a retention's answers (within a
    # bucket), and the file stops growing: deleted rows' pages are used again.
    sqlite_run = found["retention_sqlite"]
    settled = [s for s in sqlite_run if s["retentions"] >= 1.2]
    assert settled
    assert all(abs(s["live"] - 2 * 600) <= 2 * 600 * 0.01 for s in settled)
    assert max(s["used_bytes"] for s in settled) <= 1.1 * settled[0]["used_bytes"]
    # Redis: its TTLs deleted what outlived the retention.
    redis_run = found["retention_redis"]
    fed = 100 * len(redis_run)
    assert redis_run[-1]["keys"] < 0.75 * fed
    assert "| answers a second | SQLite a day |" in report
    assert "## Retention in Redis" in report

"""The benchmark harness runs end to end (`--quick`) and writes every output it promises.

Speed is not asserted here; the harness measures it. These tests check behaviour: every
target and level is measured without errors, and the figures are derived and written.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.harness.loadgen import percentile
from benchmarks.quality.ranking_metrics import mean_ci, ndcg_at, paired_difference, recall_at
from benchmarks.quality.report import findings, markdown
from benchmarks.quality.run import parse_plan
from benchmarks.quality.scoring import comparisons, score, summarise
from benchmarks.quality.weights import fit_weights
from benchmarks.speed.features import costs as feature_costs
from benchmarks.speed.features import paired_costs
from benchmarks.speed.features import parse_plan as features_plan
from benchmarks.speed.report import derive, figures
from benchmarks.speed.tracing import costs as tracing_costs
from benchmarks.speed.tracing import markdown as tracing_markdown
from gateway.config.settings import DEFAULT_CONFIG_PATH, load_settings
from gateway.core.fusion import make_fusion, ranked_from
from mock_recommenders import DEFAULT_NAMES
from mock_recommenders.world import default_world
from model_servers.processes import missing_model_servers
from tests.helpers import ROOT
from tests.tools import REQUIRE_TOOLS_VARIABLE


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

    results: dict[str, Any] = {
        "plan": {"recommenders": 4, "levels": [1]},
        "runs": [row("floor", 46.0, 21.5), row("sequential", 11.0, 86.0), row("async", 44.0, 22.4)],
        "widths": [],
        "memory_mb": {"async@4": [51.0, 50.2]},
    }
    derive(results)

    async_row = results["runs"][2]
    assert async_row["speedup_vs_sequential"] == 4.0
    assert async_row["throughput_vs_floor"] == 0.96
    assert async_row["p50_over_floor_ms"] == 0.9
    found = {label: (measured, met) for label, measured, _, met in figures(results)}
    assert found["p50 over the floor at concurrency 1"] == ("0.90 ms", True)
    assert found["speed-up over sequential at concurrency 1, 4 recommenders"] == ("4.00x", True)
    assert found["resident memory per worker after the run"] == ("51.0 MB", True)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_small_run_writes_the_table_json_report_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    # The smallest run that still takes every path: each target at two levels, one worker,
    # and a width sweep beside the main four recommenders.
    small = ["--levels", "1,2", "--duration", "0.5", "--warmup", "0.2"]
    small += ["--widths", "1", "--workers", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", *small, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert "speed-up over sequential at concurrency 1" in done.stdout
    for name in ("results.json", "report.md", "latency.png", "throughput.png", "fanout.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    measured = {(r["target"], r["concurrency"]) for r in results["runs"]}
    assert measured == {
        (target, level)
        for target in (
            "floor",
            "sequential",
            "threads",
            "async-gthread",
            "async",
            "per-call-session",
        )
        for level in (1, 2)
    }
    for run in results["runs"] + results["widths"]:
        assert run["errors"] == 0, run
        assert run["requests"] > 0
        assert run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
    assert {r["recommenders"] for r in results["widths"]} == {1}
    assert {r["target"] for r in results["widths"]} == {"floor", "sequential", "async"}
    assert len(results["memory_mb"]["async@4"]) >= 1
    assert "| async | 1 |" in (out / "report.md").read_text()


# The quality benchmark


def test_ndcg_and_recall_against_hand_computed_values() -> None:
    truth = ["a", "b", "c"]  # graded gains 3, 2, 1
    # DCG = 2/log2(2) + 0 + 3/log2(4) = 3.5; ideal = 3 + 2/log2(3) + 1/2
    assert ndcg_at(["b", "x", "a"], truth, 3) == pytest.approx(3.5 / (3.5 + 2 / math.log2(3)))
    assert ndcg_at(truth, truth, 3) == pytest.approx(1.0)
    assert ndcg_at(["x", "y"], truth, 3) == 0.0
    assert ndcg_at(["c", "b", "a"], truth, 1) == pytest.approx(1 / 3)
    assert recall_at(["b", "x", "a"], truth, 2) == pytest.approx(1 / 3)
    assert recall_at(["b", "x", "a"], truth, 3) == pytest.approx(2 / 3)
    assert ndcg_at(["a"], [], 10) == recall_at(["a"], [], 10) == 0.0


def test_mean_ci_is_the_mean_with_a_normal_95_percent_half_width() -> None:
    mean, half_width = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    # stdev of 1..4 is sqrt(5/3); the half-width is 1.96 standard errors.
    assert half_width == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)
    assert mean_ci([0.7]) == (0.7, 0.0)


def test_paired_difference_is_per_user_with_win_and_loss_shares() -> None:
    fusion = [0.5, 0.4, 0.3, 0.2]
    single = [0.1, 0.4, 0.5, 0.1]  # differences +0.4, 0, -0.2, +0.1

    paired = paired_difference(fusion, single)

    assert paired["difference"] == pytest.approx(0.075)
    assert paired["ci95"] == round(mean_ci([0.4, 0.0, -0.2, 0.1])[1], 4)
    assert (paired["wins"], paired["losses"]) == (0.5, 0.25)
    with pytest.raises(ValueError):
        paired_difference([0.1, 0.2], [0.1])


def test_fitted_weights_rank_the_truth_where_equal_weights_do_not() -> None:
    def prediction(ids: list[str]) -> dict[str, object]:
        return {"items": [{"id": i, "score": 1.0 - n / 10} for n, i in enumerate(ids)]}

    users = []
    for n in range(20):
        truth = [f"t{n}-{r}" for r in range(3)]
        noise = [f"x{n}-{r}" for r in range(3)]
        lists = {
            # asc finds the truth in order; trd puts noise first and the truth reversed after it.
            "asc": prediction(truth),
            "trd": prediction(noise + truth[::-1]),
            "sml": prediction(noise),
            "psn": prediction(truth[1:] + noise),
        }
        users.append((lists, truth))

    def fused(weights: dict[str, float], lists: dict[str, dict[str, object]]) -> list[str]:
        ranked = [ranked_from(name, w, lists[name]) for name, w in weights.items() if w > 0]
        return [item.id for item in make_fusion("rrf").fuse(ranked, 3, seed="")]

    weights = fit_weights(users, k=3)

    assert max(weights.values()) == weights["asc"] == 1.0
    assert weights["sml"] < 1.0 and weights["trd"] < 1.0
    assert all(fused(weights, lists) == truth for lists, truth in users)
    assert not any(fused(dict.fromkeys(lists, 1.0), lists) == truth for lists, truth in users)


def test_quality_scores_only_users_every_system_answered_and_compares_them_paired() -> None:
    world = default_world()
    users = ["test-0", "test-1", "test-2"]

    def answer(user: str, fused: list[str], asc: list[str] | None = None) -> dict[str, Any]:
        lists = {name: ["x1", "x2"] for name in DEFAULT_NAMES}
        lists["sml"] = world.truth(user)[:10]
        lists["asc"] = asc or lists["asc"]
        result = [
            {"name": name, "prediction": {"items": [{"id": i} for i in ids]}}
            for name, ids in lists.items()
        ]
        return {"result": result, "fused": [{"id": i} for i in fused]}

    answers: dict[tuple[str, str], Any] = {}
    for user in users[:2]:
        answers[user, "rrf"] = answer(user, world.truth(user)[:10])
        answers[user, "concat"] = answer(user, ["x1"], asc=["x3"] if user == "test-1" else None)
    answers["test-2", "rrf"] = answer("test-2", ["x1"])  # no concat: test-2 is not scored

    scores, scored, inconsistent = score(
        users, answers, {}, world, ["rrf", "concat"], 10, recommenders=DEFAULT_NAMES
    )

    assert (scored, inconsistent) == (2, 1)  # test-1's two answers carry different asc lists
    assert list(scores) == [*DEFAULT_NAMES, "rrf", "concat", "oracle"]
    assert scores["sml"]["ndcg"] == scores["rrf"]["ndcg"] == [1.0, 1.0]
    assert scores["asc"]["ndcg"] == scores["concat"]["recall"] == [0.0, 0.0]
    rows = {row["system"]: row for row in summarise(scores, DEFAULT_NAMES)}
    assert [rows[s]["kind"] for s in ("sml", "rrf", "oracle")] == ["single", "fusion", "ceiling"]
    assert rows["sml"]["users"] == 2 and rows["sml"]["ndcg"] == 1.0
    found = comparisons(scores, DEFAULT_NAMES)
    assert found["best_single"] == "sml"
    assert list(found["fusions"]) == ["rrf", "concat"]
    assert found["fusions"]["rrf"]["ndcg"] == {
        "difference": 0.0, "ci95": 0.0, "wins": 0.0, "losses": 0.0
    }  # fmt: skip
    assert found["fusions"]["concat"]["ndcg"]["losses"] == 1.0


def test_quality_findings_give_each_fusion_a_verdict_from_its_interval() -> None:
    def paired(difference: float, ci: float) -> dict[str, dict[str, float]]:
        ndcg = {"difference": difference, "ci95": ci, "wins": 0.5, "losses": 0.25}
        return {"ndcg": ndcg, "recall": ndcg}

    def row(system: str, kind: str) -> dict[str, object]:
        return {
            "system": system, "kind": kind, "users": 40,
            "ndcg": 0.25, "ndcg_ci95": 0.01, "recall": 0.125, "recall_ci95": 0.02,
        }  # fmt: skip

    results = {
        "plan": {"k": 10, "window": None, "world_seed": 3},
        "users_asked": 50,
        "users_scored": 40,
        "inconsistent_lists": 2,
        "validation_users_used": 20,
        "fitted_weights": {"sml": 0.5, "asc": 1.0},
        "systems": [row("asc", "single"), row("rrf", "fusion")],
        "comparisons": {
            "best_single": "asc",
            "fusions": {
                "rrf": paired(0.02, 0.01),
                "combmnz": paired(-0.02, 0.01),
                "weighted": paired(0.005, 0.01),
            },
        },
    }

    lines = findings(results)

    assert lines == [
        "best single recommender by NDCG@10: asc",
        "rrf - asc: NDCG@10 +0.0200 ± 0.0100 (better; better for 50% of users, worse for 25%)",
        "combmnz - asc: NDCG@10 -0.0200 ± 0.0100 (worse; better for 50% of users, worse for 25%)",
        "weighted - asc: NDCG@10 +0.0050 ± 0.0100 (no significant difference; better for 50% "
        "of users, worse for 25%)",
        "weights fitted on 20 other users: sml 0.5, asc 1",
        "WARNING: 2 users got differing lists",
        "users scored: 40 of 50",
    ]
    report = markdown(results)
    assert report.startswith(
        "# Ranking quality: 40 users, world seed 3, fusing each recommender's top 10\n"
    )
    assert "| rrf | fusion | 0.250 ± 0.010 | 0.125 ± 0.020 |" in report
    assert all(f"- {line}" in report for line in lines)
    results["comparisons"] = {}
    assert findings(results) == ["no user was answered completely: nothing to compare"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quality_run_scores_every_system_and_writes_table_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "quality"
    command = [sys.executable, "-m", "benchmarks", "quality", "--users", "60"]
    command += ["--validation-users", "30", "--out", str(out)]
    command += ["--write-weights", str(tmp_path / "start.yaml")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=230)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "Ranking quality over 60 users, fusing each recommender's top 10" in done.stdout
    assert "best single recommender by NDCG@10" in done.stdout
    for name in ("quality.json", "quality.md", "quality.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "quality.json").read_text())
    assert results["users_scored"] == 60
    assert results["inconsistent_lists"] == 0
    assert results["validation_users_used"] == 30
    systems = {row["system"]: row for row in results["systems"]}
    assert list(systems) == [
        "sml", "asc", "trd", "psn",
        "concat", "rrf", "weighted", "combmnz", "interleave",
        "rrf, fitted weights", "oracle",
    ]  # fmt: skip
    assert all(row["users"] == 60 for row in systems.values())
    for name, row in systems.items():
        assert 0 < row["ndcg"] <= systems["oracle"]["ndcg"], name
        assert 0 < row["recall"] <= 1
    # concat of equal-length lists in config order is the first recommender's list.
    assert systems["concat"]["ndcg"] == systems["sml"]["ndcg"]
    assert set(results["fitted_weights"]) == set(DEFAULT_NAMES)
    # The fitted weights, written where the learner starts, load into the shipped config, in
    # the same ratios (scaled so the smallest is at least the learner's floor).
    written = yaml.safe_load((tmp_path / "start.yaml").read_text())
    config = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    config.setdefault("feedback", {}).setdefault("learner", {}).update(
        written["feedback"]["learner"]
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    start = load_settings(tmp_path / "config.yaml").feedback.learner.start_weights
    fitted = {n: w for n, w in results["fitted_weights"].items() if w > 0}
    assert start is not None and set(start) == set(DEFAULT_NAMES)
    top = max(fitted, key=lambda n: fitted[n])
    for name, weight in fitted.items():
        assert start[name] / start[top] == pytest.approx(weight / fitted[top], abs=0.01)
    assert set(results["comparisons"]["fusions"]) == {
        "concat", "rrf", "weighted", "combmnz", "interleave", "rrf, fitted weights"
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quality_with_the_model_servers_scores_and_fuses_the_als_model(tmp_path: Path) -> None:
    missing = missing_model_servers()
    if missing is not None:
        if os.environ.get(REQUIRE_TOOLS_VARIABLE) == "1":
            pytest.fail(f"{missing}, and {REQUIRE_TOOLS_VARIABLE}=1 requires them")
        pytest.skip(missing)
    out = tmp_path / "quality"
    command = [sys.executable, "-m", "benchmarks", "quality", "--model-servers"]
    command += ["--users", "40", "--validation-users", "20", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=110)

    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "quality.json").read_text())
    assert results["users_scored"] == 40
    assert results["inconsistent_lists"] == 0
    systems = {row["system"]: row for row in results["systems"]}
    singles = [name for name, row in systems.items() if row["kind"] == "single"]
    assert singles == [*DEFAULT_NAMES, "als", "als-v2"]
    for name in ("als", "als-v2"):
        assert 0 < systems[name]["ndcg"] <= systems["oracle"]["ndcg"], name
        assert systems[name]["users"] == 40
    # One model, two servers, two protocols: the same lists, the same scores.
    assert systems["als-v2"]["ndcg"] == systems["als"]["ndcg"]
    assert results["same_lists"]["als-v2"]["same"] == results["same_lists"]["als-v2"]["answers"]
    assert results["same_lists"]["als-v2"]["answers"] >= 40 * 6
    # als is fused (and weighed) like the mocks; als-v2 is a shadow, fused nowhere.
    fused = {r["name"]: not r["shadow"] for r in results["recommenders"]}
    assert fused == {**dict.fromkeys(DEFAULT_NAMES, True), "als": True, "als-v2": False}
    assert list(results["fitted_weights"]) == [*DEFAULT_NAMES, "als"]
    assert "als-v2 gave the same list as als in" in done.stdout
    assert "als (kserve-v1), als-v2 (open-inference, shadow: weight 0" in done.stdout


def test_quality_with_the_model_servers_says_how_to_build_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gone = ".venvs/kserve/bin/python missing: run `make model-servers`"
    monkeypatch.setattr("benchmarks.quality.run.missing_model_servers", lambda: gone)

    with pytest.raises(SystemExit) as exited:
        parse_plan(["--model-servers"])

    assert exited.value.code == 2
    assert f"--model-servers: {gone}" in capsys.readouterr().err
    assert parse_plan([])[0].model_servers is False  # without it, nothing is asked of them


def test_fitting_weighs_only_the_names_asked_and_a_shadow_stays_out() -> None:
    def prediction(ids: list[str]) -> dict[str, object]:
        return {"items": [{"id": i} for i in ids]}

    users = [
        ({"asc": prediction(["t", "x"]), "als": prediction(["t", "y"]),
          "als-v2": prediction(["t", "y"])}, ["t"])
    ]  # fmt: skip

    assert list(fit_weights(users, names=["asc", "als"])) == ["asc", "als"]
    assert list(fit_weights(users)) == ["asc", "als", "als-v2"]  # by default, every list


@pytest.mark.slow
def test_quality_refuses_an_unknown_fusion() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "quality", "--fusions", "rrf,borda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2
    assert "unknown fusions ['borda']" in done.stderr


def test_quality_plan_takes_a_fusion_window_from_k_to_100(
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan, _ = parse_plan(["--window", "50", "--fusions", "combmnz"])
    assert plan.window == 50
    # RRF is added back: the fitted weights are compared with it.
    assert plan.fusions == ["rrf", "combmnz"]

    for window in ("5", "101"):
        with pytest.raises(SystemExit):
            parse_plan(["--window", window])
        assert "--window must be from --k to 100" in capsys.readouterr().err


def test_tracing_costs_are_measured_against_tracing_off() -> None:
    def row(variant: str, rps: float, cpu: float) -> dict[str, Any]:
        return {
            "variant": variant,
            "concurrency": 64,
            "runs": 3,
            "throughput_rps": rps,
            "throughput_spread": 0.02,
            "p50_ms": 100.0,
            "gateway_cpu_ms": cpu,
            "mocks_cpu_ms": 1.0,
            "errors": 0,
        }

    rows = [
        row("tracing off", 500, 2.0),
        row("tracing 100%", 400, 2.5),
        row("tracing 1%", 500, 2.0),
    ]
    found = {c["variant"]: c for c in tracing_costs(rows)}

    assert found["tracing 100%"]["cpu_ms_per_request"] == 0.5
    assert found["tracing 100%"]["share_of_cpu"] == 0.25
    assert found["tracing 100%"]["throughput_given_up"] == 0.2
    assert found["tracing 1%"]["throughput_given_up"] == 0.0
    plan = {"repeats": 3, "duration_s": 10, "delay_ms": 20}
    results = {"plan": plan, "started": "now", "rows": rows, "spans_received": {}}
    report = tracing_markdown(results | {"costs": tracing_costs(rows)})
    assert "| tracing 100% | 64 | +0.500 | +25.0% | +20.0% |" in report


def test_the_features_ab_runs_the_variants_asked_and_costs_a_feature_switched_on() -> None:
    plan, _ = features_plan(["--variants", "all on, feedback on"])
    assert plan.variants == ["all on", "feedback on"]
    with pytest.raises(SystemExit):
        features_plan(["--variants", "all on,telepathy on"])
    rows = [
        {"variant": "all on", "concurrency": 64, "gateway_cpu_ms": 1.0, "throughput_rps": 100.0},
        {"variant": "feedback on", "concurrency": 64, "gateway_cpu_ms": 1.1, "throughput_rps": 90},
        {"variant": "metrics off", "concurrency": 64, "gateway_cpu_ms": 0.9, "throughput_rps": 110},
    ]

    by_feature = {cost["feature"]: cost for cost in feature_costs(rows)}

    assert by_feature["feedback"]["cpu_ms_per_request"] == pytest.approx(0.1)
    assert by_feature["feedback"]["throughput_given_up"] == pytest.approx(0.1)
    assert by_feature["metrics"]["cpu_ms_per_request"] == pytest.approx(0.1)


def test_the_features_ab_pairs_each_round_with_its_own_all_on_round() -> None:
    def run(rps: float, cpu: float) -> dict[str, Any]:
        return {"throughput_rps": rps, "cpu_ms_per_request": {"gateway": cpu, "mocks": 1.0}}

    # The machine slows in round 2: each round's pair still costs feedback 10% and 0.1 ms.
    samples = {
        ("all on", 64): [run(100, 1.0), run(50, 2.0), run(100, 1.0)],
        ("feedback on", 64): [run(90, 1.1), run(45, 2.1), run(90, 1.1)],
        ("metrics off", 64): [run(110, 0.9), run(55, 1.9), run(110, 0.9)],
    }

    paired = {pair["feature"]: pair for pair in paired_costs(samples)}

    assert paired["feedback"]["rounds"] == 3
    assert paired["feedback"]["throughput_given_up"] == pytest.approx(0.1)
    assert paired["feedback"]["throughput_given_up_ci95"] == pytest.approx(0, abs=1e-9)
    assert paired["feedback"]["cpu_ms_per_request"] == pytest.approx(0.1)
    # A feature switched off costs what "all on" takes over it.
    assert paired["metrics"]["throughput_given_up"] == pytest.approx(1 - 100 / 110, abs=1e-3)
    assert paired["metrics"]["cpu_ms_per_request"] == pytest.approx(0.1)


def test_the_impressions_benchmark_prints_both_sides_per_batch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks.speed.impressions import answers, main

    shown = answers(3)
    code = main(
        ["--batch", "2,3", "--prefill", "0", "--flushes", "2", "--gap-ms", "0", "--rounds", "2"]
    )
    lines = capsys.readouterr().out.splitlines()

    assert code == 0
    assert [line.split(",")[0] for line in lines] == ["batch 2", "batch 3"]
    assert all("loop " in line and "writer " in line for line in lines)
    assert [len(answer.items) for answer in shown] == [10, 10, 10]
    assert all(1 <= len(item["sources"]) <= 4 for item in shown[0].items)


@pytest.mark.slow
def test_the_clients_benchmark_measures_every_client_and_writes_its_figures(
    tmp_path: Path,
) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "clients", "--calls", "40", "--runs", "1"]
        + ["--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 0, completed.stderr
    rows = json.loads((tmp_path / "clients.json").read_text())["rows"]
    assert [r["client"] for r in rows] == [
        "aiohttp-session",
        "aiohttp-per-call-session",
        "thread-sessions",
        "requests-session",
        "protocol-native",
        "protocol-kserve-v1",
        "protocol-open-inference",
    ]
    assert all(r["cpu_us_per_call"] > 0 and r["calls"] == 40 for r in rows)
    assert "| aiohttp-session |" in (tmp_path / "clients.md").read_text()

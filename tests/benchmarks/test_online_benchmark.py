"""The online benchmark: its statistics by hand, and a quick run end to end against the gateway.

The quick run plays both click models (position-based and cascade) and checks each one's figures.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.online.play import visits
from benchmarks.online.report import by_click_model
from benchmarks.online.run import parse_plan, upside_down
from benchmarks.online.stats import (
    ab_test,
    clustered_ratio,
    decided_after,
    hedge_weights,
    pair_of,
    power_needs,
    preference_decided,
    weight_distance,
)
from benchmarks.quality.weights import as_start_weights
from tests.helpers import ROOT


def test_ab_test_is_the_pooled_two_proportion_z_test() -> None:
    test = ab_test(60, 200, 40, 200)

    pooled = 100 / 400
    z = (0.3 - 0.2) / math.sqrt(pooled * (1 - pooled) * (2 / 200))
    assert test["z"] == round(z, 3) and test["z"] > 1.96
    assert test["difference"] == 0.1
    assert test["ci95"] == round(1.959964 * math.sqrt(0.3 * 0.7 / 200 + 0.2 * 0.8 / 200), 4)
    assert ab_test(0, 0, 5, 10)["z"] == 0.0
    assert ab_test(0, 10, 0, 10)["z"] == 0.0


def test_decided_after_wants_the_verdict_to_hold_to_the_end() -> None:
    impressions = [10, 20, 30, 40, 50]

    assert decided_after(impressions, [0, 1, 0, 1, 1]) == {"stayed": 40, "first": 20, "wrong": None}
    assert decided_after(impressions, [0, -1, 0, 0, 1]) == {"stayed": 50, "first": 50, "wrong": 20}
    assert decided_after(impressions, [0, 1, 1, 1, 0]) == {
        "stayed": None,
        "first": 20,
        "wrong": None,
    }
    with pytest.raises(ValueError, match="one verdict per check"):
        decided_after([1], [])


def test_pair_of_turns_the_gateways_pair_round() -> None:
    listed = {"a": "asc", "b": "psn", "wins": 7, "losses": 2, "ties": 5}
    snapshot = {"pairwise": [{**listed, "preference": 0.78, "low": 0.45, "high": 0.94}]}

    assert pair_of(snapshot, "asc", "psn")["wins"] == 7
    turned = pair_of(snapshot, "psn", "asc")
    assert (turned["wins"], turned["losses"], turned["ties"]) == (2, 7, 5)
    assert (turned["low"], turned["high"]) == pytest.approx((0.06, 0.55))
    assert turned["preference"] == pytest.approx(0.22)
    assert preference_decided(turned) == 0
    assert preference_decided({**turned, "high": 0.49}) == -1
    assert preference_decided(pair_of(snapshot, "asc", "sml")) == 0  # never compared


def test_weight_distance_compares_ratios_only() -> None:
    assert weight_distance({"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 0.5}) == 0.0
    assert weight_distance({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 0.0}) == 0.5


def test_the_clustered_ratio_counts_each_user_once_however_many_impressions() -> None:
    # Two users, one clicking all 9 of their impressions, one none of 1: ratio 0.9.
    ratio, error = clustered_ratio([9, 0], [9, 1]) or (0.0, 0.0)
    assert ratio == pytest.approx(0.9)
    # d_i = y_i - R n_i = (0.9, -0.9); se^2 = (0.81 + 0.81) / 10^2 * 2 / 1.
    assert error == pytest.approx(math.sqrt(1.62 / 100 * 2))
    # The same clicks as ten independent impressions: the binomial error, far smaller.
    ratio, alone = clustered_ratio([1] * 9 + [0], [1] * 10) or (0.0, 0.0)
    assert ratio == pytest.approx(0.9)
    assert alone == pytest.approx(math.sqrt(0.9 * 0.1 / 10 * 10 / 9))
    assert alone < error
    # Users without impressions change nothing but the small-sample factor's count.
    assert clustered_ratio([9, 0, 0], [9, 1, 0]) is not None
    assert clustered_ratio([1], [2]) is None and clustered_ratio([0, 0], [0, 0]) is None


def test_the_power_calculation_gives_the_impressions_for_80_percent_power() -> None:
    # An effect of 0.1 with error 0.05 at 400 impressions: z = 2; 80% power needs
    # (1.96 + 0.84) / 2 times the error, so (2.80 / 2)^2 times the impressions.
    needed = power_needs(0.1, 0.05, 400)
    assert needed == pytest.approx(400 * (2.801585 / 2) ** 2, rel=1e-5)
    assert power_needs(-0.1, 0.05, 400) == needed
    assert power_needs(0.0, 0.05, 400) is None and power_needs(0.1, 0.0, 400) is None


def test_visits_give_users_several_impressions_spread_over_the_run() -> None:
    schedule = visits("u", 2000, 5.0, seed=1)

    assert len(schedule) == len(set(schedule)) == 2000
    users = {user for user, _ in schedule}
    assert 2000 / len(users) == pytest.approx(5.0, rel=0.2)
    # Occasions count from 0 per user; a user's visits are spread, not back to back.
    first_half = {user for user, _ in schedule[:1000]}
    assert len(first_half & {user for user, _ in schedule[1000:]}) > 100
    assert schedule == visits("u", 2000, 5.0, seed=1) != visits("u", 2000, 5.0, seed=2)
    assert visits("u", 3, 1.0, seed=1) == [("u0", 0), ("u1", 0), ("u2", 0)]


def test_the_replayed_hedge_rule_runs_to_its_bounds_as_evidence_grows() -> None:
    pairwise: list[dict[str, Any]] = [
        {"a": "asc", "b": "psn", "wins": 150, "losses": 50, "ties": 99},
        {"a": "psn", "b": "trd", "wins": 50, "losses": 40, "ties": 10},
    ]
    weights = hedge_weights(pairwise, ["asc", "psn", "trd", "sml"], rate=0.005)

    # net wins: asc +100, psn -90, trd -10; w = exp(0.005 · net) within [0.1, 5].
    assert weights["asc"] == pytest.approx(math.exp(0.5), abs=1e-4)
    assert weights["psn"] == pytest.approx(math.exp(-0.45), abs=1e-4)
    assert weights["trd"] == pytest.approx(math.exp(-0.05), abs=1e-4)
    assert weights["sml"] == 1.0  # never compared
    # Ten times the evidence at the same margins: the exponents grow tenfold, to the bounds.
    tenfold = [
        {**pair, "wins": 10 * pair["wins"], "losses": 10 * pair["losses"]} for pair in pairwise
    ]
    grown = hedge_weights(tenfold, ["asc", "psn", "trd"], rate=0.005)
    assert grown == {"asc": 5.0, "psn": 0.1, "trd": pytest.approx(math.exp(-0.5), abs=1e-4)}


def test_the_click_model_is_chosen_on_the_command_line() -> None:
    plan, _ = parse_plan([])
    assert plan.click_models == ["pbm"] and plan.continue_after_click == 0.0
    plan, _ = parse_plan(["--click-model", "both", "--continue-after-click", "0.3"])
    assert plan.click_models == ["pbm", "cascade"] and plan.continue_after_click == 0.3
    assert parse_plan(["--click-model", "cascade"])[0].click_models == ["cascade"]
    with pytest.raises(SystemExit):
        parse_plan(["--click-model", "dbn"])
    with pytest.raises(SystemExit):
        parse_plan(["--continue-after-click", "2"])


def test_warm_start_exploration_and_learning_seeds_are_chosen_on_the_command_line() -> None:
    plan, _ = parse_plan([])
    assert (plan.warm_start, plan.explore, plan.learning_seeds) == ("fitted", "adaptive", [1])
    plan, _ = parse_plan(["--warm-start", "none", "--explore", "fixed", "--learning-seeds", "2,3"])
    assert (plan.warm_start, plan.explore, plan.learning_seeds) == ("none", "fixed", [2, 3])
    plan, _ = parse_plan(["--warm-start", "reversed"])
    assert plan.warm_start == "reversed"


def test_a_wrong_prior_is_the_fitted_weights_upside_down() -> None:
    fitted = {"sml": 0.5, "asc": 1.0, "trd": 0.0, "psn": 0.5}

    assert upside_down(fitted) == {"trd": 1.0, "psn": 0.5, "sml": 0.5, "asc": 0.0}
    with pytest.raises(SystemExit):
        parse_plan(["--learning-seeds", "a"])


def test_the_start_weights_keep_the_fitted_ratios_within_the_learners_bounds() -> None:
    start = as_start_weights({"sml": 0.0625, "asc": 1.0, "trd": 0.0, "psn": 0.25})

    assert start == {"sml": 0.1, "asc": 1.6, "trd": 0.1, "psn": 0.4}


def test_results_saved_before_click_models_read_as_the_position_based_models() -> None:
    saved = {"plan": {"k": 10}, "best": "asc", "sensitivity": [], "learning": {}}
    assert by_click_model(saved) == {"pbm": {**saved, "click_model": "pbm"}}
    now = {"plan": {"k": 10}, "click_models": {"cascade": {"sensitivity": [1]}}}
    assert by_click_model(now) == {
        "cascade": {"plan": {"k": 10}, "sensitivity": [1], "click_model": "cascade"}
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_quick_run_reports_what_the_gateway_counted(tmp_path: Path) -> None:
    """Both click models, one after the other (about 30 s unloaded; far less than the timeout)."""
    out = tmp_path / "online"
    command = [sys.executable, "-m", "benchmarks", "online", "--quick", "--click-model", "both"]
    done = subprocess.run(
        [*command, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=290
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert "[cascade] seed 1: asc > psn" in done.stdout
    for name in ("online.json", "online.md"):
        assert (out / name).stat().st_size > 0
    for model in ("pbm", "cascade"):
        for plot in ("sensitivity", "learning"):
            assert (out / f"online-{plot}-{model}.png").stat().st_size > 0
    results = json.loads((out / "online.json").read_text())
    assert list(results["click_models"]) == ["pbm", "cascade"]
    assert results["best"] == "asc" and results["runner_up"] == "psn"
    report = (out / "online.md").read_text()
    assert "## The click models side by side" in report
    for view in by_click_model(results).values():
        _check_one_click_model(view, report)

    cascade = by_click_model(results)["cascade"]
    # A cascade user stops at the first click: one click at most per impression, so an
    # interleaved impression is never a tie.
    (run,) = cascade["sensitivity"]
    for arm in run["sent"]["arms"].values():
        assert arm["clicks"] == arm["clicked_impressions"]
    assert run["series"][-1]["interleave"]["ties"] == 0
    # The same users, arms and interleavings as the position-based run: only clicks differ.
    (other,) = results["click_models"]["pbm"]["sensitivity"]
    assert run["users"] == other["users"]
    assert {arm: row["impressions"] for arm, row in run["sent"]["arms"].items()} == {
        arm: row["impressions"] for arm, row in other["sent"]["arms"].items()
    }


def _check_one_click_model(results: dict[str, Any], report: str) -> None:
    """One click model's figures: the gateway counted what was sent, the report shows them."""
    plan, model = results["plan"], results["click_model"]
    (run,) = results["sensitivity"]
    final = run["final"]
    # What the simulation sent is what the gateway counted: per arm, and in total.
    assert run["agree"] and run["gateway_arms"] == run["sent"]["arms"]
    assert set(run["sent"]["arms"]) == {"interleave", "ab-asc", "ab-psn"}
    assert run["sent"]["impressions"] == plan["sensitivity_impressions"]
    assert sum(arm["impressions"] for arm in final["arms"].values()) == run["sent"]["impressions"]
    assert final["events"]["click"] == run["sent"]["clicks"] > 0
    # Credit is shared out in full: to a click's team, or split between its sources.
    assert sum(row["credit"] for row in final["recommenders"].values()) == pytest.approx(
        1.0, abs=1e-5
    )
    assert final["impressions_stored"] == run["sent"]["impressions"]
    # The interleaving arm interleaves the two compared alone: one pair, no other team.
    assert [(p["a"], p["b"]) for p in final["pairwise"]] in ([], [("asc", "psn")])
    assert {name for name, row in final["recommenders"].items() if row["impressions"]} <= {
        "asc",
        "psn",
    }
    # Its teams, drawn again from the request ids, are the gateway's: same lists, same counts.
    replayed = run["teams_replayed"]
    assert (
        replayed["exact"] == replayed["interleaved"] == final["arms"]["interleave"]["impressions"]
    )
    assert replayed["agree"]
    # Users come back: fewer users than impressions, each counted once in the tests.
    assert run["users"]["interleave"] + run["users"]["ab"] < run["sent"]["impressions"]
    # The series is read from /experiments after every round, the last one at the end.
    assert run["series"][-1]["after"] == plan["sensitivity_impressions"]
    last = run["series"][-1]
    assert last["interleave"]["impressions"] == final["arms"]["interleave"]["impressions"]
    assert last["ab"]["impressions"] == (
        final["arms"]["ab-asc"]["impressions"] + final["arms"]["ab-psn"]["impressions"]
    )
    assert last["gateway"]["ab"]["impressions"] == last["ab"]["impressions"]
    # Every A/B arm fuses with RRF, its weights keeping one list alone.
    for name in ("asc", "psn"):
        assert final["arms"][f"ab-{name}"]["fusion"] == "rrf"

    learning = results["learning"]
    assert learning["agree"] and set(learning["sent"]["arms"]) == {"interleave", "learned"}
    assert learning["final"]["events"]["click"] == learning["sent"]["clicks"]
    assert learning["weights"][-1]["in_use"] == learning["final"]["weights"]["in_use"]
    assert learning["weights"][-1]["evidence"] == learning["final"]["weights"]["evidence"]
    windows = learning["windows"]
    assert (
        sum(row["impressions"] for row in windows)
        == learning["sent"]["arms"]["learned"]["impressions"]
    )
    section = report.split(f"## Click model: {model}")[1].split("## Click model:")[0]
    for heading in ("### Interleaving against A/B", "### Learnt weights", "### NDCG@10 of the"):
        assert heading in section
    assert all("hedge_vs_best" in row for row in windows) and "Hedge, replayed" in section
    assert f"online-sensitivity-{model}.png" in section and "summary" in results
    # What every arm served, against the best single recommender's list for the same users;
    # the learnt arm started from the offline-fitted weights, and explored less as it learnt.
    served = learning["served"]
    assert served["impressions"] == learning["sent"]["impressions"]
    assert "pairs" not in served  # pooled, then dropped from the JSON
    assert 0 < served["interleaved_share"] < 0.5
    assert "### What was served, every arm" in section
    fitted = results["fitted_weights"]
    start = learning["final"]["weights"]["initial"]
    top = max(fitted, key=lambda name: fitted[name])
    assert max(start, key=lambda name: start[name]) == top
    assert learning["final"]["weights"]["prior"]["from"] == "start_weights"
    assert results["learning_pooled"]["runs"] == 1

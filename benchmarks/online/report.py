"""The online benchmark's report (`benchmarks.online`): the findings, `online.md`, `online.json`.

Everything here reads the results `benchmarks.online.run.run_online` returns, as saved in
`online.json`; nothing runs or scores. The plots are drawn by `benchmarks.online.plots`.
Every figure is a click model's: `by_click_model` gives each model's results with what the
models share (the plan, the recommenders, the offline fit), and the report has a section per
model, with a table of the models side by side when there are several.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.online.plots import plot_learning, plot_sensitivity
from benchmarks.online.summary import TARGET_RATIO, sensitivity_summary

__all__ = ["by_click_model", "findings", "markdown", "write_all"]

TITLES = {"pbm": "pbm, position-based", "cascade": "cascade"}


def by_click_model(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each click model's results, with what all share and its name as ``click_model``.

    Results saved before there was a choice of click model are the position-based model's.
    """
    if "click_models" not in results:
        return {"pbm": {**results, "click_model": "pbm"}}
    shared = {key: value for key, value in results.items() if key != "click_models"}
    return {
        name: {**shared, **own, "click_model": name}
        for name, own in results["click_models"].items()
    }


def _n(value: int | None) -> str:
    return "never" if value is None else f"{value:,}"


def _pm(row: dict[str, Any], key: str = "ndcg", ci: str = "ci95") -> str:
    return f"{row[key]:.3f} ± {row[ci]:.3f}"


def _diff(paired: dict[str, Any]) -> str:
    return f"{paired['difference']:+.3f} ± {paired['ci95']:.3f}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.1f}x"


def _world(plan: dict[str, Any]) -> str:
    if plan["activity"] is None:
        return f"every user always engaged and seen once ({plan['world']})"
    a, b = plan["activity"]
    return (
        f"users differ ({plan['world']}): each engaged with an impression with a probability "
        f"drawn from Beta({a:g}, {b:g}), else clicking nothing; visits per user geometric, "
        f"mean {plan['visits_per_user']:g}"
    )


def _clicks(plan: dict[str, Any], name: str) -> str:
    """How an engaged user of click model `name` clicks."""
    attraction = (
        f"sigmoid({plan['slope']:g}·(z - {plan['threshold']:g})) of the user's standardised "
        "true utility z"
    )
    if name == "cascade":
        going_on = plan.get("continue_after_click", 0.0)
        after = (
            "stopping at the first click"
            if going_on == 0
            else f"going on after a click with probability {going_on:g}"
        )
        return (
            f"read from the top down, each item clicked with {attraction}, {after}, else on to "
            "the next, to the end of the list"
        )
    return (
        f"each item examined with probability 1/rank^{plan['eta']:g}, whatever is above it, "
        f"and clicked when examined with {attraction}"
    )


def findings(results: dict[str, Any]) -> list[str]:
    """The figures, one line each: what the click models share, then each model's own."""
    best, runner_up = results["best"], results["runner_up"]
    k = results["plan"]["k"]
    lines = [
        f"world: {_world(results['plan'])}",
        f"best single recommender by NDCG@{k} ({results['plan']['validation_users']} validation "
        f"users): {best} {_pm(results['recommenders'][0])}; runner-up {runner_up} "
        f"{_pm(results['recommenders'][1])}",
    ]
    models = by_click_model(results)
    for name, view in models.items():
        mark = f"[{name}] " if len(models) > 1 else ""
        lines += [mark + line for line in _model_findings(view)]
    return lines


def _model_findings(results: dict[str, Any]) -> list[str]:
    """One click model's figures, one line each."""
    best, runner_up = results["best"], results["runner_up"]
    k = results["plan"]["k"]
    name = results["click_model"]
    lines = [f"clicks ({_title(name)}): {_clicks(results['plan'], name)}"]
    for run in results["sensitivity"]:
        n_i, n_ab, needs = run["n_interleave"], run["n_ab"], run["needs"]
        last = run["series"][-1]
        pair, ab = last["interleave"], last["ab"]
        lines.append(
            f"seed {run['seed']}: {best} > {runner_up}, 95% sure (users as the unit) after "
            f"{_n(n_i['stayed'])} interleaved impressions (first {_n(n_i['first'])}), A/B after "
            f"{_n(n_ab['stayed'])} (first {_n(n_ab['first'])}): A/B needs {_x(run['ratio'])}; "
            f"80% power: interleaving {_n(needs.get('interleave'))}, A/B {_n(needs.get('ab'))}: "
            f"{_x(needs.get('ratio'))} (impressions as independent: "
            f"{_x(run['needs_per_impression'].get('ratio'))}); preference "
            f"{_share(pair.get('preference'))}, CTR {_share(ab.get('ctr_a'))} vs "
            f"{_share(ab.get('ctr_b'))}"
        )
    summary = sensitivity_summary(results)
    passage, power = summary["first_passage"], summary["power_calculation"]
    if passage["median"] is not None:
        marks = {None: "", "at least": ">", "at most": "<"}
        ratios = ", ".join(
            "-" if row["ratio"] is None else f"{marks[row['bound']]}{row['ratio']:.1f}x"
            for row in passage["with_bounds"]
        )
        lines.append(
            f"first passage over {summary['runs']} seeds: A/B / interleaving {ratios} (> or <: "
            f"a bound, the method never sure to the end of the run: A/B in "
            f"{passage['undecided']['ab']}, interleaving in "
            f"{passage['undecided']['interleave']}); median "
            f"{_qualifier(passage)}{passage['median']:.1f}x; target "
            f"n_I <= n_AB / {TARGET_RATIO:g} met in {passage['met']} of {summary['runs']}, "
            f"missed in {passage['short']}"
        )
    if power["median_ratio"] is not None:
        pooled = power["pooled"]
        lines.append(
            f"power calculation (80% power, alpha 0.05) over {summary['runs']} seeds: "
            f"interleaving median {_n(_round(power['interleave_median']))}, A/B median "
            f"{_n(_round(power['ab_median']))} impressions; ratio median "
            f"{power['median_ratio']:.1f}x ({power['low']:.1f}x-{power['high']:.1f}x); target "
            f"met in {power['met']} of {summary['runs']}; from the seeds' mean effect and "
            f"variance: interleaving {_n(pooled['interleave'])}, A/B {_n(pooled['ab'])}: "
            f"{_x(pooled['ratio'])}"
        )
    learning = results["learning"]
    if learning["weights"]:
        first, last_weights = learning["weights"][0], learning["weights"][-1]
        fitted = ", ".join(f"{n} {w:g}" for n, w in results["fitted_weights"].items())
        learnt = ", ".join(f"{n} {w:.2f}" for n, w in last_weights["normalised"].items())
        lines.append(
            f"learnt weights (largest 1) {learnt} after {last_weights['evidence']} comparisons; "
            f"offline-fitted {fitted}; distance {first['distance']} -> {last_weights['distance']}"
        )
    for row in learning["windows"]:
        lines.append(
            f"learnt arm, impressions {row['from']}-{row['to']}: NDCG@{k} "
            f"{_pm(row, 'fused_ndcg', 'fused_ci95')}, {best} {_pm(row, 'best_ndcg', 'best_ci95')}, "
            f"paired {_diff(row['vs_best'])}; Hedge, replayed {_diff(row['hedge_vs_best'])}"
        )
    for system, row in learning["offline"].items():
        lines.append(
            f"{system} on the learnt arm's impressions: {_pm(row)}, vs {best} "
            f"{_diff(row['vs_best'])}"
        )
    lines += _served_lines(learning, results.get("learning_pooled"), best)
    agree = all(run["agree"] for run in results["sensitivity"]) and learning["agree"]
    lines.append(
        "the gateway's /experiments counted exactly the impressions and clicks sent, per arm"
        if agree
        else "MISMATCH between what was sent and what /experiments counted (see online.json)"
    )
    replayed = [run["teams_replayed"] for run in results["sensitivity"]]
    lines.append(
        "every interleaving drawn again exactly, its outcomes the gateway's pairwise counters"
        if all(r["exact"] == r["interleaved"] and r["agree"] for r in replayed)
        else f"interleavings drawn again: {replayed} (see online.json)"
    )
    return lines


def _qualifier(passage: dict[str, Any]) -> str:
    """How sure the median of bounded ratios is: exact, a bound, or about."""
    if not passage["median_is_bound"]:
        return ""
    bounds = {row["bound"] for row in passage["with_bounds"]} - {None}
    return f"{bounds.pop()} " if len(bounds) == 1 else "about "


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _round(value: float | None) -> int | None:
    return None if value is None else round(value)


_STARTS = {
    "fitted": "the offline-fitted weights (`start_weights`)",
    "reversed": "the offline-fitted weights upside down, a wrong prior (`start_weights`: the "
    "best fitted recommender's weight given to the worst, and so on)",
    "none": "equal weights (no prior)",
}


def markdown(results: dict[str, Any]) -> str:
    """The report as markdown, for `online.md`: a section per click model."""
    plan, models = results["plan"], by_click_model(results)
    k = plan["k"]
    learner = ", ".join(f"`{key}` {value}" for key, value in plan["learner"].items())
    choice = next(iter(models)) if len(models) == 1 else "both"
    if "cascade" in models and plan.get("continue_after_click"):
        choice += f" --continue-after-click {plan['continue_after_click']:g}"
    clicks = "; ".join(f"**{_title(name)}**: {_clicks(plan, name)}" for name in models)
    start = plan.get("warm_start", "fitted")
    choice += f" --warm-start {start} --explore {plan.get('explore', 'adaptive')}"
    lines = [
        "# Online benchmark: learning from clicks",
        "",
        f"`python -m benchmarks online --world {plan['world']} --click-model {choice}`, "
        f"{results['started']} to {results['finished']}. Simulated users click on what the "
        f"gateway shows them: {_world(plan)}. An engaged user clicks by the click model: "
        f"{clicks}. Every count below is the gateway's own, from `GET /experiments`. "
        f"Learner: {learner}; it starts from {_STARTS.get(start, start)}.",
        "",
        f"## Recommenders (NDCG@{k} on {plan['validation_users']} validation users)",
        "",
        f"| recommender | NDCG@{k} |",
        "|---|---:|",
        *(f"| {row['name']} | {_pm(row)} |" for row in results["recommenders"]),
        "",
    ]
    if len(models) > 1:
        lines += _side_by_side(models)
    for view in models.values():
        lines += _model_markdown(view)
    return "\n".join(lines)


def _side_by_side(models: dict[str, dict[str, Any]]) -> list[str]:
    """The headline figures, a column per click model (each model's section has the rest)."""
    views = list(models.values())
    best, runner_up, k = views[0]["best"], views[0]["runner_up"], views[0]["plan"]["k"]
    rows: list[tuple[str, list[str]]] = [
        (f"CTR of the A/B arms, {best} vs {runner_up} (over seeds)", [_ctrs(v) for v in views]),
        (f"interleaving: preference for {best} (over seeds)", [_preferences(v) for v in views]),
        ("clicks per clicked impression", [_clicks_per_clicked(v) for v in views]),
    ]
    summaries = [sensitivity_summary(view) for view in views]
    rows += [
        (
            "first passage, median impressions: interleaving, A/B",
            [
                f"{_n(_round(s['first_passage']['interleave_median']))}, "
                f"{_n(_round(s['first_passage']['ab_median']))}"
                for s in summaries
            ],
        ),
        (
            "80% power, seeds pooled: interleaving, A/B, ratio",
            [
                f"{_count(p['interleave'])}, {_count(p['ab'])}, {_x(p['ratio'])}"
                for p in (s["power_calculation"]["pooled"] for s in summaries)
            ],
        ),
        ("learnt weights at the end (largest 1)", [_last_weights(v) for v in views]),
    ]
    for system, label in (
        ("served: rrf, learnt weights as they were", "served, learnt weights as they were"),
        ("rrf, the last learnt weights", "the last learnt weights"),
    ):
        rows.append(
            (
                f"NDCG@{k} - {best}'s, {label}",
                [
                    _diff(v["learning"]["offline"][system]["vs_best"])
                    if system in v["learning"]["offline"]
                    else "-"
                    for v in views
                ],
            )
        )
    rows.append(
        (
            f"NDCG@{k} - {best}'s, the learnt arm's last window",
            [
                _diff(v["learning"]["windows"][-1]["vs_best"]) if v["learning"]["windows"] else "-"
                for v in views
            ],
        )
    )
    rows.append(
        ("time played", [_duration(v["seconds"]) if "seconds" in v else "-" for v in views])
    )
    names = " | ".join(_title(name) for name in models)
    return [
        "## The click models side by side",
        "",
        "The same users, arms and interleavings under each click model; only the clicks differ. "
        "Each model's section below has every figure.",
        "",
        f"| | {names} |",
        "|---|" + "---:|" * len(models),
        *(f"| {label} | {' | '.join(cells)} |" for label, cells in rows),
        "",
    ]


def _ctrs(results: dict[str, Any]) -> str:
    ends = [run["series"][-1]["ab"] for run in results["sensitivity"] if run["series"]]
    ends = [ab for ab in ends if "ctr_a" in ab]
    if not ends:
        return "-"
    return f"{_span([ab['ctr_a'] for ab in ends])} vs {_span([ab['ctr_b'] for ab in ends])}"


def _preferences(results: dict[str, Any]) -> str:
    ends = [run["series"][-1]["interleave"] for run in results["sensitivity"] if run["series"]]
    return _span([pair["preference"] for pair in ends if "preference" in pair])


def _clicks_per_clicked(results: dict[str, Any]) -> str:
    arms = [arm for run in results["sensitivity"] for arm in run["sent"]["arms"].values()]
    clicked = sum(arm["clicked_impressions"] for arm in arms)
    return f"{sum(arm['clicks'] for arm in arms) / clicked:.2f}" if clicked else "-"


def _last_weights(results: dict[str, Any]) -> str:
    weights = results["learning"]["weights"]
    if not weights or not weights[-1]["normalised"]:
        return "-"
    return ", ".join(f"{n} {w:.2f}" for n, w in weights[-1]["normalised"].items())


def _duration(seconds: int) -> str:
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def _title(name: str) -> str:
    return TITLES.get(name, name)


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _span(values: list[float]) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:.3f}" if low == high else f"{low:.3f}-{high:.3f}"


def _model_markdown(results: dict[str, Any]) -> list[str]:
    """One click model's section of the report."""
    plan, best, runner_up = results["plan"], results["best"], results["runner_up"]
    k, name = plan["k"], results["click_model"]
    lines = [
        f"## Click model: {_title(name)}",
        "",
        f"An engaged user's clicks: {_clicks(plan, name)}."
        + (f" Played in {_duration(results['seconds'])}." if "seconds" in results else ""),
        "",
        f"### Interleaving against A/B: {best} against {runner_up}",
        "",
        f"A fifth of the impressions in an arm that interleaves {best} and {runner_up} alone "
        f"(team-draft), two fifths each in an A/B arm showing one of them. Impressions until "
        "each method was 95% sure, and stayed sure to the end of the run (in brackets: the "
        "first time it was), each tested with the user as the unit (a ratio metric with its "
        "delta-method error over users): interleaving, the preference (wins over decided "
        "comparisons) against 0.5; A/B, the difference in CTR (share of impressions clicked), "
        "counting both arms' impressions. Then the impressions each needs for 80% power at "
        "alpha 0.05 from the run's final estimates, and the same if impressions were independent.",
        "",
        "| seed | interleaving | A/B | A/B / interleaving | 80% power: interleaving | A/B | "
        "ratio | impressions as independent | preference [95%] (wins-losses-ties) | "
        "CTR A/B arms | users (interleaved, A/B) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for run in results["sensitivity"]:
        n_i, n_ab, last, needs = run["n_interleave"], run["n_ab"], run["series"][-1], run["needs"]
        pair, ab = last["interleave"], last["ab"]
        preference = (
            f"{pair['preference']:.3f} [{pair['low']:.3f}, {pair['high']:.3f}] "
            f"({pair['wins']}-{pair['losses']}-{pair['ties']})"
            if pair.get("low") is not None
            else "-"
        )
        ctr = f"{ab['ctr_a']:.3f} vs {ab['ctr_b']:.3f}" if "ctr_a" in ab else "-"
        lines.append(
            f"| {run['seed']} | {_n(n_i['stayed'])} ({_n(n_i['first'])}) | "
            f"{_n(n_ab['stayed'])} ({_n(n_ab['first'])}) | {_x(run['ratio'])} | "
            f"{_n(needs.get('interleave'))} | {_n(needs.get('ab'))} | {_x(needs.get('ratio'))} | "
            f"{_x(run['needs_per_impression'].get('ratio'))} | {preference} | {ctr} | "
            f"{run['users']['interleave']:,}, {run['users']['ab']:,} |"
        )
    lines += ["", "\n".join(f"- {line}" for line in _model_findings(results)), ""]
    lines += [f"![interleaving against A/B, {name}](online-sensitivity-{name}.png)", ""]
    lines += _attribution(results["sensitivity"][0]["final"]) if results["sensitivity"] else []
    learning = results["learning"]
    lines += [
        "### Learnt weights",
        "",
        "| after impressions | comparisons | "
        + " | ".join(results["fitted_weights"])
        + " | distance |",
        "|---:|---:|" + "---:|" * len(results["fitted_weights"]) + "---:|",
    ]
    shown = learning["weights"]
    for row in shown[:: max(1, len(shown) // 8)] + shown[-1:]:
        cells = " | ".join(f"{row['normalised'].get(n, 0):.2f}" for n in results["fitted_weights"])
        lines.append(f"| {row['after']:,} | {row['evidence']} | {cells} | {row['distance']} |")
    cells = " | ".join(f"{w:g}" for w in results["fitted_weights"].values())
    lines += [f"| offline-fitted | | {cells} | 0 |", ""]
    lines += [
        f"### NDCG@{k} of the learnt arm over the run",
        "",
        f"| impressions | learnt arm | {best} | learnt arm - {best} | Hedge, replayed "
        f"| Hedge - {best} |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {row['from']:,}-{row['to']:,} | {_pm(row, 'fused_ndcg', 'fused_ci95')} | "
            f"{_pm(row, 'best_ndcg', 'best_ci95')} | {_diff(row['vs_best'])} | "
            f"{row['hedge_ndcg']:.3f} | {_diff(row['hedge_vs_best'])} |"
            for row in learning["windows"]
        ),
        "",
        f"| on the learnt arm's users | NDCG@{k} | vs {best} |",
        "|---|---:|---:|",
        *(
            f"| {system} | {_pm(row)} | {_diff(row['vs_best'])} |"
            for system, row in learning["offline"].items()
        ),
        "",
        f"![learnt weights and NDCG over the run, {name}](online-learning-{name}.png)",
        "",
    ]
    served = _served_lines(learning, results.get("learning_pooled"), best)
    if served:
        lines += [f"### What was served, every arm, against {best}", ""]
        lines += [f"- {line}" for line in served] + [""]
    return lines


def _served_lines(learning: dict[str, Any], pooled: dict[str, Any] | None, best: str) -> list[str]:
    """Every arm's answers (exploring and learnt) against `best`'s list: one run, and pooled."""
    served = learning.get("served") or {}
    if "all" not in served:
        return []
    lines = [
        f"served, every arm ({served['interleaved_share']:.0%} interleaved), NDCG@10 vs "
        f"{best}: {_diff(served['all']['vs_best'])} over {served['impressions']:,} impressions"
        + (
            f"; the first 1,000: {_diff(served['first_1000']['vs_best'])}"
            if "first_1000" in served
            else ""
        )
        + (
            f"; the learnt arm in them: {_diff(served['learnt_arm_first_1000']['vs_best'])}"
            if "learnt_arm_first_1000" in served
            else ""
        )
    ]
    if pooled and pooled.get("runs", 0) > 1 and "all" in pooled:
        lines.append(
            f"served over {pooled['runs']} learning runs (other users each), vs {best}: "
            f"{_diff(pooled['all']['vs_best'])}; their first 1,000 impressions: "
            f"{_diff(pooled['first_1000']['vs_best'])}"
        )
    return lines


def _attribution(final: dict[str, Any]) -> list[str]:
    lines = [
        "### Attribution (the first run's /experiments at its end)",
        "",
        "| recommender | impressions | clicks | share of credit |",
        "|---|---:|---:|---:|",
    ]
    for name, row in sorted(final.get("recommenders", {}).items()):
        lines.append(
            f"| {name} | {row['impressions']:,} | {row['clicks']:,} | {row['credit']:.1%} |"
        )
    lines += [
        "",
        "| a | b | wins | losses | ties | preference of a |",
        "|---|---|---:|---:|---:|---|",
    ]
    for pair in final.get("pairwise", []):
        lines.append(
            f"| {pair['a']} | {pair['b']} | {pair['wins']} | {pair['losses']} | {pair['ties']} | "
            f"{pair['preference']:.3f} [{pair['low']:.3f}, {pair['high']:.3f}] |"
        )
    lines += [
        "",
        "| arm | fusion | impressions | clicked | clicks | CTR |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, arm in sorted(final.get("arms", {}).items()):
        lines.append(
            f"| {name} | {arm['fusion']} | {arm['impressions']:,} | {arm['clicked_impressions']:,} "
            f"| {arm['clicks']:,} | {arm['ctr']:.3f} [{arm['low']:.3f}, {arm['high']:.3f}] |"
        )
    return [*lines, ""]


def write_all(results: dict[str, Any], out: Path) -> list[Path]:
    """`online.json`, `online.md` and two plots per click model, into `out`."""
    models = by_click_model(results)
    for name, view in models.items():
        own = results["click_models"][name] if "click_models" in results else results
        own["summary"] = sensitivity_summary(view)
    data = out / "online.json"
    data.write_text(json.dumps(results, indent=1) + "\n")
    report = out / "online.md"
    report.write_text(markdown(results))
    written = [data, report]
    for name, view in models.items():
        title = f"click model: {_title(name)}"
        if view["sensitivity"]:
            written.append(plot_sensitivity(view, out / f"online-sensitivity-{name}.png", title))
        if view["learning"]["weights"]:
            written.append(plot_learning(view, out / f"online-learning-{name}.png", title))
    return written

"""The quality benchmark's report (`benchmarks.quality`): a table, findings, markdown, a plot.

Everything here reads the results `benchmarks.quality.run.run_quality` returns, as saved in
`quality.json`; nothing runs or scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["findings", "markdown", "plot", "table", "write_all"]


def table(results: dict[str, Any]) -> Any:
    """A rich table of every system's scores."""
    from rich.table import Table

    k = results["plan"]["k"]
    found = Table(
        title=f"Ranking quality over {results['users_scored']} users, {_depth(results)} "
        "(95% intervals)"
    )
    for heading in ("system", "kind", f"NDCG@{k}", f"recall@{k}"):
        found.add_column(heading, justify="left" if heading in ("system", "kind") else "right")
    for row in results["systems"]:
        found.add_row(
            row["system"],
            row["kind"],
            f"{row['ndcg']:.3f} ± {row['ndcg_ci95']:.3f}",
            f"{row['recall']:.3f} ± {row['recall_ci95']:.3f}",
        )
    return found


def _depth(results: dict[str, Any]) -> str:
    plan = results["plan"]
    return f"fusing each recommender's top {plan['window'] or plan['k']}"


def findings(results: dict[str, Any]) -> list[str]:
    """One line per fusion against the best single recommender, and the fitted weights."""
    comparisons = results["comparisons"]
    if not comparisons:
        return ["no user was answered completely: nothing to compare"]
    k = results["plan"]["k"]
    best = comparisons["best_single"]
    lines = [f"best single recommender by NDCG@{k}: {best}"]
    for fusion, paired in comparisons["fusions"].items():
        ndcg = paired["ndcg"]
        verdict = _verdict(ndcg["difference"], ndcg["ci95"])
        lines.append(
            f"{fusion} - {best}: NDCG@{k} {ndcg['difference']:+.4f} ± {ndcg['ci95']:.4f} "
            f"({verdict}; better for {ndcg['wins']:.0%} of users, worse for "
            f"{ndcg['losses']:.0%})"
        )
    if results["fitted_weights"]:
        weights = ", ".join(f"{n} {w:g}" for n, w in results["fitted_weights"].items())
        lines.append(f"weights fitted on {results['validation_users_used']} other users: {weights}")
    lines += _sources(results)
    if results["inconsistent_lists"]:
        lines.append(f"WARNING: {results['inconsistent_lists']} users got differing lists")
    lines.append(f"users scored: {results['users_scored']} of {results['users_asked']}")
    return lines


def _sources(results: dict[str, Any]) -> list[str]:
    """The recommenders, when one is not a native mock, and which served the same lists."""
    recommenders = results.get("recommenders", [])
    if all(r["protocol"] == "native" and not r["shadow"] for r in recommenders):
        return []
    lines = [f"recommenders: {', '.join(map(_described, recommenders))}"]
    for name, same in results.get("same_lists", {}).items():
        lines.append(
            f"{name} gave the same list as {same['same_as']} in {same['same']} of "
            f"{same['answers']} answers"
        )
    return lines


def _described(recommender: dict[str, Any]) -> str:
    notes = [recommender["protocol"]] if recommender["protocol"] != "native" else []
    if recommender["shadow"]:
        notes.append("shadow: weight 0, scored, not fused")
    return f"{recommender['name']} ({', '.join(notes)})" if notes else recommender["name"]


def _verdict(difference: float, ci: float) -> str:
    if difference - ci > 0:
        return "better"
    if difference + ci < 0:
        return "worse"
    return "no significant difference"


def markdown(results: dict[str, Any]) -> str:
    """The table and findings as markdown."""
    k = results["plan"]["k"]
    lines = [
        f"# Ranking quality: {results['users_scored']} users, world seed "
        f"{results['plan']['world_seed']}, {_depth(results)}",
        "",
        f"| system | kind | NDCG@{k} | recall@{k} |",
        "|---|---|---:|---:|",
    ]
    for row in results["systems"]:
        lines.append(
            f"| {row['system']} | {row['kind']} | {row['ndcg']:.3f} ± {row['ndcg_ci95']:.3f} "
            f"| {row['recall']:.3f} ± {row['recall_ci95']:.3f} |"
        )
    lines += ["", *(f"- {line}" for line in findings(results)), ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], out: Path) -> Path:
    """A bar plot of NDCG@k and recall@k per system, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = results["systems"]
    k = results["plan"]["k"]
    colours = {"single": "#8da0cb", "fusion": "#fc8d62", "ceiling": "#b3b3b3"}
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    metrics = (("ndcg", f"NDCG@{k}"), ("recall", f"recall@{k}"))
    for axis, (metric, label) in zip(axes, metrics, strict=True):
        positions = range(len(rows))
        axis.bar(
            positions,
            [row[metric] for row in rows],
            yerr=[row[f"{metric}_ci95"] for row in rows],
            color=[colours[row["kind"]] for row in rows],
            capsize=3,
        )
        axis.set_xticks(list(positions), [row["system"] for row in rows], rotation=35, ha="right")
        axis.set_ylabel(label)
        axis.set_title(f"{label} by system")
        axis.grid(axis="y", alpha=0.3)
    handles = [Patch(color=colour) for colour in colours.values()]
    axes[0].legend(handles, list(colours), loc="upper left")
    figure.tight_layout()
    path = out / "quality.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_all(results: dict[str, Any], out: Path) -> list[Path]:
    """`quality.json`, `quality.md` and `quality.png` into `out`."""
    data = out / "quality.json"
    data.write_text(json.dumps(results, indent=2) + "\n")
    report = out / "quality.md"
    report.write_text(markdown(results))
    return [data, report, plot(results, out)]

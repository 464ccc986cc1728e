"""The online benchmark's two plots: interleaving against A/B over a run, and learning.

Each reads one click model's results, as `benchmarks.online.report.by_click_model` gives them,
and writes one PNG titled with the click model; matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_learning", "plot_sensitivity"]


def plot_sensitivity(results: dict[str, Any], path: Path, title: str) -> Path:
    """The first run's interleaving preference and A/B difference, with 95% bands, over time.

    `results`: one click model's (`benchmarks.online.report.by_click_model`); `title` says which.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = results["sensitivity"][0]
    series = [row for row in run["series"] if row["interleave"].get("low") is not None]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    best, runner_up = results["best"], results["runner_up"]
    x = [row["interleave"]["impressions"] for row in series]
    left.plot(x, [row["interleave"]["preference"] for row in series], color="C0")
    left.fill_between(
        x,
        [row["interleave"]["low"] for row in series],
        [row["interleave"]["high"] for row in series],
        color="C0",
        alpha=0.25,
    )
    left.axhline(0.5, color="grey", lw=1)
    left.set(
        title=f"Interleaving: {best} preferred over {runner_up}",
        xlabel="interleaved impressions",
        ylabel="share of decided comparisons won",
    )
    shown = [row for row in run["series"] if "difference" in row["ab"]]
    x = [row["ab"]["impressions"] for row in shown]
    diff = [row["ab"]["difference"] for row in shown]
    half = [row["ab"]["ci95"] for row in shown]
    right.plot(x, diff, color="C1")
    low = [d - h for d, h in zip(diff, half, strict=True)]
    high = [d + h for d, h in zip(diff, half, strict=True)]
    right.fill_between(x, low, high, color="C1", alpha=0.25)
    right.axhline(0.0, color="grey", lw=1)
    right.set(
        title=f"A/B: CTR({best}) - CTR({runner_up})",
        xlabel="A/B impressions (both arms)",
        ylabel="difference in share clicked",
    )
    for axis, n in ((left, run["n_interleave"]["stayed"]), (right, run["n_ab"]["stayed"])):
        if n is not None:
            axis.axvline(n, color="k", ls="--", lw=1, label=f"95% sure from {n:,}")
            axis.legend(loc="upper right")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_learning(results: dict[str, Any], path: Path, title: str) -> Path:
    """The learnt weights against the fitted ones, and the learnt arm's NDCG in windows.

    `results`: one click model's (`benchmarks.online.report.by_click_model`); `title` says which.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learning, best = results["learning"], results["best"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = [row["after"] for row in learning["weights"]]
    for n, (name, target) in enumerate(results["fitted_weights"].items()):
        left.plot(
            x,
            [row["normalised"].get(name, 0.0) for row in learning["weights"]],
            color=f"C{n}",
            label=name,
        )
        left.axhline(target, color=f"C{n}", ls=":", lw=1.5)
    left.set(
        title="Learnt weights (largest = 1); dotted: fitted offline",
        xlabel="impressions (all arms)",
        ylabel="weight",
    )
    left.legend(loc="center right")
    windows = learning["windows"]
    middle = [(row["from"] + row["to"]) / 2 for row in windows]
    # Paired differences: the users' own spread, which dwarfs the effect, cancels out.
    for key, style, colour, label in (
        ("vs_best", "o-", "C0", "learnt arm (RRF, learnt weights)"),
        ("hedge_vs_best", "^:", "C2", "Hedge (the rule before), replayed on the same lists"),
    ):
        right.errorbar(
            middle, [row[key]["difference"] for row in windows],
            yerr=[row[key]["ci95"] for row in windows],
            fmt=style, color=colour, capsize=3, label=label,
        )  # fmt: skip
    right.axhline(0.0, color="C3", ls="--", lw=1, label=f"{best} alone")
    offline = learning["offline"]
    for system, style in (("rrf, equal weights", ":"), ("rrf, offline-fitted weights", "-.")):
        if system in offline:
            difference = offline[system]["vs_best"]["difference"]
            right.axhline(difference, color="grey", ls=style, lw=1, label=system)
    right.set(
        title=f"NDCG@{results['plan']['k']} of the learnt arm - {best}'s, same users",
        xlabel="impressions (all arms)",
        ylabel=f"paired difference in NDCG@{results['plan']['k']}",
    )
    right.legend(loc="lower right", fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

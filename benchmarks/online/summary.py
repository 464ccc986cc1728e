"""The sensitivity runs summed up over seeds: the ratios, their medians, the seeds pooled.

`sensitivity_summary` reads one click model's results (`benchmarks.online.report.by_click_model`)
and gives what the report says of all its seeds together: how often interleaving needed at most
a fifth of A/B's impressions (the issue's target), by first passage (with the bounds a method
never sure to the end leaves) and by the power calculation, per seed and from the seeds pooled.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.online.stats import Z80, Z95

__all__ = ["TARGET_RATIO", "sensitivity_summary"]

# The target: interleaving decides with at most a fifth of A/B's impressions.
TARGET_RATIO = 5.0


def _ratios(ratios: list[float | None]) -> dict[str, Any]:
    decided = [ratio for ratio in ratios if ratio is not None]
    return {
        "ratios": ratios,
        "median_ratio": statistics.median(decided) if decided else None,
        "low": min(decided, default=None),
        "high": max(decided, default=None),
        "met": sum(ratio >= TARGET_RATIO for ratio in decided),
    }


def _median(values: list[int | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def _censored_ratio(run: dict[str, Any]) -> dict[str, Any]:
    """A/B / interleaving by first passage, or a bound when one method never stayed sure.

    A method still unsure at the end of the run needed more than all its impressions: when
    it is A/B, the ratio is at least the run's A/B impressions over interleaving's count;
    when it is interleaving, at most A/B's count over the run's interleaved impressions.
    """
    n_i, n_ab = run["n_interleave"]["stayed"], run["n_ab"]["stayed"]
    last = run["series"][-1]
    if n_i and n_ab is not None:
        return {"ratio": round(n_ab / n_i, 2), "bound": None}
    if n_i:
        return {"ratio": round(last["ab"]["impressions"] / n_i, 2), "bound": "at least"}
    if n_ab is not None and last["interleave"]["impressions"]:
        return {"ratio": round(n_ab / last["interleave"]["impressions"], 2), "bound": "at most"}
    return {"ratio": None, "bound": None}


def _pooled_power(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """80%-power impressions from the runs' mean effect and mean variance per impression.

    Each run's final effect is noisy, and a power calculation divides by its square; the
    runs' users are independent, so their mean effect and mean per-impression variance
    (se² times impressions) give a steadier figure than any one run's.
    """
    needs: dict[str, Any] = {}
    for method, key, null in (("interleave", "preference", 0.5), ("ab", "difference", 0.0)):
        rows = [run["series"][-1][method] for run in runs if run["series"]]
        rows = [row for row in rows if "se" in row]
        if not rows:
            return {"interleave": None, "ab": None, "ratio": None}
        effect = statistics.mean(row[key] - null for row in rows)
        variance = statistics.mean(row["se"] ** 2 * row["impressions"] for row in rows)
        needs[method] = round(variance * ((Z95 + Z80) / effect) ** 2) if effect else None
    interleave, ab = needs["interleave"], needs["ab"]
    needs["ratio"] = round(ab / interleave, 2) if interleave and ab else None
    return needs


def sensitivity_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Over the runs: the ratios, the counts' medians, how often the target was met."""
    runs = results["sensitivity"]
    bounded = [_censored_ratio(run) for run in runs]
    known = [(row["ratio"], row["bound"]) for row in bounded if row["ratio"] is not None]
    median = statistics.median(r for r, _ in known) if known else None
    return {
        "runs": len(runs),
        "first_passage": {
            **_ratios([run["ratio"] for run in runs]),
            "with_bounds": bounded,
            "median": median,
            # A bound on the wrong side of the median: the true ratio there may cross it.
            "median_is_bound": median is not None
            and any(
                (bound == "at least" and r <= median) or (bound == "at most" and r >= median)
                for r, bound in known
            ),
            "met": sum(r >= TARGET_RATIO and bound != "at most" for r, bound in known),
            "short": sum(r < TARGET_RATIO and bound != "at least" for r, bound in known),
            "interleave_median": _median([run["n_interleave"]["stayed"] for run in runs]),
            "ab_median": _median([run["n_ab"]["stayed"] for run in runs]),
            "undecided": {
                method: sum(run[f"n_{method}"]["stayed"] is None for run in runs)
                for method in ("interleave", "ab")
            },
        },
        "power_calculation": {
            **_ratios([run["needs"].get("ratio") for run in runs]),
            "interleave_median": _median([run["needs"].get("interleave") for run in runs]),
            "ab_median": _median([run["needs"].get("ab") for run in runs]),
            "pooled": _pooled_power(runs),
        },
        "power_per_impression": _ratios([run["needs_per_impression"].get("ratio") for run in runs]),
        "gateway_first_passage": _ratios([run["gateway"]["ratio"] for run in runs]),
    }

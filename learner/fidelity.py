"""Pure math of bench/fidelity.py: one row per training run from sf-eval's rows, issue 20's three claims with
their margins, and the summary over seeds. No I/O, no torch.

The claims, each against the base model's dense accuracy on the same fresh split:
1. (scenes, where pruning hurts the base) trained accuracy at keep 0.25 is at most 2 points below it;
2. the trained model's reduction at tau = 0.975 is >= 0.60, at accuracy at most 2 points below it;
3. (no damage) trained dense accuracy is at most 1 point below it.
A margin is how far a run clears its bound (negative: by how much it misses).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from learner.eval_metrics import Z_95

ACCURACY_BOUND = 0.02  # claims 1 and 2: points of base dense accuracy a pruned run may give up
DENSE_BOUND = 0.01  # claim 3
REDUCTION_GOAL = 0.60  # claim 2, at tau = 0.975
CLAIM_1_FAMILIES = ("scenes",)  # digits lose little to pruning even before RL: nothing for claim 1 to show
# Accuracies are k/n: a drop of exactly the bound must count as within it despite float rounding.
_SLACK = 1e-9

# Row keys -> (model, sf-eval budget label, statistic).
ROW_METRICS: dict[str, tuple[str, str, str]] = {
    "base_dense": ("base", "r=1", "accuracy"),
    "base_r025": ("base", "r=0.25", "accuracy"),
    "trained_dense": ("trained", "r=1", "accuracy"),
    "trained_r025": ("trained", "r=0.25", "accuracy"),
    "trained_tau0975_accuracy": ("trained", "tau=0.975", "accuracy"),
    "trained_tau0975_reduction": ("trained", "tau=0.975", "reduction"),
    "base_tau0975_reduction": ("base", "tau=0.975", "reduction"),
}


def reduction_ci95(mean: float, population_std: float, items: int) -> list[float]:
    """Normal-approximation 95% interval of a mean reduction ratio over `items` requests, clipped to [0, 1]."""
    if items < 2:
        return [mean, mean]
    half = Z_95 * population_std * math.sqrt(items / (items - 1)) / math.sqrt(items)
    return [max(0.0, mean - half), min(1.0, mean + half)]


def budget_point(row: dict[str, Any]) -> dict[str, Any]:
    """One sf-eval row reduced to what the bench reports: accuracy and reduction, each with its 95% CI."""
    return {
        "accuracy": row["accuracy"], "accuracy_ci95": list(row["accuracy_ci95"]),
        "reduction": row["reduction_mean"],
        "reduction_ci95": reduction_ci95(row["reduction_mean"], row["reduction_std"], row["items"]),
        "items": row["items"],
    }


def claims(family: str, values: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The three claims of one run: met (bool) and margin(s), from a row's values (ROW_METRICS keys)."""
    base = values["base_dense"]
    claim_1 = values["trained_r025"] - (base - ACCURACY_BOUND)
    accuracy_2 = values["trained_tau0975_accuracy"] - (base - ACCURACY_BOUND)
    reduction_2 = values["trained_tau0975_reduction"] - REDUCTION_GOAL
    claim_3 = values["trained_dense"] - (base - DENSE_BOUND)
    return {
        "claim1_r025_within_2_points": {
            "applies": family in CLAIM_1_FAMILIES, "met": claim_1 >= -_SLACK, "margin": claim_1,
            "base_r025_margin": values["base_r025"] - (base - ACCURACY_BOUND)},
        "claim2_tau0975_reduction_at_accuracy": {
            "applies": True, "met": reduction_2 >= -_SLACK and accuracy_2 >= -_SLACK,
            "margin_reduction": reduction_2, "margin_accuracy": accuracy_2},
        "claim3_no_dense_damage": {"applies": True, "met": claim_3 >= -_SLACK, "margin": claim_3},
    }


def fidelity_row(family: str, seed: int, base_rows: Sequence[dict[str, Any]],
                 trained_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One (family, seed) row: the issue's named values with 95% CIs, every budget's point, and the claims."""
    points = {"base": {row["budget"]: budget_point(row) for row in base_rows},
              "trained": {row["budget"]: budget_point(row) for row in trained_rows}}
    row: dict[str, Any] = {"family": family, "seed": seed}
    for key, (model, budget, statistic) in ROW_METRICS.items():
        point = points[model][budget]
        row[key] = point[statistic]
        row[f"{key}_ci95"] = point[f"{statistic}_ci95"]
    row["claims"] = claims(family, {key: row[key] for key in ROW_METRICS})
    row["budgets"] = points
    return row


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std, min and max of one value over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize(rows: Sequence[dict[str, Any]], by: str = "family") -> dict[str, Any]:
    """Per value of `by` (a family, or an ablation's variant): mean, sample std, min and max over seeds of each
    named value, and how many runs met each claim."""
    summary: dict[str, Any] = {}
    for group in dict.fromkeys(row[by] for row in rows):
        runs = [row for row in rows if row[by] == group]
        entry: dict[str, Any] = {"seeds": [row["seed"] for row in runs]}
        entry |= {key: spread([row[key] for row in runs]) for key in ROW_METRICS}
        entry["claims_met"] = {
            name: (f"{sum(row['claims'][name]['met'] for row in runs)}/{len(runs)}"
                   if runs[0]["claims"][name]["applies"] else "n/a")
            for name in runs[0]["claims"]}
        summary[group] = entry
    return summary

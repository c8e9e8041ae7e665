"""bench/fidelity.py's pure math: rows from sf-eval rows, issue 20's three claims at their bounds, the summary."""

from __future__ import annotations

import pytest

from learner.fidelity import ROW_METRICS, claims, fidelity_row, reduction_ci95, summarize

BUDGETS = ("r=1", "r=0.5", "r=0.25", "r=0.125", "tau=0.94", "tau=0.975")
REDUCTION = {"r=1": 0.0, "r=0.5": 0.5, "r=0.25": 0.75, "r=0.125": 0.875}


def sf_eval_rows(correct: dict[str, int], tau_reduction: float, items: int = 300) -> list[dict]:
    """sf-eval-shaped rows: `correct` answers of `items` per budget, keep ratios at their exact reduction."""
    return [{"budget": budget, "items": items, "accuracy": correct[budget] / items,
             "accuracy_ci95": [correct[budget] / items - 0.02, min(1.0, correct[budget] / items + 0.02)],
             "reduction_mean": REDUCTION.get(budget, tau_reduction),
             "reduction_std": 0.0 if budget.startswith("r=") else 0.1} for budget in BUDGETS]


BASE = sf_eval_rows({"r=1": 273, "r=0.5": 233, "r=0.25": 206, "r=0.125": 200, "tau=0.94": 273, "tau=0.975": 273}, 0.10)


def test_row_holds_the_issues_values_with_cis_and_every_budget() -> None:
    trained = sf_eval_rows({"r=1": 270, "r=0.5": 268, "r=0.25": 267, "r=0.125": 250, "tau=0.94": 268,
                            "tau=0.975": 268}, 0.62)
    row = fidelity_row("scenes", 1, BASE, trained)
    assert (row["family"], row["seed"]) == ("scenes", 1)
    assert row["base_dense"] == pytest.approx(0.91) and row["trained_r025"] == pytest.approx(0.89)
    assert row["trained_tau0975_reduction"] == pytest.approx(0.62) and row["base_tau0975_reduction"] == pytest.approx(0.10)
    for key in ROW_METRICS:
        low, high = row[f"{key}_ci95"]
        assert low <= row[key] <= high
    assert set(row["budgets"]["base"]) == set(BUDGETS) == set(row["budgets"]["trained"])
    # 267/300 is exactly 2 points under 273/300: within the bound despite float rounding.
    assert row["claims"]["claim1_r025_within_2_points"]["met"]
    assert row["claims"]["claim1_r025_within_2_points"]["margin"] == pytest.approx(0.0, abs=1e-12)
    assert row["claims"]["claim2_tau0975_reduction_at_accuracy"]["met"]
    assert row["claims"]["claim3_no_dense_damage"]["met"]  # 270 is 1 point under 273


def test_each_claim_misses_on_its_own_bound() -> None:
    values = {"base_dense": 0.91, "base_r025": 0.69, "trained_dense": 0.89, "trained_r025": 0.88,
              "trained_tau0975_accuracy": 0.90, "trained_tau0975_reduction": 0.59, "base_tau0975_reduction": 0.1}
    result = claims("digits", values)
    assert not result["claim1_r025_within_2_points"]["applies"]  # claim 1 is the scenes claim
    assert result["claim1_r025_within_2_points"]["margin"] == pytest.approx(-0.01)
    assert result["claim1_r025_within_2_points"]["base_r025_margin"] == pytest.approx(-0.20)
    claim_2 = result["claim2_tau0975_reduction_at_accuracy"]
    assert not claim_2["met"] and claim_2["margin_reduction"] == pytest.approx(-0.01)
    assert claim_2["margin_accuracy"] == pytest.approx(0.01)
    assert not result["claim3_no_dense_damage"]["met"]
    assert result["claim3_no_dense_damage"]["margin"] == pytest.approx(-0.01)


def test_reduction_interval_uses_the_sample_std_and_stays_in_range() -> None:
    low, high = reduction_ci95(0.5, 0.1, 101)
    assert high - 0.5 == pytest.approx(0.5 - low) == pytest.approx(1.959963984540054 * 0.1 * (101 / 100) ** 0.5 / 101 ** 0.5)
    assert reduction_ci95(0.99, 0.5, 10)[1] == 1.0 and reduction_ci95(0.3, 0.2, 1) == [0.3, 0.3]


def test_summary_gives_mean_and_spread_over_seeds_and_claim_counts() -> None:
    good = sf_eval_rows({"r=1": 273, "r=0.5": 270, "r=0.25": 270, "r=0.125": 260, "tau=0.94": 272,
                         "tau=0.975": 272}, 0.70)
    bad = sf_eval_rows({"r=1": 240, "r=0.5": 230, "r=0.25": 220, "r=0.125": 200, "tau=0.94": 240,
                        "tau=0.975": 240}, 0.30)
    rows = [fidelity_row("scenes", 0, BASE, good), fidelity_row("scenes", 1, BASE, bad),
            fidelity_row("digits", 0, BASE, good)]
    summary = summarize(rows)
    assert list(summary) == ["scenes", "digits"] and summary["scenes"]["seeds"] == [0, 1]
    reduction = summary["scenes"]["trained_tau0975_reduction"]
    assert reduction["mean"] == pytest.approx(0.5) and reduction["min"] == 0.3 and reduction["max"] == 0.7
    assert reduction["std"] == pytest.approx(0.2 * 2 ** 0.5)
    assert summary["digits"]["trained_dense"]["std"] == 0.0
    assert summary["scenes"]["claims_met"] == {"claim1_r025_within_2_points": "1/2",
                                               "claim2_tau0975_reduction_at_accuracy": "1/2",
                                               "claim3_no_dense_damage": "1/2"}
    assert summary["digits"]["claims_met"]["claim1_r025_within_2_points"] == "n/a"

"""Direct tests of sf-eval's pure math: budget strings, the Wilson interval, per-budget summaries."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from learner.eval_metrics import (
    BatchTiming,
    BudgetParseError,
    ItemOutcome,
    decode_tokens_per_s,
    parse_budget,
    parse_budgets,
    summarize_budget,
    wilson_interval,
)
from services.schemas import Budget


# ---- budget strings
@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [("r=1", "keep_ratio", 1.0), ("r=0.125", "keep_ratio", 0.125), (" tau = 0.975 ", "mass_threshold", 0.975),
     ("TAU=0.94", "mass_threshold", 0.94)],
)
def test_parse_budget_reads_ratio_and_mass(text: str, kind: str, value: float) -> None:
    assert parse_budget(text) == Budget(kind=kind, value=value)


@pytest.mark.parametrize(
    ("text", "says"),
    [("r", "must look like"), ("k=0.5", "must look like"), ("0.5", "must look like"), ("r=half", "'half' is not a number"),
     ("r=0", "(0, 1]"), ("tau=1.5", "(0, 1]"), ("r=-0.25", "(0, 1]"), ("tau=nan", "(0, 1]")],
)
def test_parse_budget_names_the_bad_string(text: str, says: str) -> None:
    with pytest.raises(BudgetParseError) as error:
        parse_budget(text)
    assert repr(text) in str(error.value) and says in str(error.value)


def test_parse_budgets_keeps_order_and_labels() -> None:
    budgets = parse_budgets("r=1,r=0.5,tau=0.975,")
    assert [budget.label for budget in budgets] == ["r=1", "r=0.5", "tau=0.975"]


def test_parse_budgets_refuses_empty_and_repeats() -> None:
    with pytest.raises(BudgetParseError, match="empty"):
        parse_budgets(" , ")
    with pytest.raises(BudgetParseError, match="repeats r=1"):
        parse_budgets("r=1,r=0.5,r=1.0")
    with pytest.raises(BudgetParseError, match="'q=2'"):
        parse_budgets("r=1,q=2")


# ---- Wilson interval
def test_wilson_matches_hand_computed_values() -> None:
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    # At p = 1 the lower bound has the closed form n / (n + z^2); at p = 0 the upper is z^2 / (n + z^2).
    z2 = 1.959963984540054**2
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))


def test_wilson_approaches_the_normal_interval_for_large_n() -> None:
    n, successes = 1_000_000, 300_000
    half = 1.959963984540054 * math.sqrt(0.3 * 0.7 / n)
    assert wilson_interval(successes, n) == pytest.approx((0.3 - half, 0.3 + half), abs=1e-6)


@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_p_stays_in_unit_range_and_mirrors(case: tuple[int, int]) -> None:
    successes, trials = case
    low, high = wilson_interval(successes, trials)
    assert 0.0 <= low <= successes / trials <= high <= 1.0
    mirror_low, mirror_high = wilson_interval(trials - successes, trials)
    assert low == pytest.approx(1 - mirror_high, abs=1e-12) and high == pytest.approx(1 - mirror_low, abs=1e-12)


def test_wilson_narrows_with_more_trials() -> None:
    widths = [high - low for low, high in (wilson_interval(n // 2, n) for n in (10, 100, 1000))]
    assert widths[0] > widths[1] > widths[2]


def test_wilson_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="trials must be >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match=r"successes must lie in \[0, 3\], got 4"):
        wilson_interval(4, 3)


# ---- speed and per-budget rows
def test_decode_rate_counts_tokens_after_the_first_over_the_extra_time() -> None:
    # 4 requests x 16 tokens: 60 tokens beyond each request's first, in 2.5 - 0.5 = 2 extra seconds.
    timing = BatchTiming(requests=4, prefill_s=0.5, full_s=2.5, full_completion_tokens=64)
    assert decode_tokens_per_s(timing) == pytest.approx(30.0)


def test_decode_rate_is_none_when_not_measurable() -> None:
    assert decode_tokens_per_s(BatchTiming(requests=4, prefill_s=0.5, full_s=0.9, full_completion_tokens=4)) is None
    assert decode_tokens_per_s(BatchTiming(requests=4, prefill_s=0.5, full_s=0.4, full_completion_tokens=40)) is None


def outcome(correct: bool, kept: int, prompt: int = 100, completion: int = 3) -> ItemOutcome:
    return ItemOutcome(correct=correct, visual_tokens_kept=kept, visual_tokens_total=64,
                       engine_prompt_tokens=prompt, completion_tokens=completion)


def test_summarize_budget_hand_computed() -> None:
    outcomes = [outcome(True, 16, prompt=50), outcome(False, 32, prompt=66, completion=5),
                outcome(True, 48, prompt=82, completion=1), outcome(True, 64, prompt=98, completion=7)]
    timing = BatchTiming(requests=4, prefill_s=0.2, full_s=1.2, full_completion_tokens=32, repeats=3)
    row = summarize_budget(Budget(kind="mass_threshold", value=0.9), outcomes, timing)
    reductions = [0.75, 0.5, 0.25, 0.0]
    assert row["budget"] == "tau=0.9" and row["items"] == 4 and row["correct"] == 3
    assert row["accuracy"] == 0.75
    assert row["accuracy_ci95"] == pytest.approx(list(wilson_interval(3, 4)))
    assert row["reduction_mean"] == pytest.approx(0.375)
    assert row["reduction_std"] == pytest.approx(math.sqrt(sum((r - 0.375) ** 2 for r in reductions) / 4))
    assert (row["reduction_min"], row["reduction_max"]) == (0.0, 0.75)
    assert row["visual_tokens_kept_mean"] == 40.0
    assert row["kv_entries_mean"] == pytest.approx((53 + 71 + 83 + 105) / 4)
    assert row["speed"]["prefill_ms_per_request"] == pytest.approx(50.0) and row["speed"]["repeats"] == 3
    assert row["speed"]["decode_tokens_per_s"] == pytest.approx(28.0)


def test_summarize_budget_without_timing_or_outcomes() -> None:
    row = summarize_budget(Budget(kind="keep_ratio", value=0.25), [outcome(False, 16)])
    assert row["speed"] is None and row["reduction_std"] == 0.0 and row["accuracy"] == 0.0
    with pytest.raises(ValueError, match="r=0.5 has no outcomes"):
        summarize_budget(Budget(kind="keep_ratio", value=0.5), [])

"""Property tests of budgeted selection: counts, sortedness, mass, ties and the edge cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.schemas.models import Budget
from services.sparsity.budgets import (
    KeepRatio,
    KeepSetError,
    MassThreshold,
    budget_from_wire,
    keep_count_for_ratio,
    keep_mask,
    normalize_scores,
    select,
    validate_kept_indices,
)

score_lists = st.lists(st.floats(0.0, 1e3, allow_nan=False, allow_infinity=False), min_size=1, max_size=300)
ratios = st.floats(1e-6, 1.0, allow_nan=False)
taus = st.floats(1e-6, 1.0, allow_nan=False)


def _is_sorted_unique(indices: tuple[int, ...]) -> bool:
    return all(b > a for a, b in itertools.pairwise(indices))


@settings(max_examples=200, deadline=None)
@given(score_lists, ratios)
def test_keep_ratio_keeps_ceil_r_n_top_tokens(values: list[float], ratio: float) -> None:
    scores = torch.tensor(values, dtype=torch.float64)
    selection = select(scores, KeepRatio(ratio))
    expected = min(len(values), max(1, math.ceil(ratio * len(values) - 1e-9)))
    assert selection.visual_tokens_kept == expected
    assert _is_sorted_unique(selection.kept_indices)
    kept = set(selection.kept_indices)
    # Every kept score is >= every dropped score: it really is the top-k.
    if len(kept) < len(values):
        assert min(values[i] for i in kept) >= max(v for i, v in enumerate(values) if i not in kept)
    assert selection.reduction_ratio == pytest.approx(1 - expected / len(values))


@settings(max_examples=200, deadline=None)
@given(score_lists, taus)
def test_mass_threshold_keeps_smallest_set_reaching_tau(values: list[float], tau: float) -> None:
    scores = torch.tensor(values, dtype=torch.float64)
    selection = select(scores, MassThreshold(tau))
    probabilities = normalize_scores(scores)
    kept_mass = float(probabilities[list(selection.kept_indices)].sum())
    assert kept_mass >= tau - 1e-9
    assert _is_sorted_unique(selection.kept_indices)
    # Minimality: dropping the weakest kept token falls below tau.
    if selection.visual_tokens_kept > 1:
        weakest = float(probabilities[list(selection.kept_indices)].min())
        assert kept_mass - weakest < tau - 1e-9 + 1e-12


@given(st.floats(0.0, 10.0, allow_nan=False), st.one_of(ratios.map(KeepRatio), taus.map(MassThreshold)))
def test_single_token_is_always_kept(value: float, budget: KeepRatio | MassThreshold) -> None:
    selection = select(torch.tensor([value]), budget)
    assert selection.kept_indices == (0,)
    assert selection.reduction_ratio == 0.0


@given(st.integers(1, 300))
def test_ratio_one_and_tau_one_keep_everything_with_positive_scores(count: int) -> None:
    scores = torch.rand(count) + 0.01
    assert select(scores, KeepRatio(1.0)).kept_indices == tuple(range(count))
    assert select(scores, MassThreshold(1.0)).kept_indices == tuple(range(count))


def test_tau_one_drops_zero_score_tokens() -> None:
    scores = torch.tensor([0.5, 0.0, 0.5, 0.0])
    assert select(scores, MassThreshold(1.0)).kept_indices == (0, 2)


@given(st.integers(1, 300), st.floats(0.0, 5.0, allow_nan=False), ratios)
def test_all_equal_scores_break_ties_towards_lower_indices(count: int, value: float, ratio: float) -> None:
    scores = torch.full((count,), value)
    kept = select(scores, KeepRatio(ratio)).kept_indices
    assert kept == tuple(range(len(kept)))
    # Equal (or all-zero) scores are uniform mass: tau of it needs ceil(tau*N) tokens.
    mass_kept = select(scores, MassThreshold(0.5)).kept_indices
    assert mass_kept == tuple(range(math.ceil(0.5 * count - 1e-9)))


def test_ties_in_the_middle_go_to_the_lower_index() -> None:
    scores = torch.tensor([0.1, 0.3, 0.3, 0.3, 0.0])
    assert select(scores, KeepRatio(0.4)).kept_indices == (1, 2)


def test_float_ratio_does_not_overshoot_ceil() -> None:
    assert keep_count_for_ratio(0.7, 10) == 7
    assert keep_count_for_ratio(0.125, 256) == 32
    assert keep_count_for_ratio(1e-9, 256) == 1


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_budgets_refuse_values_outside_the_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match="ratio"):
        KeepRatio(bad)
    with pytest.raises(ValueError, match="tau"):
        MassThreshold(bad)


@pytest.mark.parametrize("bad", [torch.tensor([]), torch.tensor([1.0, -1.0]), torch.tensor([[1.0]]),
                                 torch.tensor([1.0, float("nan")])])
def test_select_refuses_bad_scores(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="scores"):
        select(bad, KeepRatio(0.5))


def test_wire_budgets_map_to_selection_budgets() -> None:
    assert budget_from_wire(Budget(kind="keep_ratio", value=0.25)) == KeepRatio(0.25)
    assert budget_from_wire(Budget(kind="mass_threshold", value=0.95)) == MassThreshold(0.95)


@pytest.mark.parametrize(
    ("kept", "total", "message"),
    [
        ([], 4, "empty"),
        ([0, 4], 4, "out of range"),
        ([-1, 2], 4, "out of range"),
        ([2, 1], 4, "sorted"),
        ([1, 1], 4, "duplicate"),
    ],
)
def test_bad_keep_sets_get_a_clear_error(kept: list[int], total: int, message: str) -> None:
    with pytest.raises(KeepSetError, match=message):
        validate_kept_indices(kept, total)


@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), min_size=1))))
def test_keep_mask_round_trips_indices(case: tuple[int, set[int]]) -> None:
    total, indices = case
    mask = keep_mask(sorted(indices), total)
    assert mask.shape == (total,)
    assert set(torch.nonzero(mask).flatten().tolist()) == indices

"""Budgeted selection of visual tokens: pure functions from importance scores to sorted kept indices.

Two budgets (docs/architecture.md, "Two-phase pruning", step 2):
- ``KeepRatio(r)`` keeps the top ``ceil(r * N)`` tokens, never fewer than one.
- ``MassThreshold(tau)`` keeps the smallest set whose normalized scores sum to at least ``tau``; the
  count adapts to how peaked the scores are (our once-before-the-LLM version of ZipVL's top-p).

Ties break towards the lower index (stable sort), so a selection is a deterministic function of the
scores: the rollout worker and the learner never disagree about which token a tie kept.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.schemas.models import Budget

# Float slack for ceil(r*N) and the cumulative mass: 0.7 * 10 is 7.000000000000001 in binary floating
# point, and a sum of normalized scores can land a hair under 1.0.
_RATIO_SLACK = 1e-9
_MASS_SLACK = 1e-9


class KeepSetError(ValueError):
    """A keep set (kept visual-token indices) that cannot be applied to the image it was sent with."""


@dataclass(frozen=True)
class KeepRatio:
    """Keep the top ceil(ratio * N) visual tokens (at least one)."""

    ratio: float

    def __post_init__(self) -> None:
        if not (0.0 < self.ratio <= 1.0) or math.isnan(self.ratio):
            raise ValueError(f"KeepRatio.ratio must lie in (0, 1], got {self.ratio!r}")

    @property
    def label(self) -> str:
        """Short name for reports, e.g. 'r=0.25'."""
        return f"r={self.ratio:g}"


@dataclass(frozen=True)
class MassThreshold:
    """Keep the smallest set of visual tokens whose normalized scores sum to at least tau."""

    tau: float

    def __post_init__(self) -> None:
        if not (0.0 < self.tau <= 1.0) or math.isnan(self.tau):
            raise ValueError(f"MassThreshold.tau must lie in (0, 1], got {self.tau!r}")

    @property
    def label(self) -> str:
        """Short name for reports, e.g. 'tau=0.94'."""
        return f"tau={self.tau:g}"


TokenBudget = KeepRatio | MassThreshold


@dataclass(frozen=True)
class Selection:
    """The outcome of a budgeted selection: sorted kept indices into the N visual tokens."""

    kept_indices: tuple[int, ...]
    visual_tokens_total: int

    @property
    def visual_tokens_kept(self) -> int:
        """How many visual tokens survive."""
        return len(self.kept_indices)

    @property
    def reduction_ratio(self) -> float:
        """Share of visual tokens pruned away: 1 - kept/total."""
        return 1.0 - self.visual_tokens_kept / self.visual_tokens_total


def budget_from_wire(budget: Budget) -> TokenBudget:
    """Map the wire ``Budget`` (kind, value) onto a selection budget."""
    if budget.kind == "keep_ratio":
        return KeepRatio(budget.value)
    if budget.kind == "mass_threshold":
        return MassThreshold(budget.value)
    raise ValueError(f"unknown budget kind {budget.kind!r}")


def keep_count_for_ratio(ratio: float, total: int) -> int:
    """ceil(ratio * total), clamped to [1, total]."""
    if total < 1:
        raise ValueError(f"visual_tokens_total must be >= 1, got {total}")
    return min(total, max(1, math.ceil(ratio * total - _RATIO_SLACK)))


def normalize_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scores -> a distribution over tokens (float64). All-zero scores become uniform.

    scores: (N,) non-negative and finite.
    """
    _check_scores(scores)
    scores = scores.detach().to(torch.float64)
    total = scores.sum()
    if total <= 0:
        return torch.full_like(scores, 1.0 / scores.numel())
    return scores / total


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Token indices from most to least important; ties go to the lower index. (N,) -> (N,) long."""
    _check_scores(scores)
    return torch.argsort(scores.detach().to(torch.float64), descending=True, stable=True)


def keep_count(budget: TokenBudget, scores: torch.Tensor) -> int:
    """How many tokens the budget keeps for these scores. scores: (N,)."""
    total = int(scores.numel())
    if isinstance(budget, KeepRatio):
        _check_scores(scores)
        return keep_count_for_ratio(budget.ratio, total)
    if isinstance(budget, MassThreshold):
        probabilities = normalize_scores(scores)
        cumulative = torch.cumsum(probabilities[ranking(scores)], dim=0)
        reached = torch.nonzero(cumulative >= budget.tau - _MASS_SLACK)
        return total if reached.numel() == 0 else min(total, int(reached[0, 0]) + 1)
    raise TypeError(f"unsupported budget {budget!r}")


def select(scores: torch.Tensor, budget: TokenBudget) -> Selection:
    """Select the visual tokens a budget keeps. scores: (N,) non-negative; returns sorted indices."""
    count = keep_count(budget, scores)
    kept = torch.sort(ranking(scores)[:count]).values
    return Selection(kept_indices=tuple(int(i) for i in kept), visual_tokens_total=int(scores.numel()))


def validate_kept_indices(kept_indices: Sequence[int], visual_tokens_total: int) -> tuple[int, ...]:
    """Check that a keep set is non-empty, strictly increasing and inside [0, total); return it."""
    if visual_tokens_total < 1:
        raise KeepSetError(f"visual_tokens_total must be >= 1, got {visual_tokens_total}")
    indices = tuple(int(i) for i in kept_indices)
    if not indices:
        raise KeepSetError("kept_indices is empty: at least one visual token must be kept")
    for position, (before, after) in enumerate(itertools.pairwise(indices)):
        if after == before:
            raise KeepSetError(f"kept_indices has a duplicate: {after} at positions {position}, {position + 1}")
        if after < before:
            raise KeepSetError(
                f"kept_indices must be sorted ascending: kept_indices[{position + 1}]={after} "
                f"follows {before}"
            )
    if indices[0] < 0 or indices[-1] >= visual_tokens_total:
        bad = indices[0] if indices[0] < 0 else indices[-1]
        raise KeepSetError(
            f"kept_indices value {bad} is out of range for an image with {visual_tokens_total} "
            f"visual tokens (valid: 0..{visual_tokens_total - 1})"
        )
    return indices


def keep_mask(kept_indices: Sequence[int], visual_tokens_total: int) -> torch.Tensor:
    """Validated keep set -> boolean mask over the N visual tokens. Returns (N,) bool."""
    indices = validate_kept_indices(kept_indices, visual_tokens_total)
    mask = torch.zeros(visual_tokens_total, dtype=torch.bool)
    mask[list(indices)] = True
    return mask


def _check_scores(scores: torch.Tensor) -> None:
    if scores.ndim != 1 or scores.numel() < 1:
        raise ValueError(f"scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite")
    if bool((scores < 0).any()):
        raise ValueError(f"scores must be non-negative, min is {float(scores.min())}")

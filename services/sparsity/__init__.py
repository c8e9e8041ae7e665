"""Visual-token pruning math, implemented once: scorers (``scorers``) and budgeted selection (``budgets``)."""

from services.sparsity.budgets import (
    KeepRatio,
    KeepSetError,
    MassThreshold,
    Selection,
    TokenBudget,
    budget_from_wire,
    keep_mask,
    select,
    validate_kept_indices,
)

__all__ = [
    "KeepRatio",
    "KeepSetError",
    "MassThreshold",
    "Selection",
    "TokenBudget",
    "budget_from_wire",
    "keep_mask",
    "select",
    "validate_kept_indices",
]

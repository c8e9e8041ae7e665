"""Which budget each of a group's G rollouts runs under (pure: no I/O, seeded)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from services.schemas import Budget


def assign_group_budgets(
    budget_set: Sequence[Budget],
    group_size: int,
    mode: Literal["round_robin", "sampled"],
    group_index: int,
    seed: int = 0,
) -> list[Budget]:
    """The G budgets of group number group_index.

    round_robin walks the budget set and starts each group where the previous one stopped, so that
    with G < len(budget_set) every budget still gets its share across groups. sampled draws G budgets
    uniformly (without replacement while the set is large enough), seeded by (seed, group_index) so
    that a replayed group gets the same budgets.
    """
    if not budget_set:
        raise ValueError("the budget set is empty")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if mode == "round_robin":
        offset = group_index * group_size
        return [budget_set[(offset + index) % len(budget_set)] for index in range(group_size)]
    if mode == "sampled":
        rng = random.Random(f"{seed}:{group_index}")
        if group_size <= len(budget_set):
            return rng.sample(list(budget_set), group_size)
        return [rng.choice(budget_set) for _ in range(group_size)]
    raise ValueError(f"unknown budget assignment mode {mode!r}")

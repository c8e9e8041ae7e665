"""Budget assignment within a group: coverage, rotation and determinism."""

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollout_worker.budgets import assign_group_budgets
from services.schemas import Budget

PAPER = [Budget(kind="mass_threshold", value=0.94 + 0.005 * index) for index in range(8)]
RATIOS = [Budget(kind="keep_ratio", value=value) for value in (1.0, 0.5, 0.25, 0.125)]


def test_round_robin_with_g_equal_to_set_size_gives_each_budget_once() -> None:
    assert assign_group_budgets(PAPER, 8, "round_robin", group_index=0) == PAPER
    assert assign_group_budgets(PAPER, 8, "round_robin", group_index=5) == PAPER


def test_round_robin_with_g_larger_repeats_the_set_evenly() -> None:
    budgets = assign_group_budgets(RATIOS, 8, "round_robin", group_index=0)
    assert Counter(budgets) == {budget: 2 for budget in RATIOS}


def test_round_robin_with_g_smaller_rotates_across_groups() -> None:
    first = assign_group_budgets(PAPER, 3, "round_robin", group_index=0)
    second = assign_group_budgets(PAPER, 3, "round_robin", group_index=1)
    assert first == PAPER[0:3] and second == PAPER[3:6]
    seen = Counter(b for g in range(8) for b in assign_group_budgets(PAPER, 3, "round_robin", group_index=g))
    assert set(seen.values()) == {3}  # 8 groups x 3 = 24 = 3 per budget


def test_sampled_is_seeded_and_without_replacement_when_possible() -> None:
    first = assign_group_budgets(PAPER, 4, "sampled", group_index=7, seed=1)
    assert first == assign_group_budgets(PAPER, 4, "sampled", group_index=7, seed=1)
    assert len(set(first)) == 4
    assert {tuple(assign_group_budgets(PAPER, 4, "sampled", group_index=g, seed=1)) for g in range(20)} != {
        tuple(first)
    }


@given(group_size=st.integers(1, 40), group_index=st.integers(0, 10_000), mode=st.sampled_from(["round_robin", "sampled"]))
def test_every_assignment_has_g_budgets_from_the_set(group_size: int, group_index: int, mode: str) -> None:
    budgets = assign_group_budgets(RATIOS, group_size, mode, group_index)
    assert len(budgets) == group_size and set(budgets) <= set(RATIOS)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        assign_group_budgets([], 4, "round_robin", 0)
    with pytest.raises(ValueError, match="group_size"):
        assign_group_budgets(PAPER, 0, "round_robin", 0)
    with pytest.raises(ValueError, match="mode"):
        assign_group_budgets(PAPER, 2, "zigzag", 0)


def test_group_ids_are_one_per_task_epoch_and_attempt() -> None:
    from rollout_worker.worker import group_id_for
    from services.schemas import Task, TaskMessage

    task = Task(id="task-1", image="i.png", question="q?", answer="a", answer_type="exact")
    first = TaskMessage(task=task, dataset_root="/data", epoch=2)
    assert group_id_for(first) == "task-1@e2"  # unchanged for first attempts: replays still deduplicate
    assert group_id_for(first.model_copy(update={"attempt": 1})) == "task-1@e2#a1"
    assert group_id_for(first.model_copy(update={"attempt": 1})) != group_id_for(first)

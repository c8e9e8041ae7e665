"""Pure batching helpers: padding, micro-batches (of groups and of tokens), whole-step row weights, per-group
advantages, rollout statistics."""

from __future__ import annotations

import pytest
import torch

from learner.algorithms import LossConfig, group_advantages, grpo_loss, row_token_weights
from learner.batching import (
    micro_batches,
    pad_rows,
    rollout_statistics,
    shared_prompt_micro_batches,
    step_advantages,
    token_micro_batches,
)
from learner.recorded import recorded_reward
from services.schemas import Budget, Rollout, Task, TrajectoryGroup

TASK = Task(id="t", image="i.png", question="q?", answer="3", answer_type="number")


def make_group(rewards: list[float], group_id: str = "g", kept: list[int] | None = None) -> TrajectoryGroup:
    rollouts = [
        Rollout(task_id="t", rollout_index=i, budget=Budget(kind="keep_ratio", value=1.0 if i % 2 else 0.5),
                prompt_token_ids=[1, 2], completion_token_ids=[5] * (i + 1), completion_logprobs=[-0.5] * (i + 1),
                completion_text="x", kept_indices=kept or [0, 1], visual_tokens_kept=len(kept or [0, 1]),
                visual_tokens_total=4, policy_version=0)
        for i in range(len(rewards))
    ]
    breakdowns = [recorded_reward(r > 0, 0.5).model_copy(update={"total": r}) for r in rewards]
    return TrajectoryGroup(group_id=group_id, task=TASK, rollouts=rollouts, rewards=breakdowns, policy_version=0,
                           worker_id="w")


def test_pad_rows_pads_right_masks_and_keeps_gradients() -> None:
    rows = [torch.tensor([1.0, 2.0], requires_grad=True), torch.zeros(0), torch.tensor([3.0])]
    padded, mask = pad_rows(rows, width=3)
    assert padded.tolist() == [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]]
    assert mask.tolist() == [[True, True, False], [False, False, False], [True, False, False]]
    padded.sum().backward()
    assert rows[0].grad.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="width=1"):
        pad_rows(rows, width=1)


def test_micro_batches_cover_every_group_once() -> None:
    assert micro_batches(5, 2) == [range(2), range(2, 4), range(4, 5)]
    assert micro_batches(0, 3) == []
    with pytest.raises(ValueError, match="groups_per_micro_batch"):
        micro_batches(3, 0)


def test_token_micro_batches_cover_every_row_once_longest_first_within_the_budget() -> None:
    assert token_micro_batches([3, 9, 5, 9, 1], 20) == [[1, 3], [2, 0, 4]]  # ties keep row order
    assert token_micro_batches([30, 4, 4], 10) == [[0], [1, 2]]  # too long for the budget: alone
    assert token_micro_batches([], 8) == []
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(0, 40, (int(torch.randint(1, 30, (1,), generator=generator)),),
                                generator=generator).tolist()
        max_tokens = int(torch.randint(1, 120, (1,), generator=generator))
        batches = token_micro_batches(lengths, max_tokens)
        assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
        flat = [lengths[index] for batch in batches for index in batch]
        assert flat == sorted(lengths, reverse=True)  # longest first, within and across micro-batches
        for batch in batches:
            longest = max(lengths[index] for index in batch)
            assert lengths[batch[0]] == longest
            assert len(batch) == 1 or len(batch) * longest <= max_tokens
    for max_tokens in (0, -3):
        with pytest.raises(ValueError, match="max_tokens"):
            token_micro_batches([1, 2], max_tokens)


# Row micro-batches: whole groups, groups cut in two, uneven sizes, a shuffled order, one row each.
ROW_SPLITS = {
    "whole groups": [range(4), range(4, 8), range(8, 12)],
    "cut groups": [range(3), range(3, 9), range(9, 12)],
    "uneven": [range(1), range(1, 11), range(11, 12)],
    "shuffled": [[7, 0, 11], [3, 5], [1, 2, 4, 6, 8, 9, 10]],
    "one row each": [[row] for row in range(12)],
}


@pytest.mark.parametrize("normalization", ["token_mean", "sequence_mean", "group_token_mean", "sum_over_max_len"])
@pytest.mark.parametrize("split", list(ROW_SPLITS))
def test_row_weighted_micro_batch_losses_add_up_to_the_whole_batch(normalization: str, split: str) -> None:
    generator = torch.Generator().manual_seed(0)
    num_groups, group_size, width = 3, 4, 6
    rows = num_groups * group_size
    logits = torch.randn(rows, width, generator=generator, requires_grad=True)
    old = torch.randn(rows, width, generator=generator).clamp(max=0) - 0.1
    ref = torch.randn(rows, width, generator=generator).clamp(max=0) - 0.1
    lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    lengths[5] = 0  # an empty completion
    mask = torch.arange(width)[None] < lengths[:, None]
    advantages = torch.randn(rows, generator=generator)
    config = LossConfig(normalization=normalization, max_completion_len=width, beta=0.1, tis_cap=None)

    whole = grpo_loss(-logits.exp(), old, advantages, mask, config, ref_logprobs=ref, group_size=group_size)
    (whole_grad,) = torch.autograd.grad(whole.loss, logits)

    group_index = torch.arange(rows) // group_size
    weights = row_token_weights(lengths, group_index, normalization, max_completion_len=width)
    parts = ROW_SPLITS[split]
    assert sorted(row for part in parts for row in part) == list(range(rows))
    total = torch.zeros(())
    for part in parts:
        index = torch.tensor(list(part))
        result = grpo_loss(-logits[index].exp(), old[index], advantages[index], mask[index], config,
                           ref_logprobs=ref[index], row_weights=weights[index])
        total = total + result.loss
    (parts_grad,) = torch.autograd.grad(total, logits)
    assert torch.allclose(total, whole.loss, atol=1e-6)
    assert torch.allclose(parts_grad, whole_grad, atol=1e-6)


def test_step_advantages_normalize_each_group_alone() -> None:
    groups = [make_group([1.0, 0.0, 1.0, 0.0], "a"), make_group([2.0, 2.0], "b"), make_group([0.0, 1.5, 3.0], "c")]
    advantages, keep, zero_variance = step_advantages(groups, std="unbiased", eps=1e-4, drop_zero_variance=True)
    assert advantages.shape == keep.shape == (9,)
    expected_a = group_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0]])).advantages
    assert torch.equal(advantages[:4], expected_a)
    assert advantages[4:6].tolist() == [0.0, 0.0] and keep.tolist() == [True] * 4 + [False] * 2 + [True] * 3
    assert zero_variance == 1
    assert advantages[6:].sum().abs() < 1e-6 and advantages[8] > 0


def test_rollout_statistics_split_accuracy_and_reduction_by_budget() -> None:
    stats = rollout_statistics([make_group([1.0, 0.0, 1.0, 0.0], kept=[0])])
    assert stats["accuracy_by_budget"] == {"r=0.5": 1.0, "r=1": 0.0}
    assert stats["reduction_ratio_by_budget"] == {"r=0.5": 0.75, "r=1": 0.75}
    assert stats["accuracy"] == 0.5 and stats["reward_total"] == 0.5 and stats["completion_length"] == 2.5


def test_shared_prompt_micro_batches_keep_units_together_and_split_the_long_ones() -> None:
    units = ["a", "b", "a", "c", "a", "b"]
    prompts = [10, 6, 10, 4, 10, 6]
    completions = [2, 3, 2, 1, 2, 3]
    # a: 10 + 2 + 2 + 2 = 16, b: 6 + 3 + 3 = 12, c: 5; 20 tokens take one unit of each length class.
    assert shared_prompt_micro_batches(units, prompts, completions, 20) == [[0, 2, 4], [1, 5], [3]]
    assert shared_prompt_micro_batches(units, prompts, completions, 40) == [[0, 2, 4, 1, 5], [3]]
    # 13 tokens: a prompt of a and two completions (14) do not fit, so a splits into three parts; b (12) fits.
    assert shared_prompt_micro_batches(units, prompts, completions, 13) == [[0], [2], [4], [1, 5], [3]]
    # One key per row: the rows' own micro-batches, as token_micro_batches cuts them.
    lengths = [p + c for p, c in zip(prompts, completions, strict=True)]
    assert shared_prompt_micro_batches(range(6), prompts, completions, 20) == token_micro_batches(lengths, 20)

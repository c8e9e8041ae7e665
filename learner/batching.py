"""Pure helpers that turn trajectory groups into what the loss needs: rewards, advantages, padded rows.

No model, no I/O. Rows are group-major: the rollouts of group 0, then those of group 1, and so on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from learner.algorithms import StdKind, group_advantages
from services.schemas import Rollout, TrajectoryGroup


def group_rewards(group: TrajectoryGroup) -> Tensor:
    """The group's total rewards as a (1, group_size) float32 tensor, in rollout order."""
    return torch.tensor([[reward.total for reward in group.rewards]], dtype=torch.float32)


def step_advantages(
    groups: Sequence[TrajectoryGroup], *, std: StdKind, eps: float, drop_zero_variance: bool
) -> tuple[Tensor, Tensor, int]:
    """Per-rollout advantages (rows,), keep mask (rows,) and the zero-variance group count.

    Each group is normalized on its own, so groups of different sizes may share a step.
    """
    advantages, keep, zero_variance = [], [], 0
    for group in groups:
        result = group_advantages(group_rewards(group), std=std, eps=eps, drop_zero_variance=drop_zero_variance)
        advantages.append(result.advantages)
        keep.append(result.keep)
        zero_variance += result.zero_variance_groups
    if not groups:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool), 0
    return torch.cat(advantages), torch.cat(keep), zero_variance


def pad_rows(rows: Sequence[Tensor], width: int | None = None) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D per-rollout tensors into (rows, width) and a bool mask of the real positions.

    Differentiable through the values; rows may be empty (an empty completion).
    """
    if not rows:
        raise ValueError("pad_rows needs at least one row")
    lengths = torch.tensor([row.numel() for row in rows])
    width = int(lengths.max()) if width is None else width
    if width < int(lengths.max()):
        raise ValueError(f"width={width} is shorter than the longest row ({int(lengths.max())})")
    padded = pad_sequence([row.reshape(-1) for row in rows], batch_first=True, padding_value=0.0)
    if padded.shape[1] < width:
        padded = torch.nn.functional.pad(padded, (0, width - padded.shape[1]))
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return padded, mask.to(padded.device)


def rollout_input_ids(rollout: Rollout) -> tuple[Tensor, int]:
    """(1, L) prompt+completion ids as the worker recorded them, and the completion length."""
    ids = rollout.prompt_token_ids + rollout.completion_token_ids
    return torch.tensor([ids], dtype=torch.long), len(rollout.completion_token_ids)


def micro_batches(num_groups: int, groups_per_micro_batch: int) -> list[range]:
    """Split group indices 0..num_groups-1 into consecutive chunks of whole groups."""
    if groups_per_micro_batch < 1:
        raise ValueError(f"groups_per_micro_batch must be >= 1, got {groups_per_micro_batch}")
    return [
        range(start, min(start + groups_per_micro_batch, num_groups))
        for start in range(0, num_groups, groups_per_micro_batch)
    ]


def token_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices cut into micro-batches of at most max_tokens padded tokens (rows x longest row), longest first.

    Sorting by length keeps the padding small; a row longer than max_tokens goes alone.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def shared_prompt_micro_batches(
    units: Sequence[Hashable], prompt_lengths: Sequence[int], completion_lengths: Sequence[int], max_tokens: int,
) -> list[list[int]]:
    """Row indices cut into micro-batches of at most max_tokens padded tokens, rows of one unit kept together.

    Rows with equal ``units`` keys share one batch row (their prompt once, then each completion), so a unit
    costs its prompt plus all its completions; a unit longer than max_tokens is split, one row at least a part.
    Give every row its own key for one batch row per rollout.
    """
    members: dict[Hashable, list[int]] = {}
    for index, unit in enumerate(units):
        members.setdefault(unit, []).append(index)
    parts: list[list[int]] = []
    lengths: list[int] = []  # each part's packed tokens: its prompt once plus its completions
    for rows in members.values():
        parts.append([])
        lengths.append(prompt_lengths[rows[0]])
        for index in rows:
            if parts[-1] and lengths[-1] + completion_lengths[index] > max_tokens:
                parts.append([])
                lengths.append(prompt_lengths[rows[0]])
            parts[-1].append(index)
            lengths[-1] += completion_lengths[index]
    return [[index for part in batch for index in parts[part]] for batch in token_micro_batches(lengths, max_tokens)]


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def rollout_statistics(groups: Sequence[TrajectoryGroup]) -> dict[str, object]:
    """Reward components, accuracy and reduction ratio (overall and per budget label) of the step's rollouts."""
    accuracy: dict[str, list[float]] = defaultdict(list)
    reduction: dict[str, list[float]] = defaultdict(list)
    totals, efficiency, formats, lengths = [], [], [], []
    for group in groups:
        for rollout, reward in zip(group.rollouts, group.rewards, strict=True):
            label = rollout.budget.label
            accuracy[label].append(reward.accuracy)
            reduction[label].append(rollout.reduction_ratio)
            totals.append(reward.total)
            efficiency.append(reward.efficiency)
            formats.append(reward.format)
            lengths.append(len(rollout.completion_token_ids))
    every_accuracy = [value for values in accuracy.values() for value in values]
    every_reduction = [value for values in reduction.values() for value in values]
    return {
        "reward_total": _mean(totals),
        "reward_accuracy": _mean(every_accuracy),
        "reward_efficiency": _mean(efficiency),
        "reward_format": _mean(formats),
        "accuracy": _mean(every_accuracy),
        "reduction_ratio": _mean(every_reduction),
        "completion_length": _mean(lengths),
        "accuracy_by_budget": {label: _mean(values) for label, values in sorted(accuracy.items())},
        "reduction_ratio_by_budget": {label: _mean(values) for label, values in sorted(reduction.items())},
    }

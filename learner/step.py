"""One GRPO optimizer step over a list of trajectory groups: recompute log-probs on the recorded keep sets,
take the loss from `learner.algorithms`, accumulate gradients over micro-batches, clip, step. No I/O.

Log-probs come from `pruned_completion_logprobs` on exactly the prompt ids, completion ids and kept visual
indices the worker recorded, so the trainer sees the sequence the rollout engine saw (DESIGN.md).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from learner.algorithms import LossConfig, StdKind, grpo_loss
from learner.batching import micro_batch_scale, micro_batches, pad_rows, rollout_input_ids, step_advantages
from services.modeling.pruned_forward import pruned_completion_logprobs
from services.schemas import Rollout, TrajectoryGroup

PixelInputs = tuple[Tensor, Tensor]  # pixel_values (patches, C*T*P*P), image_grid_thw (1, 3)

# Token-weighted means: each micro-batch contributes in proportion to its valid tokens.
_TOKEN_MEANS = ("kl_mean", "ratio_mean", "clip_frac_low", "clip_frac_high", "dual_clip_frac",
                "logprob_diff_mean", "is_ratio_mean", "is_truncated_frac")


@dataclass(frozen=True)
class StepConfig:
    """Knobs of one step besides the loss's own."""

    loss: LossConfig
    micro_batch_groups: int = 2
    grad_clip: float = 1.0
    adv_std: StdKind = "unbiased"
    adv_eps: float = 1e-4
    drop_zero_variance: bool = False
    old_logprobs: str = "recompute"  # "recompute": ratio vs the trainer's own log-probs (+TIS); "rollout"


class PixelCache:
    """Pixel inputs per task id (the G rollouts of a group share one image), least recently used dropped."""

    def __init__(self, make: Callable[[TrajectoryGroup], PixelInputs], capacity: int = 256) -> None:
        self.make = make
        self.capacity = capacity
        self._entries: OrderedDict[str, PixelInputs] = OrderedDict()

    def get(self, group: TrajectoryGroup) -> PixelInputs:
        """The group's pixel inputs, computed once per task id."""
        key = group.task.id
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = self.make(group)
        self._entries[key] = value
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return value


def rollout_logprobs(model: torch.nn.Module, rollout: Rollout, pixels: PixelInputs) -> Tensor:
    """(completion_len,) float32 log-probs of the recorded completion under `model` on the recorded keep set."""
    device = pixels[0].device
    if not rollout.completion_token_ids:
        return torch.zeros(0, device=device)
    input_ids, completion_length = rollout_input_ids(rollout)
    return pruned_completion_logprobs(
        model, input_ids.to(device), pixels[0], pixels[1], rollout.kept_indices, completion_length
    )


def _micro_batch_loss(
    policy: torch.nn.Module, reference: torch.nn.Module | None, rows: Sequence[tuple[Rollout, PixelInputs]],
    advantages: Tensor, config: StepConfig, *, group_size: int | None, total_tokens: float,
) -> Any:
    """LossResult of one micro-batch (loss with grad)."""
    logprobs, mask = pad_rows([rollout_logprobs(policy, rollout, pixels) for rollout, pixels in rows])
    width, device = logprobs.shape[1], logprobs.device
    recorded = [torch.tensor(rollout.completion_logprobs, dtype=torch.float32, device=device) for rollout, _ in rows]
    rollout_lp, _ = pad_rows(recorded, width)
    ref_lp = None
    if reference is not None and config.loss.beta > 0:
        with torch.no_grad():
            ref_lp, _ = pad_rows([rollout_logprobs(reference, rollout, pixels) for rollout, pixels in rows], width)
    recompute = config.old_logprobs == "recompute"
    # With one update per batch, the trainer's own pre-update log-probs are its current ones, detached
    # (TRL/verl with num_iterations=1); TIS then corrects for the engine/staleness gap.
    old = logprobs.detach() if recompute else rollout_lp
    return grpo_loss(
        logprobs, old, advantages.to(device), mask, config.loss, ref_logprobs=ref_lp,
        rollout_logprobs=rollout_lp if recompute else None, group_size=group_size, total_tokens=total_tokens,
    )


def all_reduce_step(params: Sequence[torch.nn.Parameter], sums: dict[str, float], maxima: dict[str, float]) -> None:
    """Sum gradients and metric parts over the process group (in place); maxima take the max."""
    import torch.distributed as dist

    # A parameter no rank touched keeps grad None, as in one process (AdamW then skips it, weight decay too).
    touched = torch.tensor([param.grad is not None for param in params], dtype=torch.uint8)
    dist.all_reduce(touched, op=dist.ReduceOp.MAX)
    for param, any_rank in zip(params, touched.tolist(), strict=True):
        if not any_rank:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
    names = sorted(sums)
    packed = torch.tensor([sums[name] for name in names], dtype=torch.float64)
    dist.all_reduce(packed)
    sums.update(zip(names, packed.tolist(), strict=True))
    names = sorted(maxima)
    packed = torch.tensor([maxima[name] for name in names], dtype=torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    maxima.update(zip(names, packed.tolist(), strict=True))


def grpo_step(
    policy: torch.nn.Module, reference: torch.nn.Module | None, optimizer: torch.optim.Optimizer, scheduler: Any,
    groups: Sequence[TrajectoryGroup], pixels: PixelCache, config: StepConfig, *, rank: int = 0, world_size: int = 1,
) -> dict[str, float]:
    """Advantages -> per-micro-batch loss and backward -> clip -> optimizer and scheduler step; returns metrics.

    With world_size > 1 (torch.distributed initialized), rank r takes micro-batches r, r+W, ...; every loss is
    already scaled by whole-step totals, so summing gradients over ranks gives the single-process gradient,
    and every rank then takes the same optimizer step.
    """
    advantages, keep, zero_variance = step_advantages(
        groups, std=config.adv_std, eps=config.adv_eps, drop_zero_variance=config.drop_zero_variance
    )
    offsets = [0]
    for group in groups:
        offsets.append(offsets[-1] + len(group.rollouts))
    kept_rows = [i for i in range(offsets[-1]) if bool(keep[i])]
    total_rows = max(len(kept_rows), 1)
    kept_groups = [g for g in range(len(groups)) if keep[offsets[g]:offsets[g + 1]].any()]
    flat = [rollout for group in groups for rollout in group.rollouts]
    total_tokens = float(sum(len(flat[i].completion_token_ids) for i in kept_rows))
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {"loss": 0.0, "policy_loss": 0.0, "kl_penalty": 0.0}
    means: dict[str, float] = dict.fromkeys(_TOKEN_MEANS, 0.0)
    maxima: dict[str, float] = dict.fromkeys(("logprob_diff_max", "is_ratio_max"), float("-inf"))
    present: dict[str, float] = dict.fromkeys(_TOKEN_MEANS, 0.0)  # which optional diagnostics the loss gave
    for chunk in micro_batches(len(kept_groups), config.micro_batch_groups)[rank::world_size]:
        chunk_groups = [kept_groups[i] for i in chunk]
        rows, row_ids = [], []
        for g in chunk_groups:
            for i, rollout in enumerate(groups[g].rollouts):
                if bool(keep[offsets[g] + i]):
                    rows.append((rollout, pixels.get(groups[g])))
                    row_ids.append(offsets[g] + i)
        tokens = sum(len(rollout.completion_token_ids) for rollout, _ in rows)
        if tokens == 0:
            continue
        sizes = {len(groups[g].rollouts) for g in chunk_groups}
        group_size = sizes.pop() if len(sizes) == 1 else None
        result = _micro_batch_loss(
            policy, reference, rows, advantages[row_ids], config, group_size=group_size, total_tokens=total_tokens
        )
        scale = micro_batch_scale(config.loss.normalization, len(rows), total_rows, len(chunk), len(kept_groups))
        (result.loss * scale).backward()
        for name in sums:
            sums[name] += float(getattr(result, name).detach()) * scale
        for name in _TOKEN_MEANS:
            value = getattr(result, name)
            if value is not None:
                means[name] += float(value) * tokens / max(total_tokens, 1.0)
                present[name] = 1.0
        for name, so_far in maxima.items():
            if getattr(result, name) is not None:
                maxima[name] = max(so_far, float(getattr(result, name)))
    params = [p for p in policy.parameters() if p.requires_grad]
    if world_size > 1:
        flags = {f"present:{name}": value for name, value in present.items()}
        merged = {**sums, **means, **flags}
        all_reduce_step(params, merged, maxima)
        sums = {name: merged[name] for name in sums}
        present = {name: merged[f"present:{name}"] for name in present}
        means = {name: value for name, value in merged.items() if name in means}
    means = {name: value for name, value in means.items() if present[name] > 0}
    maxima = {name: value for name, value in maxima.items() if value > float("-inf")}
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
    finite = torch.isfinite(torch.tensor(grad_norm)) and all(torch.isfinite(torch.tensor(v)) for v in sums.values())
    if finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)  # never let a NaN/inf update reach the weights
    lr = float(optimizer.param_groups[0]["lr"])
    scheduler.step()
    return {
        **sums, **means, **maxima, "grad_norm": grad_norm, "lr": lr, "skipped_nonfinite": float(not finite),
        "clip_fraction": means.get("clip_frac_low", 0.0) + means.get("clip_frac_high", 0.0),
        "zero_variance_groups": float(zero_variance), "rows": float(len(kept_rows)), "tokens": total_tokens,
        "groups": float(len(groups)), "advantage_abs_mean": float(advantages.abs().mean()) if len(advantages) else 0.0,
    }

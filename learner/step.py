"""One GRPO optimizer step over a list of trajectory groups: recompute log-probs on the recorded keep sets,
take the loss from `learner.algorithms`, accumulate gradients over micro-batches, clip, step. No I/O.

Log-probs come from `pruned_completion_logprobs` on exactly the prompt ids, completion ids and kept visual
indices the worker recorded, so the trainer sees the sequence the rollout engine saw (DESIGN.md).
With `kept_mass_weight > 0` each group also adds `kept_mass_loss`: the workers' scorer is rerun with autograd
on the group's unpruned prompt, and the share of its scores on each above-average rollout's keep set is raised.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from learner.algorithms import LossConfig, StdKind, grpo_loss, kept_mass_loss
from learner.batching import micro_batch_scale, micro_batches, pad_rows, rollout_input_ids, step_advantages
from services.modeling.pruned_forward import (
    expand_placeholders,
    image_features,
    image_token_id,
    pruned_completion_logprobs,
    visual_tokens_per_image,
)
from services.schemas import Rollout, TrajectoryGroup
from services.sparsity.budgets import keep_mask
from services.sparsity.scorers import ScorerInputs, VisualTokenScorer

PixelInputs = tuple[Tensor, Tensor]  # pixel_values (patches, C*T*P*P), image_grid_thw (1, 3)

_LOSS_PARTS = ("loss", "policy_loss", "kl_penalty")  # step sums of LossResult fields (loss excludes kept mass)
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
    kept_mass_weight: float = 0.0  # weight of learner.algorithms.kept_mass_loss; needs `scorer`
    scorer: VisualTokenScorer | None = None  # the workers' scorer, run with autograd for the kept-mass term

    def __post_init__(self) -> None:
        if self.kept_mass_weight < 0:
            raise ValueError(f"kept_mass_weight must be >= 0, got {self.kept_mass_weight}")
        if self.kept_mass_weight > 0 and self.scorer is None:
            raise ValueError("kept_mass_weight > 0 needs the scorer the rollout workers use")


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


def group_kept_mass_loss(
    policy: torch.nn.Module, scorer: VisualTokenScorer, group: TrajectoryGroup, pixels: PixelInputs,
    advantages: Tensor, keep: Tensor,
) -> tuple[Tensor, Tensor]:
    """kept_mass_loss of one group's admitted rollouts, scored on the unpruned prompt by the current policy."""
    rollouts = [rollout for rollout, admitted in zip(group.rollouts, keep.tolist(), strict=True) if admitted]
    total = sum(visual_tokens_per_image(policy, pixels[1]))
    prompt = torch.tensor([rollouts[0].prompt_token_ids], dtype=torch.long, device=pixels[0].device)
    with torch.no_grad():
        # The term shapes where layers <= K look, not what the vision tower sees: its features stay the ones
        # the policy loss trains (with them trainable here, test accuracy fell 2.5 points in the demo).
        features = image_features(policy, pixels[0], pixels[1])
    ids = expand_placeholders(prompt, image_token_id(policy), total)
    inputs = ScorerInputs(ids, pixels[0], pixels[1], image_embeds=features)
    scores = scorer.differentiable_score(policy, inputs)
    masks = torch.stack([keep_mask(rollout.kept_indices, total) for rollout in rollouts]).to(scores.device)
    return kept_mass_loss(scores, masks, advantages[keep].to(scores.device))


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
    sums: dict[str, float] = dict.fromkeys(_LOSS_PARTS, 0.0)
    if config.kept_mass_weight > 0:
        sums.update(kept_mass_loss=0.0, kept_share=0.0)
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
        loss = result.loss * scale
        if config.kept_mass_weight > 0 and config.scorer is not None:
            for g in chunk_groups:
                span = slice(offsets[g], offsets[g + 1])
                if not bool((advantages[span][keep[span]] > 0).any()):
                    continue  # no above-average rollout: the term is exactly zero, skip the scorer pass
                mass_loss, kept_share = group_kept_mass_loss(
                    policy, config.scorer, groups[g], pixels.get(groups[g]), advantages[span], keep[span]
                )
                loss = loss + config.kept_mass_weight * mass_loss / len(kept_groups)
                sums["kept_mass_loss"] += float(mass_loss.detach()) / len(kept_groups)
                sums["kept_share"] += float(kept_share) / len(kept_groups)
        loss.backward()
        for name in _LOSS_PARTS:
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

"""One GRPO optimizer step over a list of trajectory groups: recompute log-probs on the recorded keep sets,
take the loss from `learner.algorithms`, accumulate gradients over micro-batches, clip, step. No I/O.

The order of work (docs/architecture.md, "The learner's step"):

    for each vision chunk (micro_batch_groups groups; rank r takes chunks r, r+W, ...):
        the policy's features of the chunk's images, once, with grad -> a detached leaf;
        the reference's features of the same images, once, without grad
        for each micro-batch of at most micro_batch_tokens padded tokens of the chunk's rows, longest first:
            plan on the CPU -> one batched policy pass and one batched reference pass -> grpo_loss -> backward
            (the LLM's gradients land in the parameters, the features' in the leaf)
        the kept-set term per group (the scorer on the unpruned prompt, features detached)
        one backward through the vision tower with the leaf's accumulated gradient

The gradient through shared features is the sum of the per-rollout gradients, so this is the same step as
scoring each rollout on its own (`forward="per_rollout"`, kept as the baseline the tests and bench compare with).
Every row's loss weight comes from the whole step (`row_token_weights`), so micro-batches may cut groups.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from learner.algorithms import LossConfig, StdKind, grpo_loss, kept_mass_loss, row_token_weights
from learner.batching import (
    micro_batches,
    pad_rows,
    rollout_input_ids,
    shared_prompt_micro_batches,
    step_advantages,
)
from learner.sharding import collective_device, grad_norm_value, sum_gradients
from services.modeling.batched_forward import (
    BatchPlan,
    RowSpec,
    batched_completion_logprobs,
    plan_batch,
    shared_prompts_supported,
)
from services.modeling.pruned_forward import (
    expand_placeholders,
    image_features,
    image_token_id,
    placeholder_token_id,
    pruned_completion_logprobs,
    visual_tokens_per_image,
)
from services.schemas import Rollout, TrajectoryGroup
from services.sparsity.budgets import keep_mask
from services.sparsity.scorers import ScorerInputs, VisualTokenScorer

# pixel_values (patches, C*T*P*P), image_grid_thw (1, 3), both on the CPU; a video adds a third element, the seconds
# one temporal slot spans (its frames' pixel values and video grid take the image's place).
PixelInputs = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, float]


def video_seconds(pixels: PixelInputs) -> float | None:
    """The seconds per temporal slot of a video's pixel inputs; None for an image's."""
    return float(pixels[2]) if len(pixels) > 2 else None

_LOSS_PARTS = ("loss", "policy_loss", "kl_penalty")  # step sums of LossResult fields (loss excludes kept mass)
# Token-weighted means: each micro-batch contributes in proportion to its valid tokens.
_TOKEN_MEANS = ("kl_mean", "ratio_mean", "clip_frac_low", "clip_frac_high", "dual_clip_frac",
                "logprob_diff_mean", "is_ratio_mean", "is_truncated_frac")
_MAXIMA = ("logprob_diff_max", "is_ratio_max")


@dataclass(frozen=True)
class StepConfig:
    """Knobs of one step besides the loss's own."""

    loss: LossConfig
    micro_batch_groups: int = 2  # groups whose images go through the vision tower together
    micro_batch_tokens: int = 16_384  # padded tokens (rows x longest row) per LLM forward/backward
    grad_clip: float = 1.0
    adv_std: StdKind = "unbiased"
    adv_eps: float = 1e-4
    drop_zero_variance: bool = False
    old_logprobs: str = "recompute"  # "recompute": ratio vs the trainer's own log-probs (+TIS); "rollout"
    kept_mass_weight: float = 0.0  # weight of learner.algorithms.kept_mass_loss; needs `scorer`
    scorer: VisualTokenScorer | None = None  # the workers' scorer, run with autograd for the kept-mass term
    compute_dtype: torch.dtype | None = None  # autocast dtype over higher-precision (master) weights; None: off
    forward: Literal["batched", "per_rollout"] = "batched"  # per_rollout: the baseline, one rollout at a time
    # Run the frozen reference's passes on a second thread while this one runs the policy's (batched forward):
    # on a CPU with a core to spare they overlap; on a GPU both queue on one stream, so there is nothing to gain.
    reference_overlap: bool = False
    # Rollouts of a group with one keep set share one batch row: their pruned prompt once, then each completion
    # (services.modeling.batched_forward). Off by itself where the decoder's attention takes no custom mask.
    share_prompts: bool = True

    def __post_init__(self) -> None:
        if self.kept_mass_weight < 0:
            raise ValueError(f"kept_mass_weight must be >= 0, got {self.kept_mass_weight}")
        if self.kept_mass_weight > 0 and self.scorer is None:
            raise ValueError("kept_mass_weight > 0 needs the scorer the rollout workers use")
        if self.micro_batch_tokens < 1 or self.micro_batch_groups < 1:
            raise ValueError(f"micro-batch sizes must be >= 1, got {self.micro_batch_groups} groups, "
                             f"{self.micro_batch_tokens} tokens")
        if self.forward not in ("batched", "per_rollout"):
            raise ValueError(f"forward must be 'batched' or 'per_rollout', got {self.forward!r}")


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


def pruned_length(rollout: Rollout, placeholder_ids: int | tuple[int, ...]) -> int:
    """Tokens of the rollout's pruned sequence: prompt text, kept visual tokens, completion."""
    ids = placeholder_ids if isinstance(placeholder_ids, tuple) else (placeholder_ids,)
    placeholders = sum(rollout.prompt_token_ids.count(placeholder_id) for placeholder_id in ids)
    return (len(rollout.prompt_token_ids) - placeholders + len(rollout.kept_indices)
            + len(rollout.completion_token_ids))


def rollout_logprobs(model: torch.nn.Module, rollout: Rollout, pixels: PixelInputs) -> Tensor:
    """(completion_len,) float32 log-probs of one rollout on its own (vision tower included): the baseline path."""
    device = next(model.parameters()).device
    if not rollout.completion_token_ids:
        return torch.zeros(0, device=device)
    input_ids, completion_length = rollout_input_ids(rollout)
    return pruned_completion_logprobs(
        model, input_ids.to(device), pixels[0].to(device), pixels[1].to(device), rollout.kept_indices,
        completion_length, video_seconds(pixels),
    )


@dataclass
class _Row:
    """One admitted rollout of the step: where it sits and what it needs."""

    index: int  # row index in the step (group-major)
    group: int  # group index in the step
    image: int  # image index within its vision chunk
    rollout: Rollout
    pixels: PixelInputs


@dataclass
class _Chunk:
    """Images of a vision chunk on the device, and the features the chunk's rows read."""

    pixel_values: Tensor
    image_grid_thw: Tensor  # on the device
    grids_cpu: Tensor
    policy_features: Tensor | None = None  # with grad (the vision tower's output)
    policy_leaf: Tensor | None = None  # detached copy that collects the LLM's gradient
    reference_features: Tensor | None = None
    offsets: list[int] = field(default_factory=list)  # first feature row of each image
    seconds: list[float | None] = field(default_factory=list)  # per image: None, or a video's seconds per slot


@dataclass
class _Totals:
    """Step metrics as device tensors: one host read at the end of the step, none per micro-batch."""

    sums: dict[str, Tensor]
    means: dict[str, Tensor]
    maxima: dict[str, Tensor]
    present: set[str] = field(default_factory=set)

    @classmethod
    def zeros(cls, device: torch.device, extra_sums: Sequence[str]) -> _Totals:
        """Empty totals on the device, with extra summed parts (the kept-set term's)."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return cls(sums={name: zero.clone() for name in (*_LOSS_PARTS, *extra_sums)},
                   means={name: zero.clone() for name in _TOKEN_MEANS},
                   maxima={name: torch.full((), float("-inf"), dtype=torch.float64, device=device)
                           for name in _MAXIMA})

    def add(self, result: Any, token_share: float) -> None:
        """Fold one micro-batch's LossResult in; token means weigh by the micro-batch's share of tokens."""
        for name in _LOSS_PARTS:
            self.sums[name] += getattr(result, name).detach()
        for name in _TOKEN_MEANS:
            value = getattr(result, name)
            if value is not None:
                self.means[name] += value.detach() * token_share
                self.present.add(name)
        for name in _MAXIMA:
            value = getattr(result, name)
            if value is not None:
                self.maxima[name] = torch.maximum(self.maxima[name], value.detach().double())

    def to_floats(self) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """(sums, means, maxima) as floats, read from the device in one transfer."""
        names = [*self.sums, *self.means, *self.maxima]
        values = torch.stack([*self.sums.values(), *self.means.values(), *self.maxima.values()]).tolist()
        merged = dict(zip(names, values, strict=True))
        return ({name: merged[name] for name in self.sums}, {name: merged[name] for name in self.means},
                {name: merged[name] for name in self.maxima})


def _autocast(device: torch.device, dtype: torch.dtype | None, param_dtype: torch.dtype) -> Any:
    """bf16/fp16 compute over higher-precision weights, or nothing when the dtypes agree."""
    if dtype is None or dtype == param_dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _chunk_inputs(
    policy: torch.nn.Module, rows: Sequence[_Row], group_ids: Sequence[int], device: torch.device
) -> _Chunk:
    """Concatenate the chunk's images (one per group, in group order) and move them to the device."""
    first = {row.group: row for row in reversed(rows)}
    pixel_values = torch.cat([first[g].pixels[0] for g in group_ids]).to(device, non_blocking=True)
    grids = torch.cat([first[g].pixels[1] for g in group_ids]).cpu()
    offsets = [0, *itertools.accumulate(visual_tokens_per_image(policy, grids))]
    return _Chunk(pixel_values, grids.to(device, non_blocking=True), grids, offsets=offsets,
                  seconds=[video_seconds(first[g].pixels) for g in group_ids])


def _chunk_features(
    policy: torch.nn.Module, reference: torch.nn.Module | None, chunk: _Chunk, config: StepConfig
) -> None:
    """Run each vision tower once over the chunk's images (the policy's with grad when the rows read them; the
    reference's when it is given: None when its passes run on the overlap thread)."""
    if config.forward == "per_rollout":  # rows run their own vision passes; the kept-set term reads these
        with torch.no_grad():
            chunk.policy_leaf = image_features(policy, chunk.pixel_values, chunk.image_grid_thw)
        return
    chunk.policy_features = image_features(policy, chunk.pixel_values, chunk.image_grid_thw)
    chunk.policy_leaf = chunk.policy_features.detach().requires_grad_(True)
    if reference is not None and config.loss.beta > 0:
        with torch.no_grad():
            chunk.reference_features = image_features(reference, chunk.pixel_values, chunk.image_grid_thw)


def _row_specs(rows: Sequence[_Row]) -> list[RowSpec]:
    """What plan_batch needs of each row."""
    return [RowSpec(row.rollout.prompt_token_ids, row.rollout.completion_token_ids, row.rollout.kept_indices,
                    row.image) for row in rows]


def _reference_passes(
    pool: ThreadPoolExecutor, reference: torch.nn.Module, chunk: _Chunk, plans: Sequence[BatchPlan], autocast: Any,
) -> list[Future[Tensor]]:
    """The reference's vision pass and its log-probs for each planned micro-batch, queued in order on `pool`'s
    one thread. Grad mode and autocast are per thread, so each task sets its own."""
    def features() -> Tensor:
        with torch.no_grad(), autocast():
            return image_features(reference, chunk.pixel_values, chunk.image_grid_thw)

    features_done = pool.submit(features)

    def logprobs(plan: BatchPlan) -> Tensor:
        with torch.no_grad(), autocast():
            return batched_completion_logprobs(reference, plan, features_done.result())

    return [pool.submit(logprobs, plan) for plan in plans]


def _micro_batch_logprobs(
    policy: torch.nn.Module, reference: torch.nn.Module | None, rows: Sequence[_Row], chunk: _Chunk,
    config: StepConfig, plan: BatchPlan | None = None, reference_done: Future[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(B, C) policy log-probs with grad, the (B, C) mask and the reference's log-probs (or None); `plan` and
    `reference_done` when the micro-batch was planned ahead and its reference pass runs on the overlap thread."""
    device = chunk.pixel_values.device
    use_reference = reference is not None and config.loss.beta > 0
    if config.forward == "per_rollout":
        logprobs, mask = pad_rows([rollout_logprobs(policy, row.rollout, row.pixels) for row in rows])
        ref = None
        if use_reference:
            with torch.no_grad():
                ref, _ = pad_rows([rollout_logprobs(reference, row.rollout, row.pixels) for row in rows],
                                  logprobs.shape[1])
        return logprobs, mask.to(device), ref
    if plan is None:
        plan = plan_batch(policy, _row_specs(rows), chunk.grids_cpu, chunk.seconds, config.share_prompts).to(device)
    logprobs = batched_completion_logprobs(policy, plan, chunk.policy_leaf)
    ref = None
    if reference_done is not None:
        ref = reference_done.result()
    elif use_reference:
        with torch.no_grad():
            ref = batched_completion_logprobs(reference, plan, chunk.reference_features)
    return logprobs, plan.completion_mask, ref


def _scorer_inputs(policy: torch.nn.Module, prompt_token_ids: Sequence[int], chunk: _Chunk, image: int) -> ScorerInputs:
    """The scorer's inputs for one image of the chunk: the unpruned prompt and the image's detached features."""
    start, end = chunk.offsets[image], chunk.offsets[image + 1]
    # The term shapes where layers <= K look, not what the vision tower sees: its features stay the ones the
    # policy loss trains (with them trainable here, test accuracy fell 2.5 points in the demo).
    features = chunk.policy_leaf[start:end].detach()
    seconds = chunk.seconds[image] if chunk.seconds else None
    placeholder = placeholder_token_id(policy, video=seconds is not None)
    prompt = expand_placeholders(torch.tensor([list(prompt_token_ids)]), placeholder, end - start)
    patch_count = int(chunk.grids_cpu[image].prod())
    first_patch = int(chunk.grids_cpu[:image].prod(-1).sum())
    return ScorerInputs(prompt.to(features.device), chunk.pixel_values[first_patch:first_patch + patch_count],
                        chunk.image_grid_thw[image:image + 1], image_embeds=features, video_seconds_per_grid=seconds)


def group_kept_mass_loss(
    policy: torch.nn.Module, scorer: VisualTokenScorer, group: TrajectoryGroup, chunk: _Chunk, image: int,
    advantages: Tensor, keep: Tensor,
) -> tuple[Tensor, Tensor]:
    """kept_mass_loss of one group's admitted rollouts, scored on the unpruned prompt by the current policy."""
    rollouts = [rollout for rollout, admitted in zip(group.rollouts, keep.tolist(), strict=True) if admitted]
    inputs = _scorer_inputs(policy, rollouts[0].prompt_token_ids, chunk, image)
    scores = scorer.differentiable_score(policy, inputs)
    total = chunk.offsets[image + 1] - chunk.offsets[image]
    masks = torch.stack([keep_mask(rollout.kept_indices, total) for rollout in rollouts]).to(scores.device)
    return kept_mass_loss(scores, masks, advantages[keep].to(scores.device))


def all_reduce_metrics(sums: dict[str, float], maxima: dict[str, float]) -> None:
    """Sum the step's metric parts over the process group (in place); maxima take the max. Gradients are not
    here: the sharded policy's units reduce-scatter them in their backward (learner.sharding)."""
    import torch.distributed as dist

    device = collective_device()
    names = sorted(sums)
    packed = torch.tensor([sums[name] for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    sums.update(zip(names, packed.tolist(), strict=True))
    names = sorted(maxima)
    packed = torch.tensor([maxima[name] for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    maxima.update(zip(names, packed.tolist(), strict=True))


def _step_rows(groups: Sequence[TrajectoryGroup], keep: Tensor, pixels: PixelCache) -> list[_Row]:
    rows, index = [], 0
    admitted = keep.tolist()
    for g, group in enumerate(groups):
        for rollout in group.rollouts:
            if admitted[index]:
                rows.append(_Row(index=index, group=g, image=-1, rollout=rollout, pixels=pixels.get(group)))
            index += 1
    return rows


@dataclass
class _ChunkPlan:
    """One vision chunk's work, planned on the CPU before any pass runs."""

    rows: list[_Row]
    groups: list[int]  # the chunk's group ids, in image order
    micro_batches: list[list[int]]  # indices into rows, each batch with completion tokens
    mass_images: list[int] = field(default_factory=list)  # images whose kept-set term needs a scorer pass
    full_keep_images: list[int] = field(default_factory=list)  # kept-set term exactly 0: whole image kept
    filler: bool = False  # run only to keep a sharded step's collectives in lockstep: zero weight, no metrics


def _plan_chunks(
    rows: Sequence[_Row], groups: Sequence[TrajectoryGroup], advantages: Tensor, keep: Tensor, config: StepConfig,
    placeholder: int | tuple[int, ...],
) -> list[_ChunkPlan]:
    """Every vision chunk of the step (micro_batch_groups groups each), every row tagged with its image."""
    group_ids = sorted({row.group for row in rows})
    offsets = [0, *itertools.accumulate(len(group.rollouts) for group in groups)]
    plans = []
    for chunk in micro_batches(len(group_ids), config.micro_batch_groups):
        image_of = {group_ids[i]: image for image, i in enumerate(chunk)}
        chunk_rows = [row for row in rows if row.group in image_of]
        for row in chunk_rows:
            row.image = image_of[row.group]
        completions = [len(row.rollout.completion_token_ids) for row in chunk_rows]
        prompts = [pruned_length(row.rollout, placeholder) - length for row, length in zip(chunk_rows, completions)]
        # A group's rollouts with one keep set ran one pruned prompt (plan_batch checks it before sharing a row).
        units = [(row.group, tuple(row.rollout.kept_indices)) if config.share_prompts else row.index
                 for row in chunk_rows]
        batches = [indices for indices in shared_prompt_micro_batches(units, prompts, completions,
                                                                       config.micro_batch_tokens)
                   if sum(completions[i] for i in indices) > 0]
        plan = _ChunkPlan(chunk_rows, [group_ids[i] for i in chunk], batches)
        if config.kept_mass_weight > 0 and config.scorer is not None:
            for image, g in enumerate(plan.groups):
                span = slice(offsets[g], offsets[g + 1])
                if not bool((advantages[span][keep[span]] > 0).any()):
                    continue  # no above-average rollout: the term is exactly zero, skip the scorer pass
                admitted = [r for r, kept in zip(groups[g].rollouts, keep[span].tolist(), strict=True) if kept]
                # Every keep set the whole image: each share is exactly 1, so the loss and its gradient are 0.
                full = all(len(r.kept_indices) == r.visual_tokens_total for r in admitted)
                (plan.full_keep_images if full else plan.mass_images).append(image)
        plans.append(plan)
    return plans


def _rank_slots(plans: list[_ChunkPlan], rank: int, world_size: int) -> list[tuple[_ChunkPlan, int, int]]:
    """This rank's chunks r, r+W, ... as (plan, micro-batches, scorer passes) to run.

    With W > 1 every rank runs as many chunks, and in each as many micro-batches and scorer passes, as the rank
    with the most (``lockstep_counts``): a sharded unit's forward and backward are collectives. A rank short of a
    chunk runs rank 0's chunk of that slot as a filler.
    """
    if world_size == 1:
        return [(plan, len(plan.micro_batches), len(plan.mass_images)) for plan in plans]
    from learner.sharding import lockstep_counts

    slots = -(-len(plans) // world_size)
    mine = [plans[i] if i < len(plans) else None for i in range(rank, slots * world_size, world_size)]
    counts = lockstep_counts([[len(p.micro_batches), len(p.mass_images)] if p else [0, 0] for p in mine])
    return [(plan or dataclasses.replace(plans[slot * world_size], filler=True), micro, mass)
            for slot, (plan, (micro, mass)) in enumerate(zip(mine, counts, strict=True))]


def grpo_step(
    policy: torch.nn.Module, reference: torch.nn.Module | None, optimizer: torch.optim.Optimizer, scheduler: Any,
    groups: Sequence[TrajectoryGroup], pixels: PixelCache, config: StepConfig, *, rank: int = 0, world_size: int = 1,
) -> dict[str, float]:
    """Advantages -> per-micro-batch loss and backward -> clip -> optimizer and scheduler step; returns metrics.

    With world_size > 1 (torch.distributed initialized, the policy sharded by ``learner.sharding.shard_policy``),
    rank r takes vision chunks r, r+W, ...; every row's loss weight comes from the whole step, so the gradients
    the units reduce-scatter (summed over ranks) are the single-process gradient, and each rank steps its shards.
    """
    if world_size > 1:
        from learner.sharding import is_sharded

        if not is_sharded(policy):
            raise ValueError(f"world_size={world_size} needs a policy sharded by learner.sharding.shard_policy")
        if config.forward != "batched":
            raise ValueError(f"a sharded step runs forward='batched' only, got {config.forward!r}")
    if config.share_prompts and not shared_prompts_supported(policy):
        config = dataclasses.replace(config, share_prompts=False)
    advantages, keep, zero_variance = step_advantages(
        groups, std=config.adv_std, eps=config.adv_eps, drop_zero_variance=config.drop_zero_variance
    )
    rows = _step_rows(groups, keep, pixels)
    lengths = torch.tensor([len(row.rollout.completion_token_ids) for row in rows], dtype=torch.float32)
    weights = row_token_weights(lengths, torch.tensor([row.group for row in rows], dtype=torch.long),
                                config.loss.normalization, max_completion_len=config.loss.max_completion_len)
    weight_of = {row.index: float(weight) for row, weight in zip(rows, weights.tolist(), strict=True)}
    total_tokens = float(lengths.sum())
    kept_groups = len({row.group for row in rows})
    device = next(policy.parameters()).device
    totals = _Totals.zeros(device, ("kept_mass_loss", "kept_share") if config.kept_mass_weight > 0 else ())
    plans = _plan_chunks(rows, groups, advantages, keep, config,
                         (image_token_id(policy), placeholder_token_id(policy, video=True)))
    overlap = config.reference_overlap and config.forward == "batched" and reference is not None \
        and config.loss.beta > 0
    optimizer.zero_grad(set_to_none=True)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference") if overlap else contextlib.nullcontext() as pool:
        for plan, micro_count, mass_count in _rank_slots(plans, rank, world_size):
            _chunk_step(policy, reference, groups, plan, micro_count, mass_count, advantages, keep, weight_of,
                        total_tokens, kept_groups, totals, config, device, pool, world_size)
    return _finish_step(policy, optimizer, scheduler, config, totals, world_size, advantages, {
        "zero_variance_groups": float(zero_variance), "rows": float(len(rows)), "tokens": total_tokens,
        "groups": float(len(groups)),
    })


def _chunk_step(
    policy: torch.nn.Module, reference: torch.nn.Module | None, groups: Sequence[TrajectoryGroup], plan: _ChunkPlan,
    micro_count: int, mass_count: int, advantages: Tensor, keep: Tensor, weight_of: dict[int, float],
    total_tokens: float, kept_groups: int, totals: _Totals, config: StepConfig, device: torch.device,
    pool: ThreadPoolExecutor | None, world_size: int,
) -> None:
    """One vision chunk's forward passes and backwards, accumulating gradients and metrics."""
    autocast = functools.partial(_autocast, device, config.compute_dtype, next(policy.parameters()).dtype)
    use_mass = config.kept_mass_weight > 0 and config.scorer is not None
    chunk = _chunk_inputs(policy, plan.rows, plan.groups, device)
    micro_batches = [] if plan.filler else plan.micro_batches
    batch_plans: list[BatchPlan | None] = [None] * len(micro_batches)
    reference_done: list[Future[Tensor] | None] = [None] * len(micro_batches)
    if pool is not None:  # planned up front, so the reference can run ahead
        batch_plans = [plan_batch(policy, _row_specs([plan.rows[i] for i in indices]), chunk.grids_cpu,
                                  chunk.seconds, config.share_prompts).to(device)
                       for indices in micro_batches]
        reference_done = _reference_passes(pool, reference, chunk, batch_plans, autocast)
    with autocast():
        if config.forward == "batched" or use_mass:
            _chunk_features(policy, reference if pool is None else None, chunk, config)
        for indices, batch_plan, ref_done in zip(micro_batches, batch_plans, reference_done, strict=True):
            batch = [plan.rows[i] for i in indices]
            tokens = sum(len(row.rollout.completion_token_ids) for row in batch)
            logprobs, mask, ref_lp = _micro_batch_logprobs(policy, reference, batch, chunk, config, batch_plan,
                                                           ref_done)
            width = logprobs.shape[1]
            recorded, _ = pad_rows([torch.tensor(row.rollout.completion_logprobs, dtype=torch.float32)
                                    for row in batch], width)
            rollout_lp = recorded.to(device, non_blocking=True)
            recompute = config.old_logprobs == "recompute"
            # With one update per batch, the trainer's own pre-update log-probs are its current ones,
            # detached (TRL/verl with num_iterations=1); TIS then corrects for the engine/staleness gap.
            result = grpo_loss(
                logprobs, logprobs.detach() if recompute else rollout_lp,
                advantages[[row.index for row in batch]].to(device), mask, config.loss, ref_logprobs=ref_lp,
                rollout_logprobs=rollout_lp if recompute else None,
                row_weights=torch.tensor([weight_of[row.index] for row in batch]).to(device),
            )
            result.loss.backward()
            totals.add(result, tokens / max(total_tokens, 1.0))
        for _ in range(micro_count - (0 if plan.filler else len(plan.micro_batches))):
            _filler_micro_batch(policy, plan, chunk)
        if use_mass:
            _kept_mass_terms(policy, groups, plan, chunk, advantages, keep, config, kept_groups, totals, mass_count)
    if chunk.policy_features is not None and (world_size > 1 or chunk.policy_leaf.grad is not None):
        leaf_grad = chunk.policy_leaf.grad  # sharded: every rank runs this backward (a collective), zeros or not
        chunk.policy_features.backward(leaf_grad if leaf_grad is not None else torch.zeros_like(chunk.policy_leaf))


def _filler_micro_batch(policy: torch.nn.Module, plan: _ChunkPlan, chunk: _Chunk) -> None:
    """A zero-weight policy pass over one row of the chunk: the gathers and reduce-scatters of a real micro-batch,
    adding exactly zero to every gradient."""
    row = next((row for row in plan.rows if row.rollout.completion_token_ids), plan.rows[0])
    spec = RowSpec(row.rollout.prompt_token_ids, row.rollout.completion_token_ids, row.rollout.kept_indices, row.image)
    batch_plan = plan_batch(policy, [spec], chunk.grids_cpu, chunk.seconds).to(chunk.pixel_values.device)
    (batched_completion_logprobs(policy, batch_plan, chunk.policy_leaf).sum() * 0.0).backward()


def _kept_mass_terms(
    policy: torch.nn.Module, groups: Sequence[TrajectoryGroup], plan: _ChunkPlan, chunk: _Chunk,
    advantages: Tensor, keep: Tensor, config: StepConfig, kept_groups: int, totals: _Totals, passes: int,
) -> None:
    """Backward the kept-set term of each of the chunk's groups that has an above-average rollout, then zero-weight
    scorer passes up to `passes` (a sharded step's lockstep count)."""
    offsets = [0, *itertools.accumulate(len(group.rollouts) for group in groups)]
    real = [] if plan.filler else plan.mass_images
    if not plan.filler:
        totals.sums["kept_share"] += len(plan.full_keep_images) / kept_groups
    for image in real:
        g = plan.groups[image]
        span = slice(offsets[g], offsets[g + 1])
        mass_loss, kept_share = group_kept_mass_loss(
            policy, config.scorer, groups[g], chunk, image, advantages[span], keep[span]
        )
        (config.kept_mass_weight * mass_loss / kept_groups).backward()
        totals.sums["kept_mass_loss"] += mass_loss.detach().double() / kept_groups
        totals.sums["kept_share"] += kept_share.double() / kept_groups
    for _ in range(passes - len(real)):
        rollout = plan.rows[0].rollout
        inputs = _scorer_inputs(policy, rollout.prompt_token_ids, chunk, plan.rows[0].image)
        (config.scorer.differentiable_score(policy, inputs).sum() * 0.0).backward()


def _finish_step(
    policy: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, config: StepConfig, totals: _Totals,
    world_size: int, advantages: Tensor, counts: dict[str, float],
) -> dict[str, float]:
    """Sum the metrics over ranks (sharded), clip, step unless non-finite, and assemble the step's metrics."""
    sums, means, maxima = totals.to_floats()
    present = {name: float(name in totals.present) for name in _TOKEN_MEANS}
    params = [p for p in policy.parameters() if p.requires_grad]
    if world_size > 1:
        flags = {f"present:{name}": value for name, value in present.items()}
        merged = {**sums, **means, **flags}
        all_reduce_metrics(merged, maxima)
        sums = {name: merged[name] for name in sums}
        present = {name: merged[f"present:{name}"] for name in present}
        means = {name: value for name, value in merged.items() if name in means}
    means = {name: value for name, value in means.items() if present[name] > 0}
    maxima = {name: value for name, value in maxima.items() if value > float("-inf")}
    if world_size > 1:
        sum_gradients(params, world_size)
    # Over sharded gradients (DTensors) the norm is reduced over ranks: every rank clips by the same factor.
    grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
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
        **counts, "advantage_abs_mean": float(advantages.abs().mean()) if len(advantages) else 0.0,
    }

"""The learner's training forward: many pruned rollouts in one right-padded batch, over shared visual features.

The rollouts of a group share one image, so the vision tower runs once per image (``image_features`` on all
images of a batch at once) and every rollout's pruned sequence is assembled from those features. Each row of
the batch is what vLLM ran for one rollout (``services.vllm_plugin``): the prompt's text, the kept visual tokens
in image order at their original M-RoPE (t, h, w) positions, then the completion, whose positions continue from
the *unpruned* prompt. See docs/architecture.md, "Inference consistency".

Two phases, so the hot path has no device-to-host syncs:
1. ``plan_batch`` (CPU, no parameters): from the recorded token ids and keep sets, the padded input ids, the
   position ids, where each kept visual feature goes and which positions predict the completion tokens;
2. ``batched_completion_logprobs`` (device): embed, scatter the features, one decoder pass with plain causal
   attention (right padding never reaches a real token), ``lm_head`` on completion-predicting rows only.

Shared prompts (``share_prompts``): rollouts of one group that kept the same visual tokens ran the same pruned
prompt (every rollout of a dense group does, and so do repeated budgets), so one batch row holds that prompt once
followed by each rollout's completion, and a block mask lets each completion see the prompt and itself only. The
log-probs are those of the separate rows; the decoder computes the prompt once instead of once per rollout.

``services.modeling.pruned_forward`` keeps the one-rollout-at-a-time path as the readable reference that the
tests hold this one to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from services.data.video import Video
from services.modeling.pruned_forward import (
    image_features,
    image_inputs,
    image_token_id,
    placeholder_token_id,
    video_inputs,
    video_rope_positions,
    visual_tokens_per_image,
)
from services.sparsity.budgets import KeepSetError


@dataclass(frozen=True)
class RowSpec:
    """One rollout to score: its recorded ids, its keep set, and which image of the batch it reads.

    prompt_token_ids hold N image placeholders (unpruned, as the wire records them) or len(kept_indices)
    (as the engine ran the prompt); image indexes the batch's images (rows of image_grid_thw).
    """

    prompt_token_ids: Sequence[int]
    completion_token_ids: Sequence[int]
    kept_indices: Sequence[int]
    image: int = 0


@dataclass(frozen=True)
class BatchPlan:
    """Index tensors of one right-padded batch of pruned rows (B rows, L padded length, C completion width).

    input_ids: (B, L) text ids (placeholder id at visual slots, 0 in padding); position_ids: (3, B, L);
    visual_slots: (K,) flat indices into B*L that take a visual feature; visual_sources: (K,) row of the
    batch's concatenated visual features for each slot; predict_slots: (T,) flat indices into B*L of the rows
    that predict each completion token; targets: (T,) those tokens; completion_slots: (T,) flat indices into
    R*C, R the rollouts scored; completion_mask: (R, C) bool. lengths: length of each batch row.
    attention_mask: (B, 1, L, L) bool, True where a query may attend, when a batch row holds a shared prompt
    and several completions; None for plain causal attention.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    visual_slots: torch.Tensor
    visual_sources: torch.Tensor
    predict_slots: torch.Tensor
    targets: torch.Tensor
    completion_slots: torch.Tensor
    completion_mask: torch.Tensor
    lengths: tuple[int, ...]
    attention_mask: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """Rollouts scored (rows of the (rows, C) output), which shared prompts pack into fewer batch rows."""
        return int(self.completion_mask.shape[0])

    @property
    def padded_tokens(self) -> int:
        """B * L: the tokens the decoder pass computes, padding included."""
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> BatchPlan:
        """The same plan with every tensor on ``device`` (non-blocking from pinned memory)."""
        moved = {
            field.name: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for field in fields(self) for value in [getattr(self, field.name)]
        }
        return BatchPlan(**moved)


def prompt_positions(
    model: torch.nn.Module, prompt_ids: Sequence[int], grid_thw: torch.Tensor, seconds_per_grid: float | None = None,
) -> torch.Tensor:
    """M-RoPE positions (3, Lp) of one unpruned prompt with one image, by the model's own get_rope_index (CPU).

    A video prompt (``seconds_per_grid`` set) takes ``video_rope_positions``, the engine's rule for videos.
    """
    if seconds_per_grid is not None:
        return video_rope_positions(model, torch.tensor(list(prompt_ids)), grid_thw[0], seconds_per_grid)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    token_types = (ids == image_token_id(model)).to(torch.int32)
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=token_types, image_grid_thw=grid_thw)
    return positions[:, 0]


def _placeholder_run(prompt: np.ndarray, placeholder_id: int) -> tuple[int, int]:
    """(start, length) of the prompt's single contiguous run of image placeholders."""
    where = np.flatnonzero(prompt == placeholder_id)
    if where.size == 0 or where[-1] - where[0] + 1 != where.size:
        raise KeepSetError("a prompt must hold one contiguous run of image placeholders")
    return int(where[0]), int(where.size)


def _checked_keep_set(kept_indices: Sequence[int], total: int) -> np.ndarray:
    """The keep set as an int64 array, refused unless non-empty, strictly increasing and inside [0, total)."""
    kept = np.asarray(kept_indices, dtype=np.int64).reshape(-1)
    if kept.size == 0:
        raise KeepSetError("kept_indices is empty: at least one visual token must be kept")
    if kept.size > 1 and not bool((np.diff(kept) > 0).all()):
        raise KeepSetError(f"kept_indices must be strictly increasing, got {kept.tolist()[:16]}...")
    if kept[0] < 0 or kept[-1] >= total:
        raise KeepSetError(f"kept_indices must lie in [0, {total}), got {int(kept[0])}..{int(kept[-1])}")
    return kept


SHARED_PROMPT_ATTENTION = ("eager", "sdpa")  # decoder attention implementations that take a custom 4-D mask


def shared_prompts_supported(model: torch.nn.Module) -> bool:
    """Whether the model's decoder attention takes the block mask shared prompts need (flash kernels do not)."""
    return getattr(model.model.language_model.config, "_attn_implementation", None) in SHARED_PROMPT_ATTENTION


@dataclass(frozen=True)
class _PlannedRow:
    prompt: np.ndarray  # (P,) pruned prompt ids
    positions: np.ndarray  # (3, P)
    completion: np.ndarray  # (C,) completion ids
    completion_positions: np.ndarray  # (3, C)
    visual_start: int  # first kept visual token's index in the pruned prompt
    visual_sources: np.ndarray  # (kept,) rows of the batch's concatenated features
    key: tuple[int, tuple[int, ...], tuple[int, ...]]  # (image, widened prompt, keep set): equal keys, equal prompts


def _plan_row(
    model: torch.nn.Module, row: RowSpec, grids: torch.Tensor, counts: list[int], offsets: list[int],
    position_cache: dict[tuple[int, tuple[int, ...]], np.ndarray], seconds_per_grid: Sequence[float | None],
) -> _PlannedRow:
    if not 0 <= row.image < len(counts):
        raise ValueError(f"row reads image {row.image}, but the batch has {len(counts)} image(s)")
    seconds = seconds_per_grid[row.image]
    placeholder = placeholder_token_id(model, video=seconds is not None)
    total = counts[row.image]
    kept = _checked_keep_set(row.kept_indices, total)
    prompt = np.asarray(row.prompt_token_ids, dtype=np.int64)
    start, run = _placeholder_run(prompt, placeholder)
    if run not in (total, kept.size):
        raise KeepSetError(f"the prompt holds {run} image placeholders; expected {total} (the image's visual "
                           f"tokens) or {kept.size} (len(kept_indices))")
    if run != total:  # the engine's pruned prompt: widen it back to the image's N placeholders
        prompt = np.concatenate([prompt[:start], np.full(total, placeholder), prompt[start + run:]])
    key = (row.image, tuple(prompt.tolist()))
    if key not in position_cache:  # once per group: its G rollouts share the prompt
        position_cache[key] = prompt_positions(model, key[1], grids[row.image:row.image + 1], seconds).numpy()
    positions = position_cache[key]
    completion = np.asarray(row.completion_token_ids, dtype=np.int64)
    # Text after the prompt continues from the unpruned prompt's largest position (get_rope_index's rule).
    completion_positions = np.broadcast_to(positions.max() + 1 + np.arange(completion.size), (3, completion.size))
    kept_rows = np.concatenate([np.arange(start), start + kept, np.arange(start + total, prompt.size)])
    return _PlannedRow(
        prompt=prompt[kept_rows], positions=positions[:, kept_rows], completion=completion,
        completion_positions=completion_positions, visual_start=start, visual_sources=offsets[row.image] + kept,
        key=(*key, tuple(kept.tolist())),
    )


def _batch_rows(planned: Sequence[_PlannedRow], share_prompts: bool) -> list[list[int]]:
    """Rollout indices of each batch row: one per rollout, or, sharing prompts, those with equal pruned prompts."""
    if not share_prompts:
        return [[index] for index in range(len(planned))]
    members: dict[tuple, list[int]] = {}
    for index, row in enumerate(planned):
        members.setdefault(row.key, []).append(index)
    return list(members.values())


def _segment_mask(segments: np.ndarray) -> np.ndarray:
    """(B, 1, L, L) bool: causal, and a completion (segment > 0) sees the shared prompt (0) and itself only."""
    query, key = segments[:, :, None], segments[:, None, :]
    causal = np.tril(np.ones((segments.shape[1],) * 2, dtype=bool))[None]
    return (causal & ((key <= 0) | (key == query)))[:, None]


def plan_batch(
    model: torch.nn.Module, rows: Sequence[RowSpec], image_grid_thw: torch.Tensor,
    seconds_per_grid: Sequence[float | None] | None = None, share_prompts: bool = False,
) -> BatchPlan:
    """Plan one right-padded batch of pruned rows on the CPU. image_grid_thw: (images, 3), on the CPU.

    Reads only the model's config and its ``get_rope_index`` (no parameters), and validates every keep set
    and placeholder run; a row without completion tokens is allowed (it contributes nothing).
    seconds_per_grid: per item of the batch, None for an image, the seconds a temporal slot spans for a video
    (whose grid, pixel values and ``<|video_pad|>`` run take the image's place); default: all images.
    share_prompts: rollouts with equal pruned prompts share one batch row (see the module's docstring); needs
    ``shared_prompts_supported(model)``.
    """
    if not rows:
        raise ValueError("plan_batch needs at least one row")
    if share_prompts and not shared_prompts_supported(model):
        raise ValueError("share_prompts needs eager or sdpa decoder attention (a custom mask), got "
                         f"{getattr(model.model.language_model.config, '_attn_implementation', None)!r}")
    grids = image_grid_thw.cpu()
    counts = visual_tokens_per_image(model, grids)
    seconds = list(seconds_per_grid) if seconds_per_grid is not None else [None] * len(counts)
    if len(seconds) != len(counts):
        raise ValueError(f"seconds_per_grid has {len(seconds)} entries for {len(counts)} media items")
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    cache: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}
    planned = [_plan_row(model, row, grids, counts, offsets, cache, seconds) for row in rows]
    batch_rows = _batch_rows(planned, share_prompts)
    lengths = [planned[members[0]].prompt.size + sum(planned[i].completion.size for i in members)
               for members in batch_rows]
    batch, width = len(batch_rows), max(lengths)
    completion_width = max(max(row.completion.size for row in planned), 1)
    input_ids = np.zeros((batch, width), dtype=np.int64)
    position_ids = np.zeros((3, batch, width), dtype=np.int64)
    segments = np.full((batch, width), -1, dtype=np.int64)  # 0: the prompt, i: the i-th completion, -1: padding
    visual_slots, visual_sources, predict_slots, targets, completion_slots = [], [], [], [], []
    for index, members in enumerate(batch_rows):
        head = planned[members[0]]
        prompt_length = head.prompt.size
        input_ids[index, :prompt_length] = head.prompt
        position_ids[:, index, :prompt_length] = head.positions
        segments[index, :prompt_length] = 0
        visual_slots.append(index * width + head.visual_start + np.arange(head.visual_sources.size))
        visual_sources.append(head.visual_sources)
        start = prompt_length
        for segment, member in enumerate(members, start=1):
            completion = planned[member].completion
            end = start + completion.size
            input_ids[index, start:end] = completion
            position_ids[:, index, start:end] = planned[member].completion_positions
            segments[index, start:end] = segment
            # Token j of a completion is predicted by the one before it; the first by the prompt's last token.
            predictors = np.concatenate([[prompt_length - 1], start + np.arange(completion.size - 1)])
            predict_slots.append(index * width + predictors[:completion.size])
            targets.append(completion)
            completion_slots.append(member * completion_width + np.arange(completion.size))
            start = end
    completion_lengths = np.array([row.completion.size for row in planned])
    shared = any(len(members) > 1 for members in batch_rows)
    as_long = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int64))
    return BatchPlan(
        input_ids=torch.from_numpy(input_ids), position_ids=torch.from_numpy(position_ids),
        visual_slots=as_long(visual_slots), visual_sources=as_long(visual_sources),
        predict_slots=as_long(predict_slots), targets=as_long(targets), completion_slots=as_long(completion_slots),
        completion_mask=torch.from_numpy(np.arange(completion_width)[None, :] < completion_lengths[:, None]),
        lengths=tuple(lengths), attention_mask=torch.from_numpy(_segment_mask(segments)) if shared else None,
    )


def batched_completion_logprobs(
    model: torch.nn.Module, plan: BatchPlan, visual_features: torch.Tensor
) -> torch.Tensor:
    """(B, C) float32 log-probs of every row's completion tokens (0 where completion_mask is False).

    plan: on the model's device; visual_features: (sum of the batch's images' N, D), the merged features of the
    batch's images in order (``image_features``). Differentiable into the LLM and into ``visual_features``.
    """
    core = model.model
    batch, width = plan.input_ids.shape
    token_embeds = core.get_input_embeddings()(plan.input_ids)
    flat = token_embeds.reshape(batch * width, -1)
    visual = visual_features.index_select(0, plan.visual_sources).to(flat.dtype)
    inputs_embeds = flat.index_copy(0, plan.visual_slots, visual).view(batch, width, -1)
    # Without shared prompts no mask: with right padding, causal attention keeps every real token off the padding.
    hidden = core.language_model(
        inputs_embeds=inputs_embeds, attention_mask=_decoder_mask(core, plan.attention_mask, inputs_embeds.dtype),
        position_ids=plan.position_ids, use_cache=False,
    ).last_hidden_state
    predicting = hidden.reshape(batch * width, -1).index_select(0, plan.predict_slots)
    logits = model.lm_head(predicting).float()
    token_logprobs = logits.gather(-1, plan.targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    completion_width = plan.completion_mask.shape[1]
    out = token_logprobs.new_zeros(plan.rows * completion_width)
    return out.index_copy(0, plan.completion_slots, token_logprobs).view(plan.rows, completion_width)


def _decoder_mask(core: torch.nn.Module, allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The plan's block mask as the decoder's attention takes it: bool for SDPA, additive for eager."""
    if allowed is None or core.language_model.config._attn_implementation != "eager":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def rows_completion_logprobs(
    model: torch.nn.Module, rows: Sequence[RowSpec], pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
    seconds_per_grid: Sequence[float | None] | None = None, share_prompts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan, run the vision tower once for all images, and score every row: (B, C) log-probs and mask.

    pixel_values: (patches, C*T*P*P) of the images in order, on the model's device; image_grid_thw: (images, 3).
    Videos and shared prompts: see ``plan_batch``. The convenience path for callers without their own feature
    sharing (replay, recording, tests).
    """
    device = pixel_values.device
    plan = plan_batch(model, rows, image_grid_thw.cpu(), seconds_per_grid, share_prompts).to(device)
    features = image_features(model, pixel_values, image_grid_thw.to(device))
    return batched_completion_logprobs(model, plan, features), plan.completion_mask


def replay_logprobs(
    model: torch.nn.Module, processor: Any, image: Any, prompt_token_ids: Sequence[int],
    completion_token_ids: Sequence[int], kept_indices: Sequence[int],
) -> torch.Tensor:
    """Training log-probs of one recorded rollout (e.g. a wire ``Rollout``): (len(completion),), differentiable.

    image: a PIL image or a ``services.data.video.Video``.
    """
    if not completion_token_ids:
        raise ValueError("completion_token_ids is empty: nothing to score")
    seconds: float | None = None
    if isinstance(image, Video):
        pixel_values, image_grid_thw, seconds = video_inputs(processor, image)
    else:
        pixel_values, image_grid_thw = image_inputs(processor, image)
    device = next(model.parameters()).device
    logprobs, _ = rows_completion_logprobs(
        model, [RowSpec(prompt_token_ids, completion_token_ids, kept_indices)], pixel_values.to(device),
        image_grid_thw, [seconds],
    )
    return logprobs[0]

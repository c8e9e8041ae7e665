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

``services.modeling.pruned_forward`` keeps the one-rollout-at-a-time path as the readable reference that the
tests hold this one to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

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
    B*C; completion_mask: (B, C) bool. lengths: pruned length of each row.
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

    @property
    def padded_tokens(self) -> int:
        """B * L: the tokens the decoder pass computes, padding included."""
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> BatchPlan:
        """The same plan with every tensor on ``device`` (non-blocking from pinned memory)."""
        moved = {
            field.name: getattr(self, field.name).to(device, non_blocking=True)
            for field in fields(self) if isinstance(getattr(self, field.name), torch.Tensor)
        }
        return BatchPlan(**moved, lengths=self.lengths)


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


@dataclass(frozen=True)
class _PlannedRow:
    ids: np.ndarray  # (L',) pruned row ids
    positions: np.ndarray  # (3, L')
    visual_start: int  # first kept visual token's index in the pruned row
    visual_sources: np.ndarray  # (kept,) rows of the batch's concatenated features
    completion_length: int


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
        ids=np.concatenate([prompt[kept_rows], completion]),
        positions=np.concatenate([positions[:, kept_rows], completion_positions], axis=1),
        visual_start=start, visual_sources=offsets[row.image] + kept, completion_length=int(completion.size),
    )


def plan_batch(
    model: torch.nn.Module, rows: Sequence[RowSpec], image_grid_thw: torch.Tensor,
    seconds_per_grid: Sequence[float | None] | None = None,
) -> BatchPlan:
    """Plan one right-padded batch of pruned rows on the CPU. image_grid_thw: (images, 3), on the CPU.

    Reads only the model's config and its ``get_rope_index`` (no parameters), and validates every keep set
    and placeholder run; a row without completion tokens is allowed (it contributes nothing).
    seconds_per_grid: per item of the batch, None for an image, the seconds a temporal slot spans for a video
    (whose grid, pixel values and ``<|video_pad|>`` run take the image's place); default: all images.
    """
    if not rows:
        raise ValueError("plan_batch needs at least one row")
    grids = image_grid_thw.cpu()
    counts = visual_tokens_per_image(model, grids)
    seconds = list(seconds_per_grid) if seconds_per_grid is not None else [None] * len(counts)
    if len(seconds) != len(counts):
        raise ValueError(f"seconds_per_grid has {len(seconds)} entries for {len(counts)} media items")
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    cache: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}
    planned = [_plan_row(model, row, grids, counts, offsets, cache, seconds) for row in rows]
    batch, width = len(planned), max(row.ids.size for row in planned)
    completion_width = max(max(row.completion_length for row in planned), 1)
    input_ids = np.zeros((batch, width), dtype=np.int64)
    position_ids = np.zeros((3, batch, width), dtype=np.int64)
    visual_slots, visual_sources, predict_slots, targets, completion_slots = [], [], [], [], []
    for index, row in enumerate(planned):
        length, kept, completion = row.ids.size, row.visual_sources.size, row.completion_length
        input_ids[index, :length] = row.ids
        position_ids[:, index, :length] = row.positions
        visual_slots.append(index * width + row.visual_start + np.arange(kept))
        visual_sources.append(row.visual_sources)
        # The token at pruned row j is predicted by row j - 1; the completion is the row's tail.
        predict_slots.append(index * width + length - completion - 1 + np.arange(completion))
        targets.append(row.ids[length - completion:])
        completion_slots.append(index * completion_width + np.arange(completion))
    completion_lengths = np.array([row.completion_length for row in planned])
    as_long = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int64))
    return BatchPlan(
        input_ids=torch.from_numpy(input_ids), position_ids=torch.from_numpy(position_ids),
        visual_slots=as_long(visual_slots), visual_sources=as_long(visual_sources),
        predict_slots=as_long(predict_slots), targets=as_long(targets), completion_slots=as_long(completion_slots),
        completion_mask=torch.from_numpy(np.arange(completion_width)[None, :] < completion_lengths[:, None]),
        lengths=tuple(int(row.ids.size) for row in planned),
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
    # No attention mask: with right padding, causal attention keeps every real token off the padding.
    hidden = core.language_model(
        inputs_embeds=inputs_embeds, position_ids=plan.position_ids, use_cache=False
    ).last_hidden_state
    predicting = hidden.reshape(batch * width, -1).index_select(0, plan.predict_slots)
    logits = model.lm_head(predicting).float()
    token_logprobs = logits.gather(-1, plan.targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    completion_width = plan.completion_mask.shape[1]
    out = token_logprobs.new_zeros(batch * completion_width)
    return out.index_copy(0, plan.completion_slots, token_logprobs).view(batch, completion_width)


def rows_completion_logprobs(
    model: torch.nn.Module, rows: Sequence[RowSpec], pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
    seconds_per_grid: Sequence[float | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan, run the vision tower once for all images, and score every row: (B, C) log-probs and mask.

    pixel_values: (patches, C*T*P*P) of the images in order, on the model's device; image_grid_thw: (images, 3).
    Videos: see ``plan_batch``. The convenience path for callers without their own feature sharing (replay,
    recording, tests).
    """
    device = pixel_values.device
    plan = plan_batch(model, rows, image_grid_thw.cpu(), seconds_per_grid).to(device)
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
    if hasattr(image, "frames"):
        pixel_values, image_grid_thw, seconds = video_inputs(processor, image)
    else:
        pixel_values, image_grid_thw = image_inputs(processor, image)
    device = next(model.parameters()).device
    logprobs, _ = rows_completion_logprobs(
        model, [RowSpec(prompt_token_ids, completion_token_ids, kept_indices)], pixel_values.to(device),
        image_grid_thw, [seconds],
    )
    return logprobs[0]

"""The one-rollout-at-a-time pruned forward: the HF Qwen2.5-VL, fed exactly what vLLM saw.

The learner runs ``services.modeling.batched_forward`` (many rollouts per pass, one vision pass per image);
this module keeps the plain per-rollout version as the readable reference that the batched path is tested
against, plus the pieces both share (``embed_full_sequence`` also feeds the scorers).

Inference consistency is the whole point (docs/architecture.md, "Inference consistency"). The patched vLLM
model (``services.vllm_plugin``) keeps visual tokens ``kept_indices`` and gives each its original
M-RoPE (t, h, w) coordinates; the text after the image continues from the *unpruned* grid (as if the
pruned tokens were still there, invisible). Here we build the same sequence in three steps:

1. embed the full prompt+completion: token embeddings with the vision tower + merger output scattered
   into the N image placeholders, and M-RoPE positions from the model's own ``get_rope_index`` on the
   unpruned sequence;
2. drop the rows of the pruned visual tokens from both (``prune_sequence``);
3. run the decoder stack on what is left with those explicit positions and read log-probs.

Gradients flow through all of it: the LLM, the merger and the vision tower. The scorer
(``services.sparsity.scorers``) uses step 1 too, so the scored and the trained sequence are one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from services.sparsity.budgets import KeepSetError, keep_mask


@dataclass(frozen=True)
class MultimodalSequence:
    """One embedded, unpruned sequence.

    inputs_embeds: (1, L, D); position_ids: (3, 1, L) long; visual_positions: (N,) long, the sequence
    index of each visual token in image order.
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    visual_positions: torch.Tensor


def image_token_id(model: torch.nn.Module) -> int:
    """The id of the image placeholder token in this model's vocabulary."""
    return int(model.config.image_token_id)


def placeholder_token_id(model: torch.nn.Module, video: bool) -> int:
    """The id of the visual placeholder token: ``<|video_pad|>`` for a video, ``<|image_pad|>`` for an image."""
    return int(model.config.video_token_id) if video else image_token_id(model)


def video_rope_positions(
    model: torch.nn.Module, input_ids: torch.Tensor, grid_thw: torch.Tensor, seconds_per_grid: float
) -> torch.Tensor:
    """M-RoPE positions (3, L) of one unpruned prompt holding one video's single run of placeholders.

    Text before the video counts up from 0; the video's tokens sit at (start + t * tokens_per_second *
    seconds_per_grid, start + h, start + w); text after continues from the video's largest position + 1.
    That is vLLM's rule and the original Qwen2.5-VL's. Transformers 5.19's ``get_rope_index`` continues after
    a video from start + max(h, w) instead (ignoring the video's temporal extent), so the learner does not use
    it for videos: it would disagree with the engine the rollouts ran on. For an image (t = 1) both agree.
    input_ids: (L,) on the CPU; grid_thw: (3,) patches (t, h, w) before the spatial merge.
    """
    placeholder = placeholder_token_id(model, video=True)
    where = torch.nonzero(input_ids == placeholder).flatten()
    if where.numel() == 0 or int(where[-1] - where[0]) + 1 != where.numel():
        raise KeepSetError("a video prompt must hold one contiguous run of video placeholders")
    merge = int(model.config.vision_config.spatial_merge_size)
    t, h, w = (int(v) for v in grid_thw.tolist())
    if where.numel() != t * (h // merge) * (w // merge):
        raise KeepSetError(f"{where.numel()} video placeholders for a grid {[t, h, w]} of "
                           f"{t * (h // merge) * (w // merge)} visual tokens")
    interval = float(getattr(model.config.vision_config, "tokens_per_second", 1.0)) * float(seconds_per_grid)
    start, length = int(where[0]), int(input_ids.numel())
    grid = torch.stack(torch.meshgrid(
        (torch.arange(t) * interval).long(), torch.arange(h // merge), torch.arange(w // merge), indexing="ij"
    )).reshape(3, -1) + start
    after = length - start - where.numel()
    return torch.cat([
        torch.arange(start).expand(3, -1), grid, torch.arange(after).expand(3, -1) + int(grid.max()) + 1,
    ], dim=1)


def visual_tokens_per_image(model: torch.nn.Module, image_grid_thw: torch.Tensor) -> list[int]:
    """Merged visual tokens per image: t*h*w / merge^2. image_grid_thw: (images, 3)."""
    merge = int(model.config.vision_config.spatial_merge_size)
    return [int(n) for n in (image_grid_thw.prod(-1) // (merge * merge)).tolist()]


def expand_placeholders(input_ids: torch.Tensor, placeholder_id: int, total: int) -> torch.Tensor:
    """Widen a pruned prompt's single run of image placeholders back to ``total``. (1, L') -> (1, L)."""
    row = input_ids[0]
    positions = torch.nonzero(row == placeholder_id).flatten()
    if positions.numel() == total:
        return input_ids
    if positions.numel() == 0 or int(positions[-1] - positions[0]) + 1 != positions.numel():
        raise KeepSetError("input_ids must hold one contiguous run of image placeholders")
    start, end = int(positions[0]), int(positions[-1]) + 1
    filler = torch.full((total,), placeholder_id, dtype=row.dtype, device=row.device)
    return torch.cat([row[:start], filler, row[end:]]).unsqueeze(0)


def image_features(
    model: torch.nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
) -> torch.Tensor:
    """Vision tower + merger: the merged visual features of all images, in order. Returns (N, D)."""
    features = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output
    return torch.cat(list(features), dim=0)


def embed_full_sequence(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    text_tail: int = 0,
    image_embeds: torch.Tensor | None = None,
    video_seconds_per_grid: float | None = None,
) -> MultimodalSequence:
    """Embed one unpruned sequence with its image(s), or its one video, and compute its M-RoPE positions.

    input_ids: (1, L) with N image placeholders; pixel_values: (patches, C*T*P*P); image_grid_thw: (images, 3).
    The last ``text_tail`` tokens (a completion) are text even where they equal the image token: a
    sampled ``<|image_pad|>`` is an ordinary token embedding in vLLM too. ``image_embeds`` (N, D), when
    given, are merged visual features already computed from ``pixel_values`` (``image_features``).
    A video (``video_seconds_per_grid`` set: seconds one temporal slot spans) has ``<|video_pad|>``
    placeholders, its frames' pixel values and its grid (1, 3) in the image arguments: the vision tower is the
    same, and only the placeholder and the temporal positions differ (``video_rope_positions``).
    """
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (1, L), got {tuple(input_ids.shape)}")
    core = model.model
    video = video_seconds_per_grid is not None
    placeholder_id = placeholder_token_id(model, video)
    image_mask = input_ids == placeholder_id
    if text_tail:
        image_mask[:, -text_tail:] = False
    total = sum(visual_tokens_per_image(model, image_grid_thw))
    placeholders = int(image_mask.sum())
    if placeholders != total:
        raise KeepSetError(
            f"input_ids hold {placeholders} image placeholders but image_grid_thw="
            f"{image_grid_thw.tolist()} gives {total} visual tokens"
        )
    if image_embeds is None:
        image_embeds = image_features(model, pixel_values, image_grid_thw)
    token_embeds = core.get_input_embeddings()(input_ids)
    inputs_embeds = token_embeds.masked_scatter(
        image_mask.unsqueeze(-1), image_embeds.to(token_embeds.dtype)
    )
    if video:
        position_ids = video_rope_positions(
            model, input_ids[0].cpu(), image_grid_thw[0].cpu(), video_seconds_per_grid
        ).to(input_ids.device).unsqueeze(1)
    else:
        position_ids, _ = core.get_rope_index(
            input_ids, mm_token_type_ids=image_mask.to(torch.int32), image_grid_thw=image_grid_thw
        )
    return MultimodalSequence(
        inputs_embeds=inputs_embeds,
        position_ids=position_ids,
        visual_positions=torch.nonzero(image_mask[0]).flatten(),
    )


def prune_sequence(
    sequence: MultimodalSequence, kept_indices: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop the pruned visual tokens' rows, keeping every survivor's original position.

    Returns inputs_embeds (1, L', D), position_ids (3, 1, L') and kept_rows (L,) bool over the full sequence.
    """
    total = int(sequence.visual_positions.numel())
    mask = keep_mask(kept_indices, total).to(sequence.visual_positions.device)
    kept_rows = torch.ones(
        sequence.inputs_embeds.shape[1], dtype=torch.bool, device=sequence.inputs_embeds.device
    )
    kept_rows[sequence.visual_positions[~mask]] = False
    return sequence.inputs_embeds[:, kept_rows], sequence.position_ids[:, :, kept_rows], kept_rows


def decoder_logits(
    model: torch.nn.Module, inputs_embeds: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """Run the decoder stack and LM head on embedded tokens. (1, L', D), (3, 1, L') -> (1, L', V)."""
    hidden = model.model.language_model(
        inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return model.lm_head(hidden)


def pruned_completion_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    kept_indices: Sequence[int],
    completion_length: int,
    video_seconds_per_grid: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that predict each of the last ``completion_length`` tokens, with only kept visual tokens.

    input_ids: (1, L) prompt then completion; its image placeholders may number N (unpruned) or
    len(kept_indices) (as vLLM saw the prompt). Returns logits (completion_length, V) float32 and the
    completion ids (completion_length,). A video: see ``embed_full_sequence``.
    """
    if completion_length < 1 or completion_length >= input_ids.shape[1]:
        raise ValueError(
            f"completion_length={completion_length} must lie in [1, {input_ids.shape[1] - 1}]"
        )
    total = sum(visual_tokens_per_image(model, image_grid_thw))
    prompt_ids, completion_ids = input_ids[:, :-completion_length], input_ids[:, -completion_length:]
    placeholder = placeholder_token_id(model, video_seconds_per_grid is not None)
    placeholders = int((prompt_ids == placeholder).sum())
    if placeholders not in (total, len(kept_indices)):
        raise KeepSetError(
            f"the prompt holds {placeholders} image placeholders; expected {total} (the image's visual "
            f"tokens) or {len(kept_indices)} (len(kept_indices))"
        )
    full_ids = torch.cat([expand_placeholders(prompt_ids, placeholder, total), completion_ids], dim=1)
    sequence = embed_full_sequence(model, full_ids, pixel_values, image_grid_thw, text_tail=completion_length,
                                   video_seconds_per_grid=video_seconds_per_grid)
    inputs_embeds, position_ids, _ = prune_sequence(sequence, kept_indices)
    logits = decoder_logits(model, inputs_embeds, position_ids).float()
    # The token at pruned row j is predicted by row j-1; the completion is text after the image, so it
    # is the tail of the pruned sequence as well.
    return logits[0, -completion_length - 1 : -1], full_ids[0, -completion_length:]


def pruned_completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    kept_indices: Sequence[int],
    completion_length: int,
    video_seconds_per_grid: float | None = None,
) -> torch.Tensor:
    """Log-probs of the last ``completion_length`` tokens of prompt+completion, with only kept visual tokens.

    Same inputs as ``pruned_completion_logits``. Returns (completion_length,) float32, differentiable
    into the LLM, the merger and the vision tower.
    """
    logits, completion_ids = pruned_completion_logits(
        model, input_ids, pixel_values, image_grid_thw, kept_indices, completion_length, video_seconds_per_grid
    )
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def image_inputs(processor: Any, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values (patches, C*T*P*P) and image_grid_thw (1, 3) of one image, as the HF processor makes them."""
    encoded = processor.image_processor(images=[image], return_tensors="pt")
    return encoded["pixel_values"], encoded["image_grid_thw"]


def video_inputs(processor: Any, video: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Pixel values, video_grid_thw (1, 3) and seconds per temporal slot of one ``Video``, as HF makes them."""
    from transformers.video_utils import VideoMetadata

    metadata = VideoMetadata(total_num_frames=video.num_frames, fps=video.fps,
                             frames_indices=list(range(video.num_frames)))
    encoded = processor.video_processor(videos=[list(video.frames)], video_metadata=[metadata], return_tensors="pt")
    temporal_patch = int(processor.video_processor.temporal_patch_size)
    return encoded["pixel_values_videos"], encoded["video_grid_thw"], video.seconds_per_grid(temporal_patch)

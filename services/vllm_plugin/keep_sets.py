"""Keep sets for vLLM's Qwen-VL family: the processor and model halves, shared by every patched model.

See ``services.vllm_plugin.qwen2_5_vl`` for how a keep set travels and why this design.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from services.sparsity.budgets import KeepSetError, keep_mask

KEPT_INDICES_KWARG = "kept_indices"
VISUAL_TOKENS_TOTAL_KWARG = "visual_tokens_total"
KEEP_MASK_FIELD = "image_keep_mask"
# One keep-mask field per modality: a video's keep set indexes all its frames' visual tokens (t-major, as the
# vision tower emits them), exactly as an image's indexes its tokens.
KEEP_MASK_FIELDS = {"image": KEEP_MASK_FIELD, "video": "video_keep_mask"}
_PLUGIN_KWARGS = (KEPT_INDICES_KWARG, VISUAL_TOKENS_TOTAL_KWARG)


def _without_plugin_kwargs(kwargs: Mapping[str, object]) -> dict[str, object]:
    return {key: value for key, value in kwargs.items() if key not in _PLUGIN_KWARGS}


def _tokens_per_image(image_grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    return [int(n) for n in (image_grid_thw.prod(-1) // (merge_size * merge_size)).tolist()]


def image_keep_masks(
    image_grid_thw: torch.Tensor,
    merge_size: int,
    kept_indices: Sequence[int] | None,
    visual_tokens_total: int | None,
) -> torch.Tensor:
    """Concatenated per-item keep masks of images or videos (grids (items, 3)); all-true without a keep set.

    Returns (sum of N_i,) bool; a keep set needs exactly one item (one image or one video per request).
    """
    sizes = _tokens_per_image(image_grid_thw, merge_size)
    if kept_indices is None:
        if visual_tokens_total is not None:
            raise KeepSetError(f"{VISUAL_TOKENS_TOTAL_KWARG} was given without {KEPT_INDICES_KWARG}")
        return torch.ones(sum(sizes), dtype=torch.bool)
    if len(sizes) != 1:
        raise KeepSetError(
            f"{KEPT_INDICES_KWARG} supports one image or video per request, got {len(sizes)} items"
        )
    if visual_tokens_total is not None and int(visual_tokens_total) != sizes[0]:
        raise KeepSetError(
            f"{VISUAL_TOKENS_TOTAL_KWARG}={visual_tokens_total} but the media (grid "
            f"{image_grid_thw[0].tolist()}) has {sizes[0]} visual tokens: the keep set was made for "
            "another image size"
        )
    return keep_mask(kept_indices, sizes[0])


class KeepSetProcessorMixin:
    """Stock Qwen-VL processing plus a per-item keep mask and len(kept) placeholders, for images and videos.

    Mix in before a vLLM Qwen2-VL-family ``BaseMultiModalProcessor`` subclass.
    """

    def _merge_size(self) -> int:
        return int(self.info.get_hf_config().vision_config.spatial_merge_size)

    def _apply_hf_processor_main(
        self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        kept_indices = hf_kwargs.get(KEPT_INDICES_KWARG)
        visual_tokens_total = hf_kwargs.get(VISUAL_TOKENS_TOTAL_KWARG)
        processed = super()._apply_hf_processor_main(mm_items, _without_plugin_kwargs(hf_kwargs))
        # No grid of a modality: a text-only request, or every item came from the processor cache (whose
        # entries already hold their masks, keyed by a hash that includes the keep set).
        present = [m for m in KEEP_MASK_FIELDS if processed.get(f"{m}_grid_thw") is not None]
        if kept_indices is not None and len(present) > 1:
            raise KeepSetError(f"{KEPT_INDICES_KWARG} supports one image or video per request, got both")
        for modality in present:
            processed[KEEP_MASK_FIELDS[modality]] = image_keep_masks(
                processed[f"{modality}_grid_thw"], self._merge_size(), kept_indices, visual_tokens_total
            )
        return processed

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        config = dict(super()._get_mm_fields_config(hf_inputs, _without_plugin_kwargs(hf_processor_mm_kwargs)))
        for modality, field in KEEP_MASK_FIELDS.items():
            grid_thw = hf_inputs.get(f"{modality}_grid_thw", torch.empty((0, 3), dtype=torch.long))
            sizes = torch.tensor(_tokens_per_image(grid_thw, self._merge_size()), dtype=torch.long)
            config[field] = MultiModalFieldConfig.flat_from_sizes(modality, sizes, keep_on_cpu=True)
        return config

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        stock = super()._get_prompt_updates(
            mm_items, _without_plugin_kwargs(hf_processor_mm_kwargs), out_mm_kwargs
        )
        vocab = self.info.get_tokenizer().get_vocab()
        hf_processor = self.info.get_hf_processor()
        pads = {"image": vocab[hf_processor.image_token], "video": vocab[hf_processor.video_token]}

        def kept_placeholders(item_idx: int, modality: str) -> list[int]:
            mask = out_mm_kwargs[modality][item_idx][KEEP_MASK_FIELDS[modality]].data
            return [pads[modality]] * int(mask.sum())

        return [
            PromptReplacement(modality=update.modality, target=[pads[update.modality]],
                              replacement=partial(kept_placeholders, modality=update.modality))
            if update.modality in pads else update
            for update in stock
        ]


def _modality_order(kwargs: Mapping[str, object]) -> list[str]:
    """The modalities of an ``embed_multimodal`` call, in the order vLLM's Qwen-VL models embed them."""
    order: list[str] = []
    for key in kwargs:
        modality = {"pixel_values": "image", "image_embeds": "image",
                    "pixel_values_videos": "video", "video_embeds": "video"}.get(key)
        if modality is not None and modality not in order:
            order.append(modality)
    return order


class KeepSetModelMixin:
    """Keeps only each image's masked visual tokens, at their original M-RoPE positions.

    Mix in before a vLLM Qwen2-VL-family model class (``visual``, ``config``, ``embed_multimodal``).
    """

    def embed_multimodal(self, **kwargs: object) -> Any:
        """Vision tower + merger on the full image or video, then only the kept rows of each item."""
        masks = {modality: kwargs.pop(field, None) for modality, field in KEEP_MASK_FIELDS.items()}
        embeddings = super().embed_multimodal(**kwargs)
        if all(mask is None for mask in masks.values()):
            return embeddings
        per_item: list[torch.Tensor] = []
        for modality in _modality_order(kwargs):
            grid = torch.as_tensor(kwargs[f"{modality}_grid_thw"])
            sizes = _tokens_per_image(grid, self.visual.spatial_merge_size)
            mask = masks[modality]
            if mask is None:
                per_item.extend(torch.ones(size, dtype=torch.bool) for size in sizes)
                continue
            if isinstance(mask, (list, tuple)):
                mask = torch.cat([torch.as_tensor(part).flatten() for part in mask])
            per_item.extend(mask.to(torch.bool).split(sizes))
        if len(per_item) != len(embeddings):
            raise RuntimeError(f"{len(per_item)} keep masks for {len(embeddings)} media embeddings")
        return tuple(emb[mask.to(emb.device)] for emb, mask in zip(embeddings, per_item))

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[Any]
    ) -> tuple[torch.Tensor, int]:
        """M-RoPE positions of a (possibly pruned) prompt: kept tokens at their original (t, h, w)."""
        merge_size = self.config.vision_config.spatial_merge_size
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        pieces: list[np.ndarray] = []
        text_start = 0
        next_position = 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset = feature.mm_position.offset
            text_length = offset - text_start
            pieces.append(np.broadcast_to(np.arange(text_length), (3, text_length)) + next_position)
            next_position += text_length
            grid, seconds_per_grid = self._feature_grid(feature)
            media = compute_mrope_for_media(
                grid, merge_size, tokens_per_second=tokens_per_second, video_second_per_grid=seconds_per_grid
            )[:, :3].T.numpy()
            full = media + next_position
            mask = feature.data.get(KEEP_MASK_FIELDS[feature.modality])
            kept = full if mask is None else full[:, mask.data.numpy().astype(bool)]
            if kept.shape[1] != feature.mm_position.length:
                raise KeepSetError(
                    f"{feature.mm_position.length} placeholders for {kept.shape[1]} kept visual tokens"
                )
            pieces.append(kept)
            # Text after the media continues from the unpruned grid (HF get_rope_index on the full sequence).
            next_position = int(full.max()) + 1
            text_start = offset + kept.shape[1]
        if text_start < len(input_tokens):
            text_length = len(input_tokens) - text_start
            pieces.append(np.broadcast_to(np.arange(text_length), (3, text_length)) + next_position)
            next_position += text_length
        positions = np.concatenate(pieces, axis=1).astype(np.int64)
        return torch.from_numpy(positions), next_position - len(input_tokens)

    @staticmethod
    def _feature_grid(feature: Any) -> tuple[torch.Tensor, float]:
        if feature.modality == "image":
            return feature.data["image_grid_thw"].data, 1.0
        seconds = feature.data.get("second_per_grid_ts")
        seconds_per_grid = float(seconds.data.item()) if seconds is not None else 1.0
        return feature.data["video_grid_thw"].data, seconds_per_grid

"""Qwen2.5-VL for vLLM with a per-request visual-token keep set: pruned prefill, pruned KV cache.

How a keep set travels (and why this way)
-----------------------------------------
A request carries its keep set in ``mm_processor_kwargs``::

    {"prompt": ..., "multi_modal_data": {"image": img},
     "mm_processor_kwargs": {"kept_indices": [3, 7, ...], "visual_tokens_total": 256}}

1. *Processor* (front-end process). ``PrunableQwen2_5_VLMultiModalProcessor`` pops the two keys before
   the HF processor sees them, validates the keep set against the image's real token count N
   (``services.sparsity.budgets.keep_mask``: empty, unsorted, duplicated, out of range, or an image
   whose N differs from ``visual_tokens_total`` -> ``KeepSetError`` naming the value), and stores a
   boolean ``image_keep_mask`` (N,) as one more per-image field. The prompt update then emits exactly
   ``len(kept)`` ``<|image_pad|>`` placeholders, so the scheduler, the prefill and the KV cache only
   ever see the kept tokens. Without a keep set the mask is all-true and N placeholders are emitted:
   stock behaviour.
2. *Caches.* vLLM hashes ``mm_processor_kwargs`` into every image's multimodal hash
   (``ProcessorInputs.get_mm_hashes``). That hash keys the processor cache, the encoder cache and the
   prefix-cache blocks after the image, so an embedding pruned for one budget is never served to
   another, while the text before the image still shares prefix blocks. No ``cache_salt`` needed.
3. *Encoder* (worker). ``embed_multimodal`` runs the full vision tower + merger (the kept tokens'
   features depend on the whole image, exactly as in the HF training forward) and returns only the
   rows the mask keeps. Those fill the ``len(kept)`` placeholders.
4. *Positions.* ``get_mrope_input_positions`` gives each kept token its original (t, h, w) M-RoPE
   coordinates (``compute_mrope_for_media`` from vLLM's EVS module), and text after the image continues
   from the *unpruned* grid, as the HF ``get_rope_index`` does on the full sequence. The training
   forward (``services.modeling.pruned_forward``) drops the same rows from that full sequence, so both
   sides agree position by position.

Videos go the same way: a request with ``{"video": (frames, metadata)}`` and a keep set over all the video's
N = t*h*w/merge^2 visual tokens (t-major, as the vision tower emits them) gets a ``video_keep_mask`` and
``len(kept)`` ``<|video_pad|>`` placeholders; each kept token keeps its (t, h, w) position, t spaced by
``tokens_per_second * second_per_grid_ts``, and text after the video continues from the unpruned video's
largest position + 1. One keep set applies to one image or one video per request.

Why not vLLM's EVS runner path (``is_multimodal_pruning_enabled`` + ``recompute_mrope_positions``)? It
is switched on only by a global ``video_pruning_rate`` and rewrites positions after the encoder from
four channels appended to every embedding. Our keep set is known before the request is scheduled, so
the positions can be right from the start; no runner patch and no global switch are needed. Keep
``video_pruning_rate`` unset with this model.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from services.vllm_plugin.keep_sets import (
    KEEP_MASK_FIELD,
    KEPT_INDICES_KWARG,
    VISUAL_TOKENS_TOTAL_KWARG,
    KeepSetModelMixin,
    KeepSetProcessorMixin,
)

__all__ = [
    "KEEP_MASK_FIELD",
    "KEPT_INDICES_KWARG",
    "VISUAL_TOKENS_TOTAL_KWARG",
    "PrunableQwen2_5_VLForConditionalGeneration",
    "PrunableQwen2_5_VLMultiModalProcessor",
]


class PrunableQwen2_5_VLMultiModalProcessor(KeepSetProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    """Stock Qwen2.5-VL processing plus a per-image keep mask and len(kept) image placeholders."""


@MULTIMODAL_REGISTRY.register_processor(
    PrunableQwen2_5_VLMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class PrunableQwen2_5_VLForConditionalGeneration(KeepSetModelMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL that keeps only each image's masked visual tokens, at their original M-RoPE positions."""

"""Qwen2-VL for vLLM with per-request keep sets: the same mechanism as ``qwen2_5_vl`` (see there).

Stock vLLM has no EVS hook for Qwen2-VL; the keep-set mixins need none, because positions are set
from the keep mask before the request runs.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from services.vllm_plugin.keep_sets import KeepSetModelMixin, KeepSetProcessorMixin


class PrunableQwen2VLMultiModalProcessor(KeepSetProcessorMixin, Qwen2VLMultiModalProcessor):
    """Stock Qwen2-VL processing plus a per-image keep mask and len(kept) image placeholders."""


@MULTIMODAL_REGISTRY.register_processor(
    PrunableQwen2VLMultiModalProcessor,
    info=Qwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class PrunableQwen2VLForConditionalGeneration(KeepSetModelMixin, Qwen2VLForConditionalGeneration):
    """Qwen2-VL that keeps only each image's masked visual tokens, at their original M-RoPE positions."""

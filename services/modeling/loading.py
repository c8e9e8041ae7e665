"""Load a Qwen2.5-VL checkpoint folder (the tiny model or a real one) with its processor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration

from services.model_folders import check_model_folder
from services.modeling.vision_attention import VISION_ATTENTION_MODES, use_packed_vision_attention


def load_model_and_processor(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    vision_attention: str = "packed",
) -> tuple[Qwen2_5_VLForConditionalGeneration, Any]:
    """Load the model (eval mode) and its processor from a checkpoint folder.

    vision_attention: "packed" (one attention call per window size, ``services.modeling.vision_attention``) or
    "per_window" (HF's own loop).
    """
    if vision_attention not in VISION_ATTENTION_MODES:
        raise ValueError(f"vision_attention must be one of {VISION_ATTENTION_MODES}, got {vision_attention!r}")
    folder = check_model_folder(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device)
    model.eval()
    if vision_attention == "packed":
        use_packed_vision_attention(model)
    processor = AutoProcessor.from_pretrained(folder)
    # Left padding keeps each row's prompt end aligned for batched generation.
    processor.tokenizer.padding_side = "left"
    return model, processor


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint folder's config declares (float32 when it declares none)."""
    declared = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    return getattr(torch, str(declared or "float32").removeprefix("torch."))

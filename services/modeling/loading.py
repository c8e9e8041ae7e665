"""Load a Qwen2.5-VL checkpoint folder (the tiny model or a real one) with its processor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

REQUIRED_FILES = ("config.json",)


def load_model_and_processor(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Qwen2_5_VLForConditionalGeneration, Any]:
    """Load the model (eval mode) and its processor from a checkpoint folder."""
    folder = Path(path)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a model folder: missing {', '.join(missing)}")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device)
    model.eval()
    processor = AutoProcessor.from_pretrained(folder)
    # Left padding keeps each row's prompt end aligned for batched generation.
    processor.tokenizer.padding_side = "left"
    return model, processor

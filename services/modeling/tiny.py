"""Build a tiny Qwen2.5-VL (random weights, local tokenizer and processor) that transformers and vLLM load."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from services.modeling.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, train_bpe_tokenizer

PATCH_SIZE = 14
SPATIAL_MERGE_SIZE = 2
PIXELS_PER_VISUAL_TOKEN_SIDE = PATCH_SIZE * SPATIAL_MERGE_SIZE  # 28 px per visual token after the 2x2 merge

# Qwen2.5-VL's image normalization (OpenAI CLIP statistics).
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# Words of the bundled tasks, so the trained BPE gives each answer one or two tokens even without a corpus.
# Answers follow the template's "assistant\n", so they are listed alone too (no leading space); repeats
# reach the trainer's min_frequency.
_TASK_WORDS = ["red", "green", "blue", "yellow", "purple", "orange", "circle", "square", "triangle", "diamond", "yes", "no", "top", "left", "top", "right", "bottom", "left", "bottom", "right", "row", "column", "digit", "colour", "shape"]
BUILTIN_CORPUS: tuple[str, ...] = (
    *(_TASK_WORDS * 3),
    *[str(digit) for digit in range(10)],
    *(["top left", "top right", "bottom left", "bottom right"] * 3),
    "What colour is the circle? What shape is the red object? How many squares are there?",
    "Where is the blue triangle? What digit is in row 2, column 3? Is the digit in row 1, column 4 a 7?",
    "You are a helpful assistant.",
    "user assistant system",
) * 2


class TinyModelSpec(BaseModel):
    """Sizes of the tiny Qwen2.5-VL: small enough to train in minutes on 2 CPU cores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(1024, ge=300, le=65_536, description="BPE vocabulary incl. special tokens.")
    hidden_size: int = Field(128, ge=32, description="Text decoder width.")
    intermediate_size: int = Field(512, ge=32, description="Text decoder MLP width.")
    num_hidden_layers: int = Field(4, ge=3, description="Decoder layers; the pruning scorer reads layer 2.")
    num_attention_heads: int = Field(4, ge=1, description="Text attention heads.")
    num_key_value_heads: int = Field(2, ge=1, description="Text KV heads (GQA).")
    vision_depth: int = Field(2, ge=1, description="Vision transformer blocks.")
    vision_hidden_size: int = Field(128, ge=32, description="Vision transformer width.")
    vision_intermediate_size: int = Field(256, ge=32, description="Vision MLP width.")
    vision_num_heads: int = Field(4, ge=1, description="Vision attention heads.")
    window_size: int = Field(112, ge=28, description="Vision window-attention size in pixels.")
    min_pixels: int = Field(28 * 28 * 4, ge=28 * 28, description="Processor lower bound on image area.")
    max_pixels: int = Field(896 * 896, ge=28 * 28, description="Processor upper bound on image area.")
    max_position_embeddings: int = Field(4096, ge=256, description="Longest sequence.")
    rope_theta: float = Field(
        10.0, gt=1.0,
        description="Text M-RoPE base. Small on purpose: the w axis gets the lowest frequencies, and at "
        "head_dim 32 with Qwen's 1e6 (or 1e4) a 16-token-wide image is all one angle to the decoder.",
    )
    seed: int = Field(0, description="Seed of the random initial weights.")

    @model_validator(mode="after")
    def _shapes_fit(self) -> TinyModelSpec:
        head_dim, remainder = divmod(self.hidden_size, self.num_attention_heads)
        if remainder or head_dim % 4:
            raise ValueError(f"hidden_size={self.hidden_size} must split into heads of a multiple of 4 dims")
        if head_dim not in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256):
            raise ValueError(f"text head_dim={head_dim} is not a head size vLLM's CPU attention supports")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.vision_hidden_size % self.vision_num_heads:
            raise ValueError("vision_hidden_size must be a multiple of vision_num_heads")
        return self

    @property
    def text_head_dim(self) -> int:
        """Per-head width of the text decoder."""
        return self.hidden_size // self.num_attention_heads


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) in Qwen's 2:3:3 proportion."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def visual_tokens_for(height: int, width: int) -> int:
    """Visual tokens an image of this (already 28-aligned) size becomes after the 2x2 merge."""
    for side in (height, width):
        if side % PIXELS_PER_VISUAL_TOKEN_SIDE:
            raise ValueError(f"image side {side} px is not a multiple of {PIXELS_PER_VISUAL_TOKEN_SIDE}")
    return (height // PIXELS_PER_VISUAL_TOKEN_SIDE) * (width // PIXELS_PER_VISUAL_TOKEN_SIDE)


def build_config(spec: TinyModelSpec, token_ids: dict[str, int]) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL config for `spec`, wired to the tokenizer's special-token ids."""
    text_config = {
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": spec.rope_theta,
            "mrope_section": mrope_section(spec.text_head_dim),
        },
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
        # Untied, as in Qwen2.5-VL-7B: vLLM's in-place reload_weights updates only one side of a tied
        # embedding/LM-head pair, so a tied model would keep generating with stale output weights.
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "max_window_layers": spec.num_hidden_layers,
    }
    vision_config = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden_size,
        "intermediate_size": spec.vision_intermediate_size,
        "num_heads": spec.vision_num_heads,
        "out_hidden_size": spec.hidden_size,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": SPATIAL_MERGE_SIZE,
        "temporal_patch_size": 2,
        "window_size": spec.window_size,
        # The last block attends over the whole image, as in Qwen2.5-VL's full-attention blocks.
        "fullatt_block_indexes": [spec.vision_depth - 1],
        "tokens_per_second": 2,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_processor(tokenizer, spec: TinyModelSpec) -> Qwen2_5_VLProcessor:
    """A Qwen2.5-VL processor whose pixel bounds leave the bundled (28-aligned) images unresized."""
    bounds = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    image_processor = Qwen2VLImageProcessor(
        size=bounds,
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        patch_size=PATCH_SIZE,
        merge_size=SPATIAL_MERGE_SIZE,
        temporal_patch_size=2,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    video_processor = Qwen2VLVideoProcessor(size=bounds, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts of the whole model and of its vision and text parts (tied weights counted once)."""
    seen: set[int] = set()
    counts = {"total": 0, "vision": 0, "text": 0}
    for name, parameter in model.named_parameters(remove_duplicate=True):
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        counts["total"] += parameter.numel()
        counts["vision" if ".visual." in f".{name}" else "text"] += parameter.numel()
    return counts


def build_tiny_model(
    out_dir: str | Path,
    spec: TinyModelSpec | None = None,
    corpus: Iterable[str] | None = None,
) -> Path:
    """Build a random-weight tiny Qwen2.5-VL with its tokenizer and processor, and save it to `out_dir`."""
    spec = spec or TinyModelSpec()
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    lines = list(corpus) if corpus is not None else []
    tokenizer = train_bpe_tokenizer([*BUILTIN_CORPUS, *lines], vocab_size=spec.vocab_size)
    token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = build_config(spec.model_copy(update={"vocab_size": len(tokenizer)}), token_ids)
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config.eos_token_id = token_ids["<|im_end|>"]
    model.generation_config.pad_token_id = token_ids["<|endoftext|>"]
    model.generation_config.bos_token_id = token_ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    model.save_pretrained(out_path)
    build_processor(tokenizer, spec).save_pretrained(out_path)
    card = {"spec": spec.model_dump(), "parameters": count_parameters(model), "vocab_size": len(tokenizer)}
    (out_path / "tiny_model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out_path

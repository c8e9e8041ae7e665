"""The keep-set plugin on Qwen2-VL (no EVS hook in stock vLLM): vLLM log-probs equal the training forward's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)

from services.modeling import build_prompt, build_tiny_model
from services.modeling.pruned_forward import pruned_completion_logprobs
from services.rollout.pruned import PrunedRequest, pruned_rollouts
from services.schemas.models import Budget
from services.sparsity.scorers import TextAttentionScorer

pytestmark = pytest.mark.heavy  # starts vLLM, Ray or a benchmark: not in make test-fast

vllm = pytest.importorskip("vllm")

KEEP_RATIOS = (1.0, 0.25)
PROMPTS = 6


def _build_tiny_qwen2vl(out: Path) -> Path:
    """A random Qwen2-VL sharing the tiny Qwen2.5-VL's tokenizer, processor settings and text sizes."""
    base = build_tiny_model(out / "base")
    config25 = Qwen2_5_VLConfig.from_pretrained(base)
    text = config25.text_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        text.pop(key, None)
    config = Qwen2VLConfig(
        text_config=text,
        vision_config={"depth": 2, "embed_dim": 64, "hidden_size": config25.text_config.hidden_size,
                       "num_heads": 4, "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2},
        image_token_id=config25.image_token_id, video_token_id=config25.video_token_id,
        vision_start_token_id=config25.vision_start_token_id, vision_end_token_id=config25.vision_end_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    folder = out / "qwen2vl"
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    processor = AutoProcessor.from_pretrained(base)
    Qwen2VLProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                     video_processor=processor.video_processor,
                     chat_template=processor.chat_template).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen2vl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    folder = _build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny-qwen2vl"))
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        llm = vllm.LLM(model=str(folder), enforce_eager=True, dtype="float32", max_model_len=1024, seed=0,
                       limit_mm_per_prompt={"image": 1})
        yield model, processor, llm
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.slow  # a second engine start; Qwen2-VL is the secondary model family
def test_qwen2vl_pruned_logprobs_match_the_training_forward(qwen2vl: tuple) -> None:
    model, processor, llm = qwen2vl
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 256, (196, 308, 3), dtype=np.uint8))
              for i in range(PROMPTS)]
    params = vllm.SamplingParams(temperature=1.0, max_tokens=6, logprobs=0)
    requests = [PrunedRequest(image, "What colour is the circle?", Budget(kind="keep_ratio", value=ratio), params)
                for ratio in KEEP_RATIOS for image in images]
    rollouts = pruned_rollouts(llm, model, processor, TextAttentionScorer(layer=2), requests, None)
    worst = 0.0
    for request, rollout in zip(requests, rollouts):
        assert rollout.engine_prompt_token_ids.count(model.config.image_token_id) == rollout.visual_tokens_kept
        encoded = processor(text=[build_prompt(processor, request.question)], images=[request.image],
                            return_tensors="pt")
        ids = torch.tensor([rollout.prompt_token_ids + rollout.completion_token_ids])
        with torch.no_grad():
            recomputed = pruned_completion_logprobs(model, ids, encoded["pixel_values"], encoded["image_grid_thw"],
                                                    rollout.kept_indices, len(rollout.completion_token_ids))
        worst = max(worst, float((recomputed - torch.tensor(rollout.completion_logprobs)).abs().max()))
    print(f"\nQwen2-VL max |delta| log-prob: {worst:.3g}")
    assert worst <= 1e-3
    assert {r.visual_tokens_kept for r in rollouts} == {77, 20}

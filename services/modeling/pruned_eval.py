"""Greedy answers on a pruned visual-token set, for the 'before RL' rows of the eval report.

It uses the same scorer, selection and pruned forward as training (services.sparsity and
services.modeling.pruned_forward), so the accuracy it reports is the one the RL starts from. Decoding
re-runs the whole pruned sequence per new token (no KV cache): the answers are one or two tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from services.modeling.batching import generation_inputs


@dataclass(frozen=True)
class PrunedAnswer:
    """One greedy answer under one keep ratio, with the kept share of visual tokens."""

    text: str
    visual_tokens_kept: int
    visual_tokens_total: int


@torch.no_grad()
def pruned_greedy_answer(
    model: torch.nn.Module, processor: Any, question: str, image: Image.Image, keep_ratio: float,
    scorer_name: str = "text_attention", scorer_layer: int = 2, max_new_tokens: int = 8,
) -> PrunedAnswer:
    """Score the visual tokens, keep the top ceil(r*N), and decode greedily on the kept tokens."""
    from services.modeling.pruned_forward import decoder_logits, embed_full_sequence, prune_sequence
    from services.sparsity import KeepRatio, select
    from services.sparsity.scorers import ScorerInputs, build_scorer

    inputs = generation_inputs(processor, [question], [image])
    prompt = ScorerInputs(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"])
    scores = build_scorer(scorer_name, layer=scorer_layer).score(model, prompt)
    selection = select(scores, KeepRatio(keep_ratio))
    eos_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    input_ids = inputs["input_ids"]
    new_tokens: list[int] = []
    for _ in range(max_new_tokens):
        sequence = embed_full_sequence(model, input_ids, inputs["pixel_values"], inputs["image_grid_thw"])
        inputs_embeds, position_ids, _ = prune_sequence(sequence, selection.kept_indices)
        next_token = int(decoder_logits(model, inputs_embeds, position_ids)[0, -1].argmax())
        if next_token == eos_id:
            break
        new_tokens.append(next_token)
        input_ids = torch.cat([input_ids, torch.tensor([[next_token]], dtype=input_ids.dtype)], dim=1)
    text = processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    return PrunedAnswer(text, selection.visual_tokens_kept, selection.visual_tokens_total)


def pruned_greedy_answers(
    model: torch.nn.Module, processor: Any, questions: Sequence[str], images: Sequence[Image.Image],
    keep_ratio: float, scorer_name: str = "text_attention", scorer_layer: int = 2,
) -> list[PrunedAnswer]:
    """pruned_greedy_answer over a list of (question, image) pairs."""
    return [
        pruned_greedy_answer(model, processor, question, image, keep_ratio, scorer_name, scorer_layer)
        for question, image in zip(questions, images, strict=True)
    ]

"""Scorers on a real (random-weight) tiny Qwen2.5-VL: the layer-K attention score is the model's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from learner.algorithms import kept_mass_loss
from services.modeling import build_prompt, build_tiny_model, load_model_and_processor
from services.sparsity import KeepRatio, MassThreshold, select
from services.sparsity.scorers import FeatureNormScorer, ScorerInputs, TextAttentionScorer, build_scorer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    model, processor = load_model_and_processor(folder)
    return folder, model, processor


def _inputs(processor: object, side: int = 224, question: str = "What colour is the circle?") -> ScorerInputs:
    pixels = (np.random.RandomState(1).rand(side, side, 3) * 255).astype("uint8")
    prompt = build_prompt(processor, question)
    encoded = processor(text=[prompt], images=[Image.fromarray(pixels)], return_tensors="pt")
    return ScorerInputs(encoded["input_ids"], encoded["pixel_values"], encoded["image_grid_thw"])


@pytest.mark.parametrize("layer", [0, 2])
def test_text_attention_matches_the_models_eager_attention(tiny: tuple, layer: int) -> None:
    folder, model, processor = tiny
    inputs = _inputs(processor)
    scores = TextAttentionScorer(layer=layer).score(model, inputs)
    eager = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    ids = inputs.input_ids
    image_mask = ids == eager.config.image_token_id
    with torch.no_grad():
        out = eager(input_ids=ids, pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw,
                    mm_token_type_ids=image_mask.int(), output_attentions=True)
    visual = torch.nonzero(image_mask[0]).flatten()
    queries = slice(int(visual[-1]) + 1, ids.shape[1])
    expected = out.attentions[layer][0][:, queries][..., visual].mean(dim=(0, 1))
    assert scores.shape == (visual.numel(),)
    torch.testing.assert_close(scores, expected.float(), rtol=1e-4, atol=1e-6)
    # A different layer is a different signal: the knob is not ignored.
    other = TextAttentionScorer(layer=1 - min(layer, 1)).score(model, inputs)
    assert not torch.allclose(scores, other)


def test_feature_norm_is_query_agnostic_and_plugs_into_selection(tiny: tuple) -> None:
    _, model, processor = tiny
    inputs = _inputs(processor)
    scorer = build_scorer("feature_norm")
    assert isinstance(scorer, FeatureNormScorer)
    scores = scorer.score(model, inputs)
    other_question = _inputs(processor, question="How many squares are there?")
    assert not torch.equal(inputs.input_ids, other_question.input_ids)
    torch.testing.assert_close(scores, scorer.score(model, other_question))
    # The query-aware default does depend on the question.
    attention = TextAttentionScorer()
    assert not torch.allclose(attention.score(model, inputs), attention.score(model, other_question))
    selection = select(scores, KeepRatio(0.25))
    assert selection.visual_tokens_kept == 16
    assert set(selection.kept_indices) == set(torch.topk(scores, 16).indices.tolist())


def test_unknown_scorer_and_bad_layer_are_named(tiny: tuple) -> None:
    _, model, processor = tiny
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        build_scorer("nope")
    with pytest.raises(ValueError, match="layer must lie in"):
        TextAttentionScorer(layer=99).score(model, _inputs(processor))


def test_kept_mass_steps_concentrate_attention_so_a_fixed_tau_keeps_fewer_tokens(tiny: tuple) -> None:
    """The learner's kept-set term, through the scorer's autograd path, makes a fixed tau prune more."""
    folder, _, processor = tiny
    model, _ = load_model_and_processor(folder)  # a private copy: this test trains it
    inputs = _inputs(processor)
    scorer = TextAttentionScorer()
    tau = MassThreshold(0.9)
    before = select(scorer.score(model, inputs), tau)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(10):
        scores = scorer.differentiable_score(model, inputs)
        kept = select(scores.detach(), tau).kept_indices
        mask = torch.zeros(1, scores.numel(), dtype=torch.bool)
        mask[0, list(kept)] = True
        loss, _ = kept_mass_loss(scores, mask, torch.ones(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = select(scorer.score(model, inputs), tau)
    assert after.reduction_ratio > before.reduction_ratio + 0.1

"""The SFT's grounding loss: which visual tokens an answer is read from, and the attention mass on them."""

from __future__ import annotations

import torch

from learner.grounding import answer_token_mask, attention_mass_loss
from services.data.layout import Layout
from services.modeling.batching import IGNORE_INDEX


def test_answer_mask_covers_the_answer_cells_only() -> None:
    layout = Layout(id="d", cells_per_side=2, cell_pixels=112, cells=[], answer_cells=[(0, 1)])
    mask = answer_token_mask(layout, 8, 8).view(8, 8)
    assert mask[:4, 4:].all() and mask.sum() == 16


def test_attention_mass_loss_is_low_only_when_the_answer_query_looks_at_the_answer_tokens() -> None:
    image_token = 9
    input_ids = torch.tensor([[1, 9, 9, 9, 9, 2, 3, 4]])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 6:] = input_ids[0, 6:]  # the answer starts at 6, so position 5 predicts it
    mask = torch.tensor([False, False, True, False])  # the third visual token, at position 3

    def attention_with(query_row: torch.Tensor) -> torch.Tensor:
        weights = torch.full((1, 2, 8, 8), 1 / 8)
        weights[0, :, 5] = query_row
        return weights

    on_target = torch.zeros(8)
    on_target[3] = 1.0
    elsewhere = torch.zeros(8)
    elsewhere[1] = 1.0
    low = attention_mass_loss(attention_with(on_target), input_ids, labels, image_token, [mask], heads=2)
    high = attention_mass_loss(attention_with(elsewhere), input_ids, labels, image_token, [mask], heads=2)
    assert low.item() < 1e-5
    assert high.item() > 10
    assert attention_mass_loss(attention_with(on_target), input_ids, labels, image_token,
                               [torch.zeros(4, dtype=torch.bool)], heads=2) is None

"""The SFT's grounding loss: which visual tokens an answer is read from, and the attention mass on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures.tiny_model import BUNDLED_TASKS, base_model_folder  # noqa: F401

from learner.grounding import (
    CONTENT_CLASSES,
    VisualTokenProbe,
    answer_token_mask,
    attention_mass_loss,
    token_content_labels,
)
from services.data import load_dataset, open_image
from services.data.layout import CellContent, Layout, load_layouts
from services.modeling import load_model_and_processor
from services.modeling.batching import IGNORE_INDEX, training_inputs


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


def test_content_labels_name_each_tokens_cell_and_leave_the_rest_empty() -> None:
    one_token_cells = Layout(id="s", cells_per_side=8, cell_pixels=28,
                             cells=[CellContent(row=1, column=2, colour="red", shape="circle")])
    labels = token_content_labels(one_token_cells, 8, 8).view(8, 8)
    assert labels[1, 2] == CONTENT_CLASSES.index("red circle")
    assert (labels == CONTENT_CLASSES.index("empty")).sum() == 63
    digit_cells = Layout(id="d", cells_per_side=2, cell_pixels=112,
                         cells=[CellContent(row=r, column=c, digit=2 * r + c) for r in range(2) for c in range(2)])
    labels = token_content_labels(digit_cells, 8, 8).view(8, 8)
    assert labels[:4, 4:].eq(CONTENT_CLASSES.index("1")).all() and labels[4:, :4].eq(CONTENT_CLASSES.index("2")).all()


@pytest.mark.parametrize("family", ["scenes", "digits"])
def test_probe_reads_the_models_visual_tokens_and_learns_them(family: str, base_model_folder: Path) -> None:  # noqa: F811
    torch.manual_seed(0)
    model, processor = load_model_and_processor(base_model_folder)
    split = BUNDLED_TASKS / family / "val.jsonl"
    items, layouts = load_dataset(split)[:4], load_layouts(split)
    batch = training_inputs(processor, [it.task.question for it in items], [open_image(it.image_path) for it in items],
                            [it.task.answer for it in items])
    probe = VisualTokenProbe(model)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.01)  # visual tokens have norms near 100
    losses = []
    for _ in range(30):
        with torch.no_grad():
            model(**batch)
        loss = probe.loss([layouts[it.task.id] for it in items], batch["image_grid_thw"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    probe.detach()
    assert losses[-1] < 0.5 * losses[0]
    model(**batch)
    with pytest.raises(RuntimeError, match="no forward pass"):
        probe.loss([layouts[it.task.id] for it in items], batch["image_grid_thw"])

"""Grounding loss for SFT from scratch: some heads of one late decoder layer learn where the answer is read from.

On a multi-object image the answer loss alone teaches the decoder where to look only slowly: attention
starts uniform over the image, and a model from scratch sits on the answer prior for hundreds of steps.
The bundled generators record which cells an answer is read from (services.data.layout), as grounding
datasets record boxes; this loss makes a few heads attend there from the position that predicts the answer.

The saved model is a plain Qwen2.5-VL. The pruning scorer's layer is left unsupervised, so how well the base
model prunes is its own, and RL has that to improve. (A linear probe on the visual tokens, tried as a second
auxiliary loss, slowed single-digit reading five-fold and was dropped.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.data.layout import Layout
from services.modeling.batching import IGNORE_INDEX
from services.modeling.tiny import PIXELS_PER_VISUAL_TOKEN_SIDE as PIXELS_PER_TOKEN


def answer_token_mask(layout: Layout, token_rows: int, token_columns: int) -> torch.Tensor:
    """(token_rows * token_columns,) True for the visual tokens inside the cells the answer is read from."""
    answer_cells = {tuple(cell) for cell in layout.answer_cells}
    return torch.tensor([(token_row * PIXELS_PER_TOKEN // layout.cell_pixels,
                          token_column * PIXELS_PER_TOKEN // layout.cell_pixels) in answer_cells
                         for token_row in range(token_rows) for token_column in range(token_columns)])


def attention_mass_loss(attention: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                        image_token_id: int, answer_masks: Sequence[torch.Tensor], heads: int) -> torch.Tensor | None:
    """Mean over rows and the first `heads` heads of -log(attention mass on the answer's visual tokens).

    attention: (B, H, L, L) softmax weights of one layer; input_ids, labels: (B, L) with IGNORE_INDEX before the
    answer; answer_masks[b]: (visual tokens of row b,). The query is the position that predicts the first
    answer token. Rows whose answer reads no cell (e.g. a count of zero) are skipped; None if all are.
    """
    losses = []
    for row, mask in enumerate(answer_masks):
        if not mask.any():
            continue
        query = int((labels[row] != IGNORE_INDEX).nonzero()[0]) - 1
        visual_positions = (input_ids[row] == image_token_id).nonzero().squeeze(-1)
        mass = attention[row, :heads, query, visual_positions[mask]].sum(dim=-1)
        losses.append(-torch.log(mass.clamp_min(1e-6)).mean())
    return torch.stack(losses).mean() if losses else None

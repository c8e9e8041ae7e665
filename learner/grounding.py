"""Auxiliary losses for SFT from scratch: teach the vision tower what each token shows, the decoder where to look.

On a multi-object image the answer loss alone teaches a model from scratch only slowly: attention starts
uniform over the 64 visual tokens, so an object's token reaches the answer diluted, and the model sits on the
answer prior for hundreds of steps (a 20-px shape, alone on a 224-px canvas: no progress in 300 steps). The
bundled generators record what every cell of an image holds (services.data.layout), as grounding datasets
record boxes. Two losses use it:

- `VisualTokenProbe`: a linear head on the merged visual tokens predicts the content of the cell under each
  token. Every token gets its own undiluted gradient, and the same 20-px-shape task is solved in ~270 steps.
  The head is thrown away after SFT.
- `attention_mass_loss`: a few heads of one late decoder layer attend to the answer's cells from the
  position that predicts the answer.

The saved model is a plain Qwen2.5-VL. The pruning scorer's layer is left unsupervised, so how well the base
model prunes is its own, and RL has that to improve.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.data.layout import Layout
from services.data.scenes import COLOURS, SHAPES
from services.modeling.batching import IGNORE_INDEX
from services.modeling.tiny import PIXELS_PER_VISUAL_TOKEN_SIDE as PIXELS_PER_TOKEN


def token_grids(image_grid_thw: torch.Tensor) -> list[tuple[int, int]]:
    """(rows, columns) of merged visual tokens of each image, from the processor's patch grid (2x2 merge)."""
    return [(int(h) // 2, int(w) // 2) for _t, h, w in image_grid_thw.tolist()]


def token_cells(layout: Layout, token_rows: int, token_columns: int) -> list[tuple[int, int]]:
    """The layout cell (row, column) under each visual token, in the tokens' raster order."""
    return [(token_row * PIXELS_PER_TOKEN // layout.cell_pixels, token_column * PIXELS_PER_TOKEN // layout.cell_pixels)
            for token_row in range(token_rows) for token_column in range(token_columns)]


def answer_token_mask(layout: Layout, token_rows: int, token_columns: int) -> torch.Tensor:
    """(token_rows * token_columns,) True for the visual tokens inside the cells the answer is read from."""
    answer_cells = {tuple(cell) for cell in layout.answer_cells}
    return torch.tensor([cell in answer_cells for cell in token_cells(layout, token_rows, token_columns)])


CONTENT_CLASSES: tuple[str, ...] = (
    "empty", *(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES), *(str(digit) for digit in range(10))
)


def token_content_labels(layout: Layout, token_rows: int, token_columns: int) -> torch.Tensor:
    """(token_rows * token_columns,) index into CONTENT_CLASSES of what the cell under each visual token holds."""
    by_cell = {(cell.row, cell.column): str(cell.digit) if cell.digit is not None else f"{cell.colour} {cell.shape}"
               for cell in layout.cells}
    return torch.tensor([CONTENT_CLASSES.index(by_cell.get(cell, "empty"))
                         for cell in token_cells(layout, token_rows, token_columns)])


class VisualTokenProbe(torch.nn.Module):
    """A linear head on the vision tower's merged tokens, trained to name what the cell under each token holds."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.head = torch.nn.Linear(model.config.vision_config.out_hidden_size, len(CONTENT_CLASSES))
        self._tokens: torch.Tensor | None = None
        self._hook = model.model.visual.register_forward_hook(self._capture)

    def _capture(self, _module: torch.nn.Module, _inputs: tuple, output) -> None:
        self._tokens = output.pooler_output

    def loss(self, layouts: Sequence[Layout], image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the head over the visual tokens of the model's last forward (one layout per image)."""
        if self._tokens is None:
            raise RuntimeError("the probe has seen no forward pass of the model's vision tower")
        labels = torch.cat([token_content_labels(layout, *grid)
                            for layout, grid in zip(layouts, token_grids(image_grid_thw), strict=True)])
        tokens, self._tokens = self._tokens, None
        return torch.nn.functional.cross_entropy(self.head(tokens), labels)

    def detach(self) -> None:
        """Stop capturing the model's visual tokens (after training)."""
        self._hook.remove()


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


def set_text_attention(model: torch.nn.Module, implementation: str) -> str:
    """Switch the decoder's attention kernel, leaving the vision tower's; returns the decoder's previous one.

    The answer-attention loss reads the decoder's softmax weights, which only "eager" attention returns.
    """
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": implementation,
                                   "vision_config": model.config.vision_config._attn_implementation})
    return previous


def video_answer_token_mask(layout: Layout, grid_thw: Sequence[int], step: int, cell: tuple[int, int]) -> torch.Tensor:
    """(slots * rows * columns,) True for the merged visual tokens that show ``cell`` at ``step`` of a video.

    grid_thw: the processor's patch grid (temporal slots, h, w) before the 2x2 merge; layout.cells holds one
    entry per step, and each step spans the same number of temporal slots.
    """
    slots, (token_rows, token_columns) = int(grid_thw[0]), token_grids(torch.tensor([list(grid_thw)]))[0]
    steps = len(layout.cells)
    if slots % steps:
        raise ValueError(f"{slots} temporal slots do not split evenly into the layout's {steps} steps")
    in_cell = torch.tensor([token_cell == cell for token_cell in token_cells(layout, token_rows, token_columns)])
    per_step = slots // steps
    in_step = torch.zeros(slots, dtype=torch.bool)
    in_step[step * per_step:(step + 1) * per_step] = True
    return (in_step[:, None] & in_cell[None, :]).flatten()

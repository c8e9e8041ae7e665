"""Moving digits: one handwritten UCI digit that visits a different cell of a small grid at each step of a video.

A video has ``steps`` steps (default 4 on a 2 x 2 grid, so the digit visits every cell once); each step is shown
for ``frames_per_step`` frames (default 2, Qwen2.5-VL's temporal patch), so one step is exactly one temporal slot
of visual tokens and, at the frame folder's 2 frames per second, one second. Questions ask when, where or what:

- ``when``: "At which step is the digit in row r, column c?" -> the step, counting from 1;
- ``where_row`` / ``where_column``: "In which row (column) is the digit at step k?" -> the row (column);
- ``which``: "Which digit moves across the grid?" -> the digit;
- ``path`` (training only): "Where is the digit at each step?" -> "12 22 21 11" (row and column per step).

The frames carry the digit grids' position tint, so a from-scratch vision tower can tell cells apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.data.digits import digit_pool
from services.data.layout import CellContent, GeneratedItem, Layout, cell_words, position_tint
from services.data.mix import check_question_mix
from services.schemas.models import AnswerType, Task

QUESTION_KINDS: tuple[str, ...] = ("when", "where_row", "where_column", "which", "path")
PER_STEP_KINDS: tuple[str, ...] = ("when", "where_row", "where_column")  # one question per step of a video
# "path" asks for every step's cell at once ("12 22 21 11": row then column, step by step): dense supervision for
# SFT's train mix, as "read_grid" is for the digit grids; the default (evaluation) mix asks single questions.
FAMILY = "video"


class MovingDigitSpec(BaseModel):
    """Parameters of the moving-digit video generator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    frame_size: int = Field(112, ge=56, description="Frame side in px (grid_size cells of 28*k px each).")
    grid_size: int = Field(2, ge=2, le=8, description="Rows and columns of the grid the digit moves on.")
    steps: int = Field(4, ge=2, le=16, description="Steps of the video; the digit is in a new cell at each.")
    frames_per_step: int = Field(2, ge=1, le=8, description="Frames each step is shown for (2: one slot).")
    question_mix: dict[str, float] = Field(
        default_factory=lambda: {"when": 1.0, "where_row": 1.0, "where_column": 1.0, "which": 1.0},
        description="Relative weight of each question kind.",
    )
    position_tint: float = Field(48.0, ge=0, le=96, description="Grey levels of the red/blue position fade.")

    @model_validator(mode="after")
    def _consistent(self) -> MovingDigitSpec:
        if self.frame_size % (self.grid_size * 28):
            raise ValueError(f"frame_size={self.frame_size} must be a multiple of 28*grid_size={28 * self.grid_size}")
        if self.steps > self.grid_size**2:
            raise ValueError(f"steps={self.steps} exceeds the grid's {self.grid_size**2} cells (one new cell a step)")
        check_question_mix(self.question_mix, QUESTION_KINDS)
        return self

    @property
    def cell_pixels(self) -> int:
        """Side of one grid cell in px."""
        return self.frame_size // self.grid_size


def render_step(digit: np.ndarray, cell: int, spec: MovingDigitSpec) -> Image.Image:
    """One frame: the digit (8, 8) in 0..16 as dark ink in grid cell ``cell`` (row-major) of a tinted page."""
    size = spec.cell_pixels
    margin = max(1, size // 14)
    inner = size - 2 * margin
    page = np.full((spec.frame_size, spec.frame_size), 255, dtype=np.uint8)
    ink = Image.fromarray((255.0 - digit * (255.0 / 16.0)).astype(np.uint8), mode="L")
    row, column = divmod(cell, spec.grid_size)
    top, left = row * size + margin, column * size + margin
    page[top:top + inner, left:left + inner] = np.asarray(ink.resize((inner, inner), Image.Resampling.BILINEAR))
    tinted = page[:, :, None] / 255.0 * (255.0 - position_tint(spec.frame_size, spec.position_tint))
    return Image.fromarray(np.round(tinted).astype(np.uint8), mode="RGB")


class MovingDigitQuestion(NamedTuple):
    """A question about one video, its answer, and the (step, cell) the answer is read at (None: no single one)."""

    question: str
    answer: str
    step: int | None
    cell: int | None


def question_about(kind: str, step: int, path: list[int], label: int, grid_size: int) -> MovingDigitQuestion:
    """The ``kind`` question about step ``step`` (0-based) of a digit ``label`` visiting ``path`` (row-major)."""
    row, column = divmod(path[step], grid_size)
    if kind == "when":
        return MovingDigitQuestion(f"At which step is the digit in {cell_words(row, column)}?", str(step + 1),
                                   step, path[step])
    if kind == "where_row":
        return MovingDigitQuestion(f"In which row is the digit at step {step + 1}?", str(row + 1), step, path[step])
    if kind == "where_column":
        return MovingDigitQuestion(f"In which column is the digit at step {step + 1}?", str(column + 1),
                                   step, path[step])
    if kind == "which":
        return MovingDigitQuestion("Which digit moves across the grid?", str(label), None, None)
    if kind == "path":
        cells = [divmod(cell, grid_size) for cell in path]
        return MovingDigitQuestion("Where is the digit at each step?",
                                   " ".join(f"{r + 1}{c + 1}" for r, c in cells), None, None)
    raise ValueError(f"question kind={kind!r} is not one of {QUESTION_KINDS}")


def ask_question(rng: np.random.Generator, kind: str, path: list[int], label: int, grid_size: int) -> tuple[str, str]:
    """(question, answer) about a digit ``label`` that visits the cells ``path`` (row-major), one per step."""
    asked = question_about(kind, int(rng.integers(len(path))), path, label, grid_size)
    return asked.question, asked.answer


def generate_moving_digits(
    rng: np.random.Generator, spec: MovingDigitSpec, split: str, count: int, pool: str | None = None
) -> Iterator[GeneratedItem]:
    """Yield ``count`` (task, frames, layout) items; the task names its frame folder videos/<split>/<id>."""
    pool_images, pool_labels = digit_pool(pool or split)
    kinds = list(spec.question_mix)
    weights = np.array([spec.question_mix[kind] for kind in kinds], dtype=float)
    for index in range(count):
        chosen = int(rng.integers(len(pool_labels)))
        path = [int(cell) for cell in rng.permutation(spec.grid_size**2)[:spec.steps]]
        frames = [render_step(pool_images[chosen], cell, spec) for cell in path for _ in range(spec.frames_per_step)]
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        question, answer = ask_question(rng, kind, path, int(pool_labels[chosen]), spec.grid_size)
        task_id = f"{FAMILY}-{split}-{index:06d}"
        answer_type = AnswerType.EXACT if kind == "path" else AnswerType.NUMBER
        task = Task(id=task_id, video=f"videos/{split}/{task_id}", question=question, answer=answer,
                    answer_type=answer_type)
        cells = [CellContent(row=cell // spec.grid_size, column=cell % spec.grid_size, digit=int(pool_labels[chosen]))
                 for cell in path]
        layout = Layout(id=task_id, cells_per_side=spec.grid_size, cell_pixels=spec.cell_pixels, cells=cells)
        yield GeneratedItem(task, frames, layout)

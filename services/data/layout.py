"""What a generated image holds, cell by cell: the ground truth behind its answers, for auxiliary supervision.

Each split's `<split>.layout.jsonl` sits beside its task JSONL, one line per task id. The SFT recipe reads it
to teach the vision tower what every visual token shows; nothing at serving time needs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from services.schemas.models import Task


class CellContent(BaseModel):
    """One occupied cell of the image's placement grid: a coloured shape or a digit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    row: int = Field(ge=0)
    column: int = Field(ge=0)
    colour: str | None = None
    shape: str | None = None
    digit: int | None = Field(None, ge=0, le=9)


class Layout(BaseModel):
    """The placement grid of one generated image and what each occupied cell holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="Task id the layout belongs to.")
    cells_per_side: int = Field(ge=1)
    cell_pixels: int = Field(ge=1)
    cells: list[CellContent]
    answer_cells: list[tuple[int, int]] = Field(
        default_factory=list, description="(row, column) of each cell the answer is read from."
    )


class GeneratedItem(NamedTuple):
    """A generator's output: the task line, its image (a video task: its frames), and the layout."""

    task: Task
    image: Image.Image | list[Image.Image]
    layout: Layout


def layout_path(jsonl_path: Path) -> Path:
    """The layout file that sits beside a split's JSONL."""
    return jsonl_path.with_suffix(".layout.jsonl")


def load_layouts(jsonl_path: Path) -> dict[str, Layout]:
    """Task id -> layout for a split; {} when the split has no layout file (e.g. a user's dataset)."""
    path = layout_path(Path(jsonl_path))
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as lines:
        layouts = [Layout.model_validate_json(line) for line in lines if line.strip()]
    return {layout.id: layout for layout in layouts}


def cell_words(row: int, column: int) -> str:
    """A cell of a placement grid as the questions name it, counting from 1: 'row 1, column 2'."""
    return f"row {row + 1}, column {column + 1}"


def position_tint(image_size: int, strength: float) -> np.ndarray:
    """(size, size, 3) offsets that darken red left-to-right and blue top-to-bottom by up to `strength`.

    Qwen-style vision towers see position only through relative (rotary) attention, and on a flat background
    every patch looks alike, so a from-scratch model cannot tell where a token is. A faint tint gives each
    patch its place, as the texture of a real photo does.
    """
    ramp = np.linspace(0.0, strength, image_size, dtype=np.float32)
    tint = np.zeros((image_size, image_size, 3), dtype=np.float32)
    tint[:, :, 0] = ramp[None, :]
    tint[:, :, 2] = ramp[:, None]
    return tint


def write_layouts(layouts: list[Layout], jsonl_path: Path) -> None:
    """Write a split's layouts beside its JSONL (renamed into place last)."""
    path = layout_path(jsonl_path)
    partial = path.with_suffix(".partial")
    partial.write_text("".join(json.dumps(layout.model_dump(mode="json", exclude_none=True)) + "\n"
                               for layout in layouts), encoding="utf-8")
    partial.replace(path)

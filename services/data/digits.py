"""Digit grids: real handwritten UCI digits (scikit-learn's bundled copy) in a grid, and a question about a cell."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.data.layout import CellContent, GeneratedItem, Layout, cell_words, position_tint
from services.data.mix import check_question_mix
from services.schemas.models import AnswerType, Task

QUESTION_KINDS: tuple[str, ...] = ("digit_at", "is_digit", "read_grid")
# "read_grid" asks for every digit at once: dense supervision that teaches a model from scratch to see
# the digits (used in the SFT's train mix; the default val/test mix asks about single cells).
# "is_digit" ("Is the digit in row 1, column 2 a 7?") is not in the default val/test mix: its answer is an
# equality of two inputs, which no single feature predicts, and the bundled model (trained with it in its
# mix) stays on the yes/no prior (chance on test) while it reads the same cells for "digit_at" (99%).
# Fractions of the 1797 UCI digit images that each split may draw from; the pools never overlap.
POOL_FRACTIONS: dict[str, float] = {"train": 0.7, "val": 0.1, "test": 0.2}
POOL_SEED = 1797  # fixed, so the train/test digit images stay apart whatever seed a dataset uses


class DigitGridSpec(BaseModel):
    """Parameters of the digit-grid generator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(224, ge=56, description="Image side in px (grid_size cells of 28*k px each).")
    grid_size: int = Field(2, ge=1, le=16, description="Rows and columns of digits (2 at 224 px: 112-px digits).")
    question_mix: dict[str, float] = Field(
        default_factory=lambda: {"digit_at": 1.0},
        description="Relative weight of each question kind.",
    )
    position_tint: float = Field(
        48.0, ge=0, le=96, description="Grey levels the page's red/blue fade across the image (0: plain grey)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> DigitGridSpec:
        if self.image_size % (self.grid_size * 28):
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of 28*grid_size={28 * self.grid_size}, "
                "so every cell covers whole visual tokens"
            )
        check_question_mix(self.question_mix, QUESTION_KINDS)
        return self

    @property
    def cell_pixels(self) -> int:
        """Side of one grid cell in px."""
        return self.image_size // self.grid_size


@lru_cache(maxsize=1)
def _uci_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def digit_pool(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The (images (n, 8, 8) in 0..16, labels (n,)) a split draws from; disjoint across splits."""
    if split not in POOL_FRACTIONS:
        raise ValueError(f"split={split!r} is not one of {tuple(POOL_FRACTIONS)}")
    images, labels = _uci_digits()
    order = np.random.default_rng(POOL_SEED).permutation(len(labels))
    bounds = np.cumsum([0] + [round(fraction * len(labels)) for fraction in POOL_FRACTIONS.values()])
    bounds[-1] = len(labels)
    start = bounds[list(POOL_FRACTIONS).index(split)]
    stop = bounds[list(POOL_FRACTIONS).index(split) + 1]
    chosen = order[start:stop]
    return images[chosen], labels[chosen]


def render_grid(digit_images: np.ndarray, spec: DigitGridSpec) -> Image.Image:
    """Dark ink on a light page: digit_images (grid_size**2, 8, 8) laid out row-major."""
    cell = spec.cell_pixels
    # A margin keeps neighbouring digits from touching.
    margin = max(1, cell // 14)
    inner = cell - 2 * margin
    page = np.full((spec.image_size, spec.image_size), 255, dtype=np.uint8)
    for position, digit in enumerate(digit_images):
        row, column = divmod(position, spec.grid_size)
        ink = Image.fromarray((255.0 - digit * (255.0 / 16.0)).astype(np.uint8), mode="L")
        top, left = row * cell + margin, column * cell + margin
        page[top:top + inner, left:left + inner] = np.asarray(ink.resize((inner, inner), Image.Resampling.BILINEAR))
    if spec.position_tint == 0:
        # Grey PNGs are a third the size; every reader converts to RGB (services.data.loader.open_image).
        return Image.fromarray(page, mode="L")
    tinted = page[:, :, None] / 255.0 * (255.0 - position_tint(spec.image_size, spec.position_tint))
    return Image.fromarray(np.round(tinted).astype(np.uint8), mode="RGB")


def ask_question(
    rng: np.random.Generator, labels: np.ndarray, kind: str, grid_size: int
) -> tuple[str, str, AnswerType, list[int]]:
    """(question, answer, answer_type, cell positions the answer is read from); rows and columns count from 1."""
    position = int(rng.integers(len(labels)))
    row, column = divmod(position, grid_size)
    where = cell_words(row, column)
    if kind == "digit_at":
        return f"What digit is in {where}?", str(int(labels[position])), AnswerType.NUMBER, [position]
    if kind == "is_digit":
        # Balanced yes/no: half the time ask about the true digit, otherwise about another one.
        truth = int(labels[position])
        asked = truth if rng.random() < 0.5 else int(rng.choice([d for d in range(10) if d != truth]))
        answer = "yes" if asked == truth else "no"
        return f"Is the digit in {where} a {asked}?", answer, AnswerType.YES_NO, [position]
    if kind == "read_grid":
        rows = ["".join(str(int(d)) for d in labels[r * grid_size:(r + 1) * grid_size]) for r in range(grid_size)]
        return "Read the digits row by row.", " ".join(rows), AnswerType.EXACT, list(range(len(labels)))
    raise ValueError(f"question kind={kind!r} is not one of {QUESTION_KINDS}")


def digit_layout(task_id: str, labels: np.ndarray, read_from: list[int], spec: DigitGridSpec) -> Layout:
    """The grid, the digit in each of its cells, and the cells the answer is read from."""
    cells = [CellContent(row=position // spec.grid_size, column=position % spec.grid_size, digit=int(label))
             for position, label in enumerate(labels)]
    return Layout(id=task_id, cells_per_side=spec.grid_size, cell_pixels=spec.cell_pixels, cells=cells,
                  answer_cells=[divmod(position, spec.grid_size) for position in read_from])


def generate_digit_grids(
    rng: np.random.Generator, spec: DigitGridSpec, split: str, count: int, pool: str | None = None
) -> Iterator[GeneratedItem]:
    """Yield `count` (task, image, layout) items for one split, drawing digits from `pool` (default: the split's)."""
    pool_images, pool_labels = digit_pool(pool or split)
    kinds = list(spec.question_mix)
    weights = np.array([spec.question_mix[kind] for kind in kinds], dtype=float)
    for index in range(count):
        chosen = rng.choice(len(pool_labels), size=spec.grid_size**2, replace=False)
        image = render_grid(pool_images[chosen], spec)
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        question, answer, answer_type, read_from = ask_question(rng, pool_labels[chosen], kind, spec.grid_size)
        task_id = f"digits-{split}-{index:06d}"
        task = Task(id=task_id, image=f"images/{split}/{task_id}.png", question=question, answer=answer,
                    answer_type=answer_type)
        yield GeneratedItem(task, image, digit_layout(task_id, pool_labels[chosen], read_from, spec))

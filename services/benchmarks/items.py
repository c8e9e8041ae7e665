"""What every benchmark adapter returns: task items, each with the group and category its metric needs."""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from services.data.loader import DatasetError, DatasetItem
from services.schemas.models import Task

# Questions that ask for a short answer end with the instruction the field's evaluation prompts use
# (LLaVA / lmms-eval), so a model is asked the way the published numbers were measured.
SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class BenchmarkItem:
    """One question of a benchmark: the project's task (with its image) plus what its metric groups by.

    group: items judged together (MME: the two questions of one image; circular MMBench: the rotations of
    one question); category: the benchmark's own category or split name, for the per-category breakdown.
    """

    item: DatasetItem
    group: str
    category: str


@dataclass(frozen=True)
class Benchmark:
    """A benchmark read from its files: its format name, where it came from and its items in file order."""

    format: str
    source: Path
    items: list[BenchmarkItem]


def benchmark_item(task: Task, image_path: Path, group: str, category: str) -> BenchmarkItem:
    """A BenchmarkItem whose image must exist (the error names the task and the missing path)."""
    if not image_path.is_file():
        raise FileNotFoundError(f"task {task.id}: image {image_path} does not exist")
    return BenchmarkItem(DatasetItem(task=task, image_path=image_path.resolve()), group, category)


def require_items(source: Path, items: list[BenchmarkItem], errors: list[str]) -> list[BenchmarkItem]:
    """The items, or DatasetError listing every bad record (and one error when there are no items at all)."""
    if errors:
        raise DatasetError(source, errors)
    if not items:
        raise DatasetError(source, [f"{source}: no benchmark items found"])
    return items


def read_json(path: Path) -> Any:
    """A JSON file's content; DatasetError naming the file and position when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetError(path, [f"{path}: invalid JSON ({error.msg} at line {error.lineno})"]) from None


def write_base64_image(encoded: str, folder: Path, stem: str) -> Path:
    """Decode a base64 image (MMBench-style TSV cell) into folder/stem.<its format>; reuse an equal file."""
    try:
        raw = base64.b64decode(encoded, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            extension = (image.format or "png").lower().replace("jpeg", "jpg")
            image.verify()
    except (binascii.Error, ValueError, UnidentifiedImageError) as error:
        raise ValueError(f"image cell is not a base64 image ({error})") from None
    path = folder / f"{stem}.{extension}"
    if not (path.is_file() and path.read_bytes() == raw):
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
    return path

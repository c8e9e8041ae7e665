"""Write generated tasks as a JSONL split with its images on disk (paths relative to the JSONL file)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from services.data.layout import GeneratedItem, write_layouts

SPLITS = ("train", "val", "test")


def split_seed(seed: int, split: str, salt: int) -> list[int]:
    """Entropy for one split (or named training part) of one family, so no two share a random stream."""
    if not split or not split.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"split={split!r} must be a non-empty name of letters, digits, '-' and '_'")
    code = SPLITS.index(split) if split in SPLITS else zlib.crc32(split.encode())
    return [seed, code, salt]


def write_split(items: Iterable[GeneratedItem], out_dir: Path, split: str, total: int, label: str) -> Path:
    """Save each image (or video's frames) where its task names it, its task line into <split>.jsonl, its layout beside."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl_path = out_dir / f"{split}.jsonl"
    partial_path = jsonl_path.with_suffix(".jsonl.partial")
    layouts = []
    with partial_path.open("w", encoding="utf-8") as lines:
        for task, image, layout in tqdm(items, total=total, desc=f"{label}/{split}", unit="item", leave=False):
            if task.is_video:  # a frame folder: 000.png, 001.png, ... (services.data.video reads it in order)
                folder = out_dir / task.media
                folder.mkdir(parents=True, exist_ok=True)
                for index, frame in enumerate(image):
                    frame.save(folder / f"{index:03d}.png", format="PNG", optimize=False)
            else:
                (out_dir / task.media).parent.mkdir(parents=True, exist_ok=True)
                image.save(out_dir / task.media, format="PNG", optimize=False)
            lines.write(json.dumps(task.model_dump(mode="json", exclude_none=True)) + "\n")
            layouts.append(layout)
    write_layouts(layouts, jsonl_path)
    # Rename last, so a half-written split never looks complete.
    partial_path.replace(jsonl_path)
    return jsonl_path

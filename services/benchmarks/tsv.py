"""The VLMEvalKit / OpenCompass TSV layout shared by MMBench and MME: one row per question, images inline."""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from services.benchmarks.items import write_base64_image
from services.data.loader import DatasetError

_MISSING = ("", "nan", "none")


def cell(row: dict[str, str], column: str) -> str:
    """A cell's text, with pandas' empty markers ('nan', 'None') read as empty."""
    value = (row.get(column) or "").strip()
    return "" if value.lower() in _MISSING else value


def read_rows(tsv: Path, required: Sequence[str], layout: str) -> list[dict[str, str]]:
    """The rows of a TSV as dicts; DatasetError naming the missing columns of `layout`."""
    if not tsv.is_file():
        raise FileNotFoundError(f"{layout} TSV {tsv} does not exist")
    # Base64 images exceed the csv module's default 128 KiB field limit.
    csv.field_size_limit(sys.maxsize)
    with tsv.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = [column for column in required if column not in (reader.fieldnames or [])]
        if missing:
            reason = f"{tsv}: missing column(s) {', '.join(missing)} (a {layout} TSV has {', '.join(required)})"
            raise DatasetError(tsv, [reason])
        rows = list(reader)
    bad = [f"{tsv}: row {number}: index {row['index']!r} is not a number"
           for number, row in enumerate(rows, start=2) if not (row["index"] or "").strip().isdigit()]
    if bad:
        raise DatasetError(tsv, bad)
    return rows


def image_sources(rows: Sequence[dict[str, str]]) -> dict[int, int]:
    """Row index -> index of the row holding its image (itself, or the row its digit-only image cell names)."""
    sources = {}
    for row in rows:
        image = cell(row, "image")
        sources[int(row["index"])] = int(image) if image.isdigit() and len(image) < 16 else int(row["index"])
    return sources


def decode_images(rows: Sequence[dict[str, str]], image_dir: Path, errors: list[str], tsv: Path) -> dict[int, Path]:
    """Every row's image written once under image_dir (named by the row holding it), by row index."""
    cells = {int(row["index"]): cell(row, "image") for row in rows}
    paths: dict[int, Path] = {}
    written: dict[int, Path] = {}
    for index, source in image_sources(rows).items():
        if source not in cells or cells[source].isdigit() or not cells[source]:
            errors.append(f"{tsv}: index {index}: image refers to row {source}, which holds no image")
            continue
        try:
            if source not in written:
                written[source] = write_base64_image(cells[source], image_dir, str(source))
            paths[index] = written[source]
        except ValueError as error:
            errors.append(f"{tsv}: index {index}: {error}")
    return paths

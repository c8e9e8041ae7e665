"""MMBench (Liu et al. 2023): multiple choice in a TSV with base64 images, optionally circular.

Columns (as OpenCompass / VLMEvalKit distribute it): index, question, hint, A, B, C, D (more letters allowed,
empty cells mean fewer options), answer (a letter), category, image (base64, or the index of another row
whose image it shares), plus columns this reader ignores (l2-category, split, source, comment).

Circular evaluation (MMBench's CircularEval): a question counts only if it is answered right under every
rotation of its options. A file whose rows include the rotated copies (index + k * 1,000,000, as the dev
TSVs do) is used as it is; otherwise the rotations are generated here. Without it, only the original rows
(index < 1,000,000) are asked.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from string import ascii_uppercase

from services.benchmarks.items import BenchmarkItem, benchmark_item, require_items, write_base64_image
from services.data.loader import DatasetError
from services.schemas.models import AnswerType, Task

FORMAT = "mmbench"
ROTATION_STRIDE = 1_000_000  # MMBench numbers the k-th rotated copy of question i as i + k * 1e6
INSTRUCTION = "Answer with the option's letter from the given choices directly."
REQUIRED_COLUMNS = ("index", "question", "answer", "image", "A", "B")
_MISSING = ("", "nan", "none")


def _cell(row: dict[str, str], column: str) -> str:
    value = (row.get(column) or "").strip()
    return "" if value.lower() in _MISSING else value


def mmbench_question(question: str, hint: str, options: list[str]) -> str:
    """The prompt: hint, question, lettered options and the answer instruction, one per line."""
    lines = [hint] if hint else []
    lines += [question, *(f"{letter}. {text}" for letter, text in zip(ascii_uppercase, options)), INSTRUCTION]
    return "\n".join(lines)


def _read_rows(tsv: Path) -> list[dict[str, str]]:
    # Base64 images exceed the csv module's default 128 KiB field limit.
    csv.field_size_limit(sys.maxsize)
    with tsv.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = [column for column in REQUIRED_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            reason = (f"{tsv}: missing column(s) {', '.join(missing)} (an MMBench TSV has "
                      f"{', '.join(REQUIRED_COLUMNS)}, C, D, hint, category)")
            raise DatasetError(tsv, [reason])
        return list(reader)


def _options(row: dict[str, str]) -> list[str]:
    """The option texts A, B, ... up to the first empty letter."""
    options = []
    for letter in ascii_uppercase:
        text = _cell(row, letter)
        if not text:
            break
        options.append(text)
    return options


def rotate(options: list[str], answer: int, shift: int) -> tuple[list[str], int]:
    """The options rotated left by shift, and where the right answer moved to."""
    count = len(options)
    return [options[(position + shift) % count] for position in range(count)], (answer - shift) % count


def _image_paths(rows: list[dict[str, str]], image_dir: Path, errors: list[str], tsv: Path) -> dict[int, Path]:
    """Every row's image written once under image_dir, by row index; a digit cell borrows that row's image."""
    by_index = {int(row["index"]): _cell(row, "image") for row in rows if row["index"].strip().isdigit()}
    paths: dict[int, Path] = {}
    for index, cell in by_index.items():
        source = int(cell) if cell.isdigit() and len(cell) < 16 else index
        if source not in by_index or by_index[source].isdigit():
            errors.append(f"{tsv}: index {index}: image refers to row {source}, which holds no image")
            continue
        try:
            paths[index] = write_base64_image(by_index[source], image_dir, str(source))
        except ValueError as error:
            errors.append(f"{tsv}: index {index}: {error}")
    return paths


def _row_items(row: dict[str, str], image: Path, image_root: Path, generate_rotations: bool) -> list[BenchmarkItem]:
    index = int(row["index"])
    options = _options(row)
    answer = _cell(row, "answer").upper()
    if len(options) < 2 or answer not in tuple(ascii_uppercase[: len(options)]):
        raise ValueError(f"answer {answer!r} is not one of the {len(options)} option letters (a test-split row "
                         "without answers cannot be scored)")
    shifts = range(len(options)) if generate_rotations else [0]
    items = []
    for shift in shifts:
        rotated, right = rotate(options, ascii_uppercase.index(answer), shift)
        suffix = f"/rot{shift}" if generate_rotations and shift else ""
        task = Task(id=f"{FORMAT}/{index}{suffix}", image=image.relative_to(image_root).as_posix(),
                    question=mmbench_question(_cell(row, "question"), _cell(row, "hint"), rotated),
                    answer=ascii_uppercase[right], answer_type=AnswerType.CHOICE, choices=rotated)
        items.append(benchmark_item(task, image, str(index % ROTATION_STRIDE), _cell(row, "category")))
    return items


def load_mmbench(tsv: Path, image_dir: Path, circular: bool = False) -> list[BenchmarkItem]:
    """The questions of an MMBench TSV (images decoded into image_dir/<file stem>/), every rotation when circular."""
    if not tsv.is_file():
        raise FileNotFoundError(f"MMBench TSV {tsv} does not exist")
    rows = _read_rows(tsv)
    image_dir = image_dir / tsv.stem  # row indices repeat across MMBench files (EN, CN, dev, test)
    errors: list[str] = [f"{tsv}: row {number}: index {row['index']!r} is not a number"
                         for number, row in enumerate(rows, start=2) if not row["index"].strip().isdigit()]
    images = _image_paths(rows, image_dir, errors, tsv)
    has_copies = any(index >= ROTATION_STRIDE for index in images)
    items: list[BenchmarkItem] = []
    for row in rows:
        index = int(row["index"]) if row["index"].strip().isdigit() else -1
        if index not in images or (index >= ROTATION_STRIDE and not circular):
            continue
        try:
            items.extend(_row_items(row, images[index], image_dir, circular and not has_copies))
        except ValueError as error:
            errors.append(f"{tsv}: index {index}: {error}")
    return require_items(tsv, items, errors)

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

from pathlib import Path
from string import ascii_uppercase

from services.benchmarks.items import BenchmarkItem, benchmark_item, require_items
from services.benchmarks.tsv import cell, decode_images, read_rows
from services.schemas.models import AnswerType, Task

FORMAT = "mmbench"
ROTATION_STRIDE = 1_000_000  # MMBench numbers the k-th rotated copy of question i as i + k * 1e6
INSTRUCTION = "Answer with the option's letter from the given choices directly."
REQUIRED_COLUMNS = ("index", "question", "answer", "image", "A", "B")


def mmbench_question(question: str, hint: str, options: list[str]) -> str:
    """The prompt: hint, question, lettered options and the answer instruction, one per line."""
    lines = [hint] if hint else []
    lines += [question, *(f"{letter}. {text}" for letter, text in zip(ascii_uppercase, options)), INSTRUCTION]
    return "\n".join(lines)


def _options(row: dict[str, str]) -> list[str]:
    """The option texts A, B, ... up to the first empty letter."""
    options = []
    for letter in ascii_uppercase:
        text = cell(row, letter)
        if not text:
            break
        options.append(text)
    return options


def rotate(options: list[str], answer: int, shift: int) -> tuple[list[str], int]:
    """The options rotated left by shift, and where the right answer moved to."""
    count = len(options)
    return [options[(position + shift) % count] for position in range(count)], (answer - shift) % count


def _row_items(row: dict[str, str], image: Path, image_root: Path, generate_rotations: bool) -> list[BenchmarkItem]:
    index = int(row["index"])
    options = _options(row)
    answer = cell(row, "answer").upper()
    if len(options) < 2 or answer not in tuple(ascii_uppercase[: len(options)]):
        raise ValueError(f"answer {answer!r} is not one of the {len(options)} option letters (a test-split row "
                         "without answers cannot be scored)")
    shifts = range(len(options)) if generate_rotations else [0]
    items = []
    for shift in shifts:
        rotated, right = rotate(options, ascii_uppercase.index(answer), shift)
        suffix = f"/rot{shift}" if generate_rotations and shift else ""
        task = Task(id=f"{FORMAT}/{index}{suffix}", image=image.relative_to(image_root).as_posix(),
                    question=mmbench_question(cell(row, "question"), cell(row, "hint"), rotated),
                    answer=ascii_uppercase[right], answer_type=AnswerType.CHOICE, choices=rotated)
        items.append(benchmark_item(task, image, str(index % ROTATION_STRIDE), cell(row, "category")))
    return items


def load_mmbench(tsv: Path, image_dir: Path, circular: bool = False) -> list[BenchmarkItem]:
    """The questions of an MMBench TSV (images decoded into image_dir/<file stem>/), every rotation when circular."""
    rows = read_rows(tsv, REQUIRED_COLUMNS, "MMBench")
    errors: list[str] = []
    # Row indices repeat across MMBench files (EN, CN, dev, test): each file decodes into its own folder.
    images = decode_images(rows, image_dir / tsv.stem, errors, tsv)
    has_copies = any(index >= ROTATION_STRIDE for index in images)
    items: list[BenchmarkItem] = []
    for row in rows:
        index = int(row["index"])
        if index not in images or (index >= ROTATION_STRIDE and not circular):
            continue
        try:
            items.extend(_row_items(row, images[index], image_dir / tsv.stem, circular and not has_copies))
        except ValueError as error:
            errors.append(f"{tsv}: index {index}: {error}")
    return require_items(tsv, items, errors)

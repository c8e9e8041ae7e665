"""MME (Fu et al. 2023): yes/no question pairs per image, in the release folder's layout.

    MME_Benchmark_release_version/
        existence/000000006040.jpg + existence/000000006040.txt          (image and questions side by side)
        artwork/images/10002.jpg + artwork/questions_answers_YN/10002.txt  (or in two subfolders)

Each .txt holds one question per line, `question<TAB>Yes|No` (two per image). VLMEvalKit's MME.tsv is read
too: columns index, question, answer, category, image (base64, or the index of the row holding it) and
image_path (the pair's key). Every question becomes a 'yes_no' task; the two questions of an image form one
group, so accuracy+ (both right) can be computed.
"""

from __future__ import annotations

from pathlib import Path

from services.benchmarks.items import BenchmarkItem, benchmark_item, require_items
from services.benchmarks.tsv import cell, decode_images, image_sources, read_rows
from services.schemas.models import AnswerType, Task

FORMAT = "mme"
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
TSV_COLUMNS = ("index", "question", "answer", "category", "image")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def _question_files(category: Path) -> tuple[Path, list[Path]]:
    """(folder of the images, the question files) of one category folder, in either layout."""
    split = category / "questions_answers_YN"
    if split.is_dir():
        return category / "images", sorted(split.glob("*.txt"))
    return category, sorted(category.glob("*.txt"))


def _image_of(folder: Path, stem: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no image {stem}.jpg/.png in {folder}")


def _category_items(root: Path, category: Path, errors: list[str]) -> list[BenchmarkItem]:
    image_folder, question_files = _question_files(category)
    items = []
    for question_file in question_files:
        lines = [line for line in question_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        try:
            image = _image_of(image_folder, question_file.stem)
        except FileNotFoundError as error:
            errors.append(f"{question_file}: {error}")
            continue
        group = f"{category.name}/{question_file.stem}"
        for number, line in enumerate(lines, start=1):
            question, tab, answer = line.rpartition("\t")
            if not tab or answer.strip().lower() not in ("yes", "no") or not question.strip():
                errors.append(f"{question_file}:{number}: expected 'question<TAB>Yes|No', got {line[:80]!r}")
                continue
            task = Task(id=f"{FORMAT}/{group}/{number}", image=image.relative_to(root).as_posix(),
                        question=question.strip(), answer=answer.strip().lower(), answer_type=AnswerType.YES_NO)
            items.append(benchmark_item(task, image, group, category.name))
    return items


def _tsv_item(row: dict[str, str], image: Path, image_root: Path, image_source: int) -> BenchmarkItem:
    question, answer, category = cell(row, "question"), cell(row, "answer").lower(), cell(row, "category")
    if answer not in ("yes", "no") or not question or not category:
        raise ValueError(f"expected a question, a category and answer Yes/No, got answer {answer!r}")
    task = Task(id=f"{FORMAT}/{row['index'].strip()}", image=image.relative_to(image_root).as_posix(),
                question=question, answer=answer, answer_type=AnswerType.YES_NO)
    return benchmark_item(task, image, f"{category}/{cell(row, 'image_path') or image_source}", category)


def load_mme_tsv(tsv: Path, image_dir: Path) -> list[BenchmarkItem]:
    """Every question of VLMEvalKit's MME.tsv (images decoded into image_dir/<file stem>/)."""
    rows = read_rows(tsv, TSV_COLUMNS, "MME")
    errors: list[str] = []
    images = decode_images(rows, image_dir / tsv.stem, errors, tsv)
    sources = image_sources(rows)
    items = []
    for row in rows:
        index = int(row["index"])
        if index not in images:
            continue
        try:
            items.append(_tsv_item(row, images[index], image_dir / tsv.stem, sources[index]))
        except ValueError as error:
            errors.append(f"{tsv}: index {index}: {error}")
    return require_items(tsv, items, errors)


def load_mme(path: Path, image_dir: Path) -> list[BenchmarkItem]:
    """Every question of an MME release folder (one subfolder per category, categories in name order) or of
    VLMEvalKit's MME.tsv (a file)."""
    if path.is_file():
        return load_mme_tsv(path, image_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"MME folder {path} does not exist (expected the release folder with one "
                                "subfolder per category, or MME.tsv)")
    errors: list[str] = []
    items = []
    for category in sorted(child for child in path.iterdir() if child.is_dir()):
        items.extend(_category_items(path, category, errors))
    return require_items(path, items, errors)

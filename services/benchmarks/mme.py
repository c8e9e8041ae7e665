"""MME (Fu et al. 2023): yes/no question pairs per image, in the release folder's layout.

    MME_Benchmark_release_version/
        existence/000000006040.jpg + existence/000000006040.txt          (image and questions side by side)
        artwork/images/10002.jpg + artwork/questions_answers_YN/10002.txt  (or in two subfolders)

Each .txt holds one question per line, `question<TAB>Yes|No` (two per image). Every question becomes a
'yes_no' task; the two questions of an image form one group, so accuracy+ (both right) can be computed.
"""

from __future__ import annotations

from pathlib import Path

from services.benchmarks.items import BenchmarkItem, benchmark_item, require_items
from services.schemas.models import AnswerType, Task

FORMAT = "mme"
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
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


def load_mme(root: Path) -> list[BenchmarkItem]:
    """Every question of an MME release folder (one subfolder per category), categories in name order."""
    if not root.is_dir():
        raise FileNotFoundError(f"MME folder {root} does not exist (expected the release folder with one "
                                "subfolder per category)")
    errors: list[str] = []
    items = []
    for category in sorted(path for path in root.iterdir() if path.is_dir()):
        items.extend(_category_items(root, category, errors))
    return require_items(root, items, errors)

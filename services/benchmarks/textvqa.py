"""TextVQA (Singh et al. 2019): questions with ten human answers, scored by VQA accuracy.

Layout as released: `TextVQA_0.5.1_val.json` = {"data": [{"question_id", "question", "image_id",
"answers": [10 strings], "set_name"?}, ...]} with the images in `train_images/<image_id>.jpg` beside it
(the val split's images ship in the train folder; test images in `test_images/`). The test split has no
answers and cannot be scored locally. Each question becomes a 'vqa' task: `answers` holds the human answers,
`answer` the most frequent one (for display and for `exact`-style fallbacks).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from services.benchmarks.items import SHORT_ANSWER, BenchmarkItem, benchmark_item, read_json, require_items
from services.data.loader import DatasetError
from services.schemas.models import AnswerType, Task

FORMAT = "textvqa"
IMAGE_FOLDERS = ("train_images", "test_images", "images")


def _image_of(root: Path, record: dict[str, Any]) -> Path:
    image_id = str(record["image_id"])
    for folder in IMAGE_FOLDERS:
        for suffix in (".jpg", ".png"):
            candidate = root / folder / f"{image_id}{suffix}"
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no image {image_id}.jpg in {', '.join(str(root / f) for f in IMAGE_FOLDERS)}")


def majority_answer(answers: list[str]) -> str:
    """The most frequent human answer (the first one seen among ties)."""
    return Counter(answers).most_common(1)[0][0]


def _record_item(root: Path, record: dict[str, Any]) -> BenchmarkItem:
    answers = [str(answer).strip() for answer in record.get("answers") or [] if str(answer).strip()]
    if len(answers) < 2:
        raise ValueError("has no human answers (the test split cannot be scored locally)")
    image = _image_of(root, record)
    task = Task(id=f"{FORMAT}/{record['question_id']}", image=image.relative_to(root).as_posix(),
                question=f"{str(record['question']).strip()}\n{SHORT_ANSWER}", answer=majority_answer(answers),
                answer_type=AnswerType.VQA, answers=answers)
    return benchmark_item(task, image, task.id, str(record.get("set_name") or "all"))


def load_textvqa(path: Path) -> list[BenchmarkItem]:
    """The questions of a TextVQA annotation JSON (images found beside it, see the module docstring)."""
    if not path.is_file():
        raise FileNotFoundError(f"TextVQA annotation file {path} does not exist")
    document = read_json(path)
    records = document.get("data") if isinstance(document, dict) else None
    if not isinstance(records, list):
        raise DatasetError(path, [f"{path}: expected a JSON object with a 'data' list (TextVQA_0.5.1_*.json)"])
    items: list[BenchmarkItem] = []
    errors: list[str] = []
    for number, record in enumerate(records):
        try:
            items.append(_record_item(path.parent, record))
        except KeyError as error:
            errors.append(f"{path}: data[{number}]: missing field {error}")
        except (ValueError, FileNotFoundError) as error:
            errors.append(f"{path}: data[{number}] (question_id {record.get('question_id')}): {error}")
    return require_items(path, items, errors)

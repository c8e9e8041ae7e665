"""ChartQA (Masry et al. 2022): questions about charts, scored by relaxed accuracy.

Layout as released: `test/test_human.json` and `test/test_augmented.json`, each a list of
{"imgname": "41699051005347.png", "query": "...", "label": "..."}, with the charts in `test/png/`.
Give one JSON file, or the split folder to read every such file in it; the file's stem (test_human,
test_augmented) is the item's category, and papers report the mean of the two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.benchmarks.items import SHORT_ANSWER, BenchmarkItem, benchmark_item, read_json, require_items
from services.schemas.models import AnswerType, Task

FORMAT = "chartqa"
IMAGE_FOLDER = "png"


def _record_item(path: Path, number: int, record: dict[str, Any]) -> BenchmarkItem:
    label = str(record["label"]).strip()
    if not label:
        raise ValueError("empty label")
    image = path.parent / IMAGE_FOLDER / str(record["imgname"])
    task = Task(id=f"{FORMAT}/{path.stem}/{number}", image=image.relative_to(path.parent).as_posix(),
                question=f"{str(record['query']).strip()}\n{SHORT_ANSWER}", answer=label,
                answer_type=AnswerType.RELAXED)
    return benchmark_item(task, image, task.id, path.stem)


def _file_items(path: Path, errors: list[str]) -> list[BenchmarkItem]:
    records = read_json(path)
    if not isinstance(records, list):
        errors.append(f"{path}: expected a JSON list of {{imgname, query, label}} records")
        return []
    items = []
    for number, record in enumerate(records):
        try:
            items.append(_record_item(path, number, record))
        except KeyError as error:
            errors.append(f"{path}: [{number}]: missing field {error}")
        except (TypeError, ValueError, FileNotFoundError) as error:
            errors.append(f"{path}: [{number}]: {error}")
    return items


def load_chartqa(path: Path) -> list[BenchmarkItem]:
    """The questions of a ChartQA JSON file, or of every *.json file in a split folder."""
    if not path.exists():
        raise FileNotFoundError(f"ChartQA file or folder {path} does not exist")
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    errors: list[str] = []
    items = [item for file in files for item in _file_items(file, errors)]
    return require_items(path, items, errors)

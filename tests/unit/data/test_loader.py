"""The shared dataset loader: every bad line is reported as file:line: reason, none is skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from services.data import DatasetError, load_dataset, open_image


def _line(**changes: object) -> str:
    task = {"id": "t0", "image": "images/a.png", "question": "What colour is the circle?", "answer": "red",
            "answer_type": "exact"}
    task.update(changes)
    return json.dumps({key: value for key, value in task.items() if value is not None})


@pytest.fixture()
def dataset_dir(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    Image.new("L", (56, 56), 200).save(tmp_path / "images" / "a.png")
    return tmp_path


def _write(folder: Path, lines: list[str]) -> Path:
    path = folder / "split.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_valid_lines_load_with_absolute_image_paths(dataset_dir: Path) -> None:
    path = _write(dataset_dir, [_line(), _line(id="t1", answer_type="choice", choices=["red", "blue"])])
    items = load_dataset(path)
    assert [item.task.id for item in items] == ["t0", "t1"]
    assert items[0].image_path == (dataset_dir / "images" / "a.png").resolve()
    assert open_image(items[0].image_path).mode == "RGB"


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (_line(answer_type="essay"), "answer_type"),
        (_line(answer=None), "answer: Field required"),
        (_line(extra_field=1), "extra_field"),
        (_line(answer_type="choice"), "choices"),
        (_line(image="../outside.png"), "escapes the dataset folder"),
        (_line(image="/etc/passwd"), "is absolute"),
        (_line(image="images/missing.png"), "does not exist"),
        (_line(id="t0"), "repeats line 1"),
        ("", "empty line"),
    ],
)
def test_each_bad_line_is_reported_with_file_and_line_number(dataset_dir: Path, bad_line: str, reason: str) -> None:
    path = _write(dataset_dir, [_line(), bad_line, _line(id="t9")])
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    assert caught.value.errors == [caught.value.errors[0]]
    assert caught.value.errors[0].startswith(f"{path}:2: ")
    assert reason in caught.value.errors[0]


def test_all_bad_lines_are_listed_not_just_the_first(dataset_dir: Path) -> None:
    path = _write(dataset_dir, ["{", _line(), _line(id="x", image="../a.png"), _line(id="y", answer="")])
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    assert [error.split(": ")[0] for error in caught.value.errors] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert "3 bad line(s)" in str(caught.value)


def test_an_empty_or_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        load_dataset(tmp_path / "nothing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match="holds no tasks"):
        load_dataset(empty)


def test_image_check_can_be_skipped_but_escapes_are_still_refused(dataset_dir: Path) -> None:
    assert len(load_dataset(_write(dataset_dir, [_line(image="images/later.png")]), check_images=False)) == 1
    with pytest.raises(DatasetError, match="escapes"):
        load_dataset(_write(dataset_dir, [_line(image="images/../../x.png")]), check_images=False)

"""A missing bundled split is generated on first use; anything else missing is an error."""

from pathlib import Path

import pytest

from services.data.build import ensure_bundled_split
from services.data.loader import load_dataset


def test_a_missing_bundled_train_split_is_generated_once(tmp_path: Path) -> None:
    path = tmp_path / "scenes" / "train.jsonl"
    assert ensure_bundled_split(path, count=5) == path
    first = path.read_text()
    assert len(load_dataset(path)) == 5
    ensure_bundled_split(path, count=50)  # present: left as it is
    assert path.read_text() == first


def test_unknown_paths_are_not_invented(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ensure_bundled_split(tmp_path / "mine" / "train.jsonl", count=5)
    with pytest.raises(FileNotFoundError):
        ensure_bundled_split(tmp_path / "scenes" / "other.jsonl", count=5)

"""Pieces of the SFT recipe that need no training: the schedule and the split bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from learner.sft import SFTConfig, ensure_splits, learning_rate_at
from services.data import load_dataset


def test_schedule_warms_up_then_decays_to_five_percent() -> None:
    config = SFTConfig(out=Path("x"), steps=100, warmup_steps=10, learning_rate=1e-3)
    rates = [learning_rate_at(step, config) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert learning_rate_at(100, config) == pytest.approx(5e-5)


def test_splits_are_generated_once_and_regenerated_when_their_recipe_changes(tmp_path: Path) -> None:
    config = SFTConfig(out=tmp_path / "m", data_dir=tmp_path / "tasks", train_items=4, val_items=2, test_items=3,
                       train_digit_mix={"read_grid": 1.0})
    paths = ensure_splits(config)
    assert [len(load_dataset(paths["digits"][s])) for s in ("train", "val", "test")] == [4, 2, 3]
    assert all(item.task.question.startswith("Read") for item in load_dataset(paths["digits"]["train"]))
    test_mtime = paths["digits"]["test"].stat().st_mtime_ns
    ensure_splits(config)
    assert paths["digits"]["test"].stat().st_mtime_ns == test_mtime
    changed = config.model_copy(update={"train_digit_mix": {"digit_at": 1.0}})
    ensure_splits(changed)
    assert all(item.task.question.startswith("What digit") for item in load_dataset(paths["digits"]["train"]))
    recipe = json.loads((tmp_path / "tasks" / "digits" / "train.recipe.json").read_text())
    assert recipe["question_mix"] == {"digit_at": 1.0}
    assert paths["digits"]["test"].stat().st_mtime_ns == test_mtime

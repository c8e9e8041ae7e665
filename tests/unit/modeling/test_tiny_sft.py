"""Pieces of the SFT recipe that need no training: the schedule and the split bookkeeping."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from pydantic import ValidationError

from learner.eval_metrics import parse_budgets
from learner.fresh_split import FRESH_SEED
from learner.sft import SFTConfig, TrainPart, batch_indices, ensure_splits, learning_rate_at
from services.data import load_dataset, open_image


def test_schedule_warms_up_then_decays_to_five_percent() -> None:
    config = SFTConfig(out=Path("x"), steps=100, warmup_steps=10, learning_rate=1e-3)
    rates = [learning_rate_at(step, config) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert learning_rate_at(100, config) == pytest.approx(5e-5)


def _config(tmp_path: Path, mix: dict[str, float]) -> SFTConfig:
    parts = (TrainPart(family="digits", image_size=112, grid_size=1, items=4, question_mix=mix),
             TrainPart(family="scenes", image_size=224, items=3, question_mix={"list_objects": 1.0}))
    return SFTConfig(out=tmp_path / "m", data_dir=tmp_path / "tasks", train_parts=parts, val_items=2,
                     test_items=3)


def test_train_parts_and_eval_splits_are_generated_once_and_redone_on_recipe_change(tmp_path: Path) -> None:
    train_paths, eval_paths = ensure_splits(_config(tmp_path, {"read_grid": 1.0}))
    assert [p.name for p in train_paths] == ["train-112.jsonl", "train.jsonl"]
    small = load_dataset(train_paths[0])
    assert len(small) == 4 and all(item.task.question.startswith("Read") for item in small)
    assert open_image(small[0].image_path).size == (112, 112)
    assert [len(load_dataset(eval_paths["digits"][s])) for s in ("val", "test")] == [2, 3]
    stamps = {p: p.stat().st_mtime_ns for p in [*train_paths, eval_paths["digits"]["test"]]}
    ensure_splits(_config(tmp_path, {"read_grid": 1.0}))
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    ensure_splits(_config(tmp_path, {"digit_at": 1.0}))
    assert all(item.task.question.startswith("What digit") for item in load_dataset(train_paths[0]))
    assert train_paths[1].stat().st_mtime_ns == stamps[train_paths[1]]
    assert eval_paths["digits"]["test"].stat().st_mtime_ns == stamps[eval_paths["digits"]["test"]]


def test_batches_are_seeded_shuffled_passes_over_every_item(tmp_path: Path) -> None:
    config = SFTConfig(out=tmp_path, batch_size=4)
    batches = batch_indices(20, config)
    first_pass = [index for _ in range(5) for index in next(batches)]
    assert sorted(first_pass) == list(range(20)) and first_pass != list(range(20))
    again = batch_indices(20, config)
    assert [next(again) for _ in range(5)] == [first_pass[i:i + 4] for i in range(0, 20, 4)]


def test_knobs_tried_and_not_adopted_are_gone_and_the_report_budgets_are_sf_evals(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="opening_steps"):
        SFTConfig(out=tmp_path, opening_steps=3)
    with pytest.raises(ValidationError, match="keep_ratios"):
        SFTConfig(out=tmp_path, keep_ratios=(0.5,))
    config = SFTConfig(out=tmp_path)
    assert [budget.label for budget in parse_budgets(config.eval_budgets)] == [
        "r=1", "r=0.5", "r=0.25", "r=0.125", "tau=0.94", "tau=0.975"]
    assert config.fresh_seed == FRESH_SEED != config.seed

"""The task feeder's epoch order and resumable position (no Redis: fill() is covered by integration tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from learner.feeder import FeederPosition, TaskFeeder, epoch_order, load_tasks
from services.data.loader import DatasetItem
from services.schemas import Task


def tasks(count: int) -> list[tuple[DatasetItem, str]]:
    return [
        (DatasetItem(Task(id=f"t{i}", image=f"{i}.png", question="q?", answer="1", answer_type="number"),
                     Path(f"/data/{i}.png")), "/data")
        for i in range(count)
    ]


def drain(feeder: TaskFeeder) -> list[tuple[int, str]]:
    seen = []
    while not feeder.exhausted:
        message = feeder.peek()
        seen.append((message.epoch, message.task.id))
        feeder.advance()
    return seen


def test_epoch_order_is_a_seeded_permutation_that_changes_by_epoch() -> None:
    first = epoch_order(50, seed=3, epoch=0)
    assert sorted(first) == list(range(50))
    assert first == epoch_order(50, seed=3, epoch=0)
    assert first != epoch_order(50, seed=3, epoch=1)
    assert first != epoch_order(50, seed=4, epoch=0)


def test_every_task_is_fed_once_per_epoch() -> None:
    feeder = TaskFeeder(tasks(5), epochs=3, seed=0, run_id="r")
    seen = drain(feeder)
    assert len(seen) == feeder.total == 15
    for epoch in range(3):
        assert sorted(task for e, task in seen if e == epoch) == [f"t{i}" for i in range(5)]
    assert feeder.position == FeederPosition(epoch=3, index=0, enqueued=15)


def test_a_feeder_restored_from_a_position_continues_the_same_sequence() -> None:
    full = drain(TaskFeeder(tasks(4), epochs=2, seed=7, run_id="r"))
    partial = TaskFeeder(tasks(4), epochs=2, seed=7, run_id="r")
    for _ in range(5):
        partial.advance()
    saved = FeederPosition.model_validate_json(partial.position.model_dump_json())
    resumed = TaskFeeder(tasks(4), epochs=2, seed=7, run_id="r", position=saved)
    assert drain(resumed) == full[5:]


def test_task_ids_must_be_unique_across_datasets(tmp_path: Path) -> None:
    paths = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        Image.new("RGB", (28, 28)).save(folder / "x.png")
        line = '{"id": "same", "image": "x.png", "question": "q?", "answer": "1", "answer_type": "number"}\n'
        (folder / "tasks.jsonl").write_text(line)
        paths.append(folder / "tasks.jsonl")
    assert len(load_tasks(paths[:1])) == 1
    with pytest.raises(ValueError, match="'same' appears in both"):
        load_tasks(paths)

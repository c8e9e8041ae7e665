"""The task feeder's epoch order and resumable position (no Redis: fill() is covered by integration tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from learner.feeder import BadLine, FeederPosition, TaskFeeder, epoch_order, load_tasks
from services.data.loader import DatasetError, DatasetItem
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


def test_bad_lines_are_returned_with_their_reasons_or_refused_by_file_and_line(tmp_path: Path) -> None:
    Image.new("RGB", (28, 28)).save(tmp_path / "x.png")

    def line(task_id: str, **changes: str) -> bytes:
        task = {"id": task_id, "image": "x.png", "question": "q?", "answer": "1", "answer_type": "number", **changes}
        return json.dumps(task).encode()

    lines = [
        line("good-1"),
        line("no-image", image="gone.png"),
        line("essay", answer_type="essay"),
        line("escape", image="../x.png"),
        line("huge", question="q" * 10_000),
        b'{"id": "latin-1", "question": "caf\xe9?"}',
        b'{"id": "cut',
        line("good-1"),
        line("good-2"),
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    bad: list[BadLine] = []
    assert [item.task.id for item, _root in load_tasks([path], bad)] == ["good-1", "good-2"]
    reasons = {line.where.rsplit(":", 1)[1]: line.reason for line in bad}
    assert reasons == {
        "2": f"image='gone.png' does not exist ({tmp_path / 'gone.png'})",
        "3": reasons["3"], "4": f"image='../x.png' escapes the dataset folder {tmp_path}",
        "5": reasons["5"], "6": "not UTF-8 text (byte 34 is 0xe9)", "7": reasons["7"],
        "8": "task id 'good-1' repeats an earlier line",
    }
    assert "answer_type" in reasons["3"] and "question" in reasons["5"] and "invalid JSON" in reasons["7"]
    assert bad[4].raw == lines[5]  # the raw bytes go to the dead letter, as read
    with pytest.raises(DatasetError) as refused:  # without a list to collect them, the file is refused
        load_tasks([path])
    assert len(refused.value.errors) == 7 and f"{path}:6: not UTF-8 text" in str(refused.value)


def test_run_ahead_limit_and_fill_target() -> None:
    from learner.feeder import fill_target, run_ahead_limit

    assert run_ahead_limit(None, groups_per_step=8, max_staleness=2) == 16
    assert run_ahead_limit(None, groups_per_step=8, max_staleness=0) == 8  # a step's worth even with no staleness
    assert run_ahead_limit(5, groups_per_step=8, max_staleness=2) == 5
    assert fill_target(16, task_queue_fill=32, untrained_groups=0) == 16
    assert fill_target(16, task_queue_fill=4, untrained_groups=0) == 4
    assert fill_target(16, task_queue_fill=32, untrained_groups=12) == 4
    assert fill_target(16, task_queue_fill=32, untrained_groups=20) == 0

"""Video tasks: a task names a frame folder or a video file; bad input fails with the path and the reason."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from services.data import DatasetError, load_dataset
from services.data.video import FOLDER_FPS, VideoError, load_video
from services.schemas.models import Task


def _frames(folder: Path, count: int, size: int = 56) -> Path:
    folder.mkdir(parents=True)
    for index in range(count):
        pixels = np.full((size, size, 3), 20 * index, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return folder


def _task(**fields: object) -> dict:
    task = {"id": "v0", "question": "In which frame is the digit in row 1, column 1?", "answer": "2",
            "answer_type": "number"}
    task.update(fields)
    return task


def test_a_task_names_exactly_one_of_image_and_video() -> None:
    assert Task.model_validate(_task(video="videos/v0")).is_video
    assert Task.model_validate(_task(video="videos/v0")).media == "videos/v0"
    assert not Task.model_validate(_task(image="a.png")).is_video
    for bad in (_task(), _task(image="a.png", video="videos/v0")):
        with pytest.raises(ValidationError, match="exactly one of 'image' and 'video'"):
            Task.model_validate(bad)


def test_a_frame_folder_reads_in_name_order_at_the_folder_rate(tmp_path: Path) -> None:
    folder = _frames(tmp_path / "clip", 5)
    (folder / "notes.txt").write_text("not a frame")
    video = load_video(folder)
    assert video.frames.shape == (5, 56, 56, 3) and video.frames.dtype == np.uint8
    assert [int(frame[0, 0, 0]) for frame in video.frames] == [0, 20, 40, 60, 80]
    assert video.fps == FOLDER_FPS and video.seconds_per_grid(2) == 2 / FOLDER_FPS
    assert video.metadata()["total_num_frames"] == 5 and video.metadata()["frames_indices"] == [0, 1, 2, 3, 4]


def test_a_video_file_reads_every_frame_at_its_own_rate(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 4.0, (64, 48))
    for index in range(6):
        writer.write(np.full((48, 64, 3), (40 * index, 0, 0), dtype=np.uint8))  # BGR: blue ramps up
    writer.release()
    video = load_video(path)
    assert video.frames.shape == (6, 48, 64, 3) and video.fps == pytest.approx(4.0)
    # OpenCV decodes BGR; the loader hands out RGB, so the ramp is in the last channel.
    assert int(video.frames[5, 10, 10, 2]) == pytest.approx(200, abs=8)
    assert int(video.frames[5, 10, 10, 0]) < 10


def test_bad_videos_fail_with_the_path_and_the_reason(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="does not exist"):
        load_video(tmp_path / "missing")
    with pytest.raises(VideoError, match="1 frame.*at least 2"):
        load_video(_frames(tmp_path / "short", 1))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoError, match="0 frame"):
        load_video(empty)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(VideoError, match="cannot be opened"):
        load_video(junk)
    mixed = _frames(tmp_path / "mixed", 2)
    Image.new("RGB", (28, 28)).save(mixed / "002.png")
    with pytest.raises(VideoError, match="different sizes"):
        load_video(mixed)
    broken = _frames(tmp_path / "broken", 2)
    (broken / "001.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(VideoError, match="001.png.*not a readable image"):
        load_video(broken)


def test_the_loader_locates_videos_and_reports_missing_ones_by_line(tmp_path: Path) -> None:
    _frames(tmp_path / "videos" / "v0", 4)
    lines = [_task(video="videos/v0"), _task(id="v1", video="videos/nowhere"), _task(id="v2", video="../v0")]
    path = tmp_path / "split.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(DatasetError) as caught:
        load_dataset(path)
    assert len(caught.value.errors) == 2
    assert "split.jsonl:2: video='videos/nowhere' does not exist" in caught.value.errors[0]
    assert "split.jsonl:3: video='../v0' escapes" in caught.value.errors[1]
    path.write_text(json.dumps(lines[0]) + "\n")
    [item] = load_dataset(path)
    assert item.is_video and item.image_path == (tmp_path / "videos" / "v0").resolve()
    assert load_video(item.image_path).num_frames == 4


def _ink_cell(frame: np.ndarray, grid_size: int) -> tuple[int, int]:
    """(row, column) of the grid cell holding the most ink (the darkest) in an RGB frame."""
    grey = frame.astype(float).mean(axis=-1)
    cell = frame.shape[0] // grid_size
    darkness = [[-grey[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].mean() for c in range(grid_size)]
                for r in range(grid_size)]
    return divmod(int(np.argmax(darkness)), grid_size)


def test_the_moving_digit_family_builds_frame_folders_whose_answers_the_frames_show(tmp_path: Path) -> None:
    from services.data.build import SplitSizes, build_family
    from services.data.layout import load_layouts
    from services.data.moving_digits import MovingDigitSpec

    spec = MovingDigitSpec()
    sizes = SplitSizes(train=0, val=0, test=40, rl=0)
    path = build_family("video", tmp_path / "a", seed=3, sizes=sizes, splits=("test",))["test"]
    again = build_family("video", tmp_path / "b", seed=3, sizes=sizes, splits=("test",))["test"]
    assert path.read_text() == again.read_text()  # deterministic by seed
    items, layouts = load_dataset(path), load_layouts(path)
    kinds = set()
    for item in items:
        video = load_video(item.image_path)
        assert video.frames.shape == (spec.steps * spec.frames_per_step, 112, 112, 3)
        steps = video.frames[::spec.frames_per_step]
        assert all((video.frames[i] == video.frames[i + 1]).all() for i in range(0, video.num_frames, 2))
        visited = [_ink_cell(frame, spec.grid_size) for frame in steps]
        layout = layouts[item.task.id]
        assert visited == [(cell.row, cell.column) for cell in layout.cells]
        assert len(set(visited)) == spec.steps  # a new cell at every step
        question, answer = item.task.question, item.task.answer
        if question.startswith("At which step"):
            row, column = (int(word.strip(",?")) - 1 for word in question.split()[-3::2])
            assert visited.index((row, column)) + 1 == int(answer)
        elif question.startswith("In which"):
            step = int(question.rstrip("?").split()[-1]) - 1
            assert visited[step][0 if " row " in question else 1] + 1 == int(answer)
        else:
            assert str(layout.cells[0].digit) == answer
        kinds.add(question.split()[2])
    assert kinds == {"step", "row", "column", "moves"}


def test_the_path_question_spells_every_steps_cell() -> None:
    from services.data.moving_digits import MovingDigitSpec, generate_moving_digits

    spec = MovingDigitSpec(question_mix={"path": 1.0})
    for task, frames, layout in generate_moving_digits(np.random.default_rng(1), spec, "train", 5):
        assert task.question == "Where is the digit at each step?" and task.answer_type.value == "exact"
        assert task.answer == " ".join(f"{cell.row + 1}{cell.column + 1}" for cell in layout.cells)
        visited = [_ink_cell(np.asarray(frame), spec.grid_size) for frame in frames[::spec.frames_per_step]]
        assert task.answer == " ".join(f"{r + 1}{c + 1}" for r, c in visited)

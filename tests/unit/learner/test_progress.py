"""Progress reads well without a terminal: one plain line per step or chunk, with rate and ETA; a bar on one."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from learner.progress import (
    ChunkProgress,
    StepClock,
    StepProgress,
    chunk_line,
    format_duration,
    parse_chunk_line,
    planned_steps,
    step_line,
)


def step_record(step: int, time_s: float, groups: int = 2) -> dict[str, object]:
    return {"step": step, "time": time_s, "loss": 0.5, "kl_mean": 0.002, "reward_total": 0.75, "accuracy": 0.625,
            "reduction_ratio": 0.3, "grad_norm": 1.5, "policy_version": step, "step_seconds": 2.0,
            "group_ids": [f"g{step}-{index}" for index in range(groups)]}


def test_the_clock_measures_trained_rollouts_per_second_and_the_eta_from_step_times() -> None:
    clock = StepClock(total_steps=10, rollouts_per_group=4, started=100.0)
    rate, eta = clock.update(step_record(1, 110.0))  # start-up included: 8 rollouts in 10 s
    assert rate == pytest.approx(0.8) and eta == pytest.approx(90.0)
    rate, eta = clock.update(step_record(2, 114.0))
    rate, eta = clock.update(step_record(3, 118.0))  # from then on only the steps' own spacing counts
    assert rate == pytest.approx(16 / 8) and eta == pytest.approx(7 * 4.0)
    assert StepClock(None, 4, started=0.0).update(step_record(1, 5.0))[1] is None  # no plan, no ETA


def test_a_step_line_holds_step_reward_accuracy_reduction_kl_rate_version_and_eta() -> None:
    line = step_line(step_record(3, 0.0), 40, 12.345, 125.0)
    assert re.search(r"step 3 .*kl=0\.002 reward=0\.750 acc=0\.625 reduction=0\.300 .*version=3 .*"
                     r"rollouts/s=12\.35 steps=3/40 eta=0:02:05$", line), line
    assert step_line(step_record(3, 0.0), None, None, None).endswith("rollouts/s=? steps=3/? eta=?")
    assert format_duration(3725) == "1:02:05" and format_duration(None) == "?" and format_duration(-1) == "?"


def test_without_a_terminal_each_step_is_one_plain_progress_line(capsys: pytest.CaptureFixture[str]) -> None:
    progress = StepProgress(2, 4, live=False)
    progress(step_record(1, 10.0))
    progress(step_record(2, 12.0))
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    # `ray job logs` readers (and tests/integration/test_learner_ray.py) look for this prefix.
    assert lines[0].startswith("progress: step 1 loss=") and lines[1].startswith("progress: step 2 loss=")
    assert "steps=2/2 eta=0:00:00" in lines[1]


def test_without_a_terminal_each_chunk_is_one_line_that_the_demo_parses(capsys: pytest.CaptureFixture[str]) -> None:
    with ChunkProgress("base accuracy", 10, "items", live=False) as progress:
        progress.advance(4)
        progress.note("a note of its own")
        progress.advance(6, loss="0.12")
    lines = capsys.readouterr().out.splitlines()
    assert parse_chunk_line(lines[0]) == ("base accuracy", 4, 10)
    assert re.match(r"base accuracy: 4/10 items \(40%\) [\d.]+ items/s eta \d+:\d\d:\d\d$", lines[0]), lines[0]
    assert lines[1] == "a note of its own"
    assert parse_chunk_line(lines[2]) == ("base accuracy", 10, 10) and lines[2].endswith("eta 0:00:00 loss=0.12")
    assert chunk_line("x", 1, 4, "budgets", 2.0) == "x: 1/4 budgets (25%) 0.50 budgets/s eta 0:00:06"


@pytest.mark.parametrize("line", ["progress: step 1 loss=0.1", "INFO 01-02 10:11:12 [core.py:5] ready", "", "eval"])
def test_other_lines_are_not_taken_for_chunk_lines(line: str) -> None:
    assert parse_chunk_line(line) is None


def test_on_a_terminal_the_chunks_draw_a_bar_and_print_no_lines() -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    with ChunkProgress("trained accuracy", 8, "items", live=True, console=console) as progress:
        progress.advance(8)
    drawn = screen.getvalue()
    assert "trained accuracy" in drawn and "8/8" in drawn
    assert parse_chunk_line(drawn) is None  # a bar, not the plain lines


def test_planned_steps_is_max_steps_or_the_data_whichever_ends_first(tmp_path: Path) -> None:
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("{}\n" * 10 + "\n")
    assert planned_steps(None, [dataset], epochs=2, groups_per_step=4) == 5
    assert planned_steps(3, [dataset], epochs=2, groups_per_step=4) == 3
    assert planned_steps(7, [tmp_path / "absent.jsonl"], epochs=1, groups_per_step=4) == 7


def test_planned_steps_counts_lines_that_are_not_utf8(tmp_path) -> None:
    from learner.progress import planned_steps

    dataset = tmp_path / "tasks.jsonl"
    dataset.write_bytes(b'{"id": "a"}\n\xff\xfe not utf-8\n\n{"id": "b"}\n')
    assert planned_steps(None, [dataset], epochs=1, groups_per_step=1) == 3

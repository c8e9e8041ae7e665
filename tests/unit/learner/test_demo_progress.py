"""The demo's own progress: plain lines without a terminal, a live table and bars on one."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
from rich.console import Console

from learner.demo import TrainingView, run_with_progress
from services.settings import Settings, load_settings

# A stand-in for sf-eval: a real child process that prints progress.chunk_line lines among others.
FAKE_EVAL = (
    "from learner.progress import ChunkProgress\n"
    "print('INFO vLLM engine ready')\n"
    "with ChunkProgress('base accuracy', 6, 'items', live=False) as progress:\n"
    "    progress.advance(3)\n"
    "    progress.advance(3)\n"
)


def record(step: int) -> dict[str, object]:
    return {"step": step, "time": 1000.0 + step, "loss": 0.1, "kl_mean": 0.001, "reward_total": 0.9,
            "accuracy": 0.8, "reduction_ratio": 0.25, "grad_norm": 0.5, "policy_version": step,
            "step_seconds": 1.0, "group_ids": ["a", "b"]}


def demo_settings() -> Settings:
    return load_settings(overrides=["learner.max_steps=4"], environ={})


def test_without_a_terminal_each_new_step_is_printed_once(capsys: pytest.CaptureFixture[str]) -> None:
    console = Console(file=io.StringIO(), force_terminal=False)
    with TrainingView(demo_settings(), console) as view:
        view.update([record(1)], None, None)
        view.update([record(1), record(2)], 12.5, 2.0)
        view.update([record(1), record(2)], 12.5, 2.0)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["1", "2"]
    # Before the worker's rate is first measured the line says so, rather than 0.
    assert re.search(r"rollouts/s=\? steps=1/4 eta=\S+ worker_version=v0$", lines[0]), lines[0]
    assert re.search(r"rollouts/s=12\.50 steps=2/4 eta=0:00:02 worker_version=v2$", lines[1]), lines[1]


def test_on_a_terminal_the_steps_are_a_live_table(capsys: pytest.CaptureFixture[str]) -> None:
    screen = io.StringIO()
    with TrainingView(demo_settings(), Console(file=screen, force_terminal=True, width=140)) as view:
        view.update([record(1), record(2)], 12.5, 2.0)
    assert capsys.readouterr().out == ""
    assert "step 2/4" in screen.getvalue() and "12.5 rollouts/s" in screen.getvalue()


def test_the_evaluation_is_logged_whole_and_its_chunks_echoed_without_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    log = tmp_path / "eval.log"
    code = run_with_progress([sys.executable, "-c", FAKE_EVAL], {}, log, Console(file=io.StringIO()))
    assert code == 0
    assert capsys.readouterr().out.splitlines() == ["eval " + text for text in log.read_text().splitlines()[1:]]
    assert log.read_text().startswith("INFO vLLM engine ready\nbase accuracy: 3/6 items (50%) ")


def test_the_evaluation_chunks_are_bars_on_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    screen = io.StringIO()
    code = run_with_progress([sys.executable, "-c", FAKE_EVAL], {}, tmp_path / "eval.log",
                             Console(file=screen, force_terminal=True, width=140))
    assert code == 0 and capsys.readouterr().out == ""
    assert "eval base accuracy" in screen.getvalue() and "6/6" in screen.getvalue()

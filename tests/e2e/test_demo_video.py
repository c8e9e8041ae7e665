"""A short video run through the real stack (`python -m learner.demo --family video`): redis-server, reward server,
a vLLM worker pruning video tokens, the Ray learner on video groups, then sf-eval on the video test split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from learner.report import read_step_records

REPO = Path(__file__).resolve().parents[2]
VIDEO_MODEL = REPO / "assets" / "tiny-qwen25vl-video"


@pytest.mark.slow
@pytest.mark.heavy
def test_short_video_demo_trains_on_pruned_videos_and_evaluates_them(tmp_path: Path) -> None:
    if not (VIDEO_MODEL / "config.json").is_file():
        pytest.skip("the video base model is not built (make video-model)")
    result = subprocess.run(
        [sys.executable, "-m", "learner.demo", "--family", "video", "--runs-root", str(tmp_path), "--run-name", "v",
         "--eval-limit", "8", "--rl-items", "200", "--set", "learner.max_steps=2", "--set", "learner.groups_per_step=4"],
        cwd=REPO, capture_output=True, text=True, timeout=1500, check=False,
    )
    run_dir = tmp_path / "v"
    logs = "\n".join(path.read_text(errors="replace")[-2000:] for path in (run_dir / "logs").glob("*.log"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + logs

    records = read_step_records(run_dir / "metrics.jsonl")
    assert [record["step"] for record in records] == [1, 2]
    for record in records:
        assert 0.0 <= record["accuracy"] <= 1.0
        assert 0.0 < record["reduction_ratio"] < 1.0  # the worker pruned video tokens under the budgets
    assert records[-1]["policy_version"] == 2
    settings = (run_dir / "settings.yaml").read_text()
    assert "assets/tasks/video/rl.jsonl" in settings and "tiny-qwen25vl-video" in settings
    evaluation = json.loads((run_dir / "eval" / "eval.json").read_text())
    text = json.dumps(evaluation)
    assert "base" in text and "trained" in text and "tau=0.975" in text

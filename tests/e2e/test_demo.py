"""A short demo (a few learner steps) through the real stack: redis-server, reward server, vLLM worker, Ray learner."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from learner.report import read_step_records

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_short_demo_trains_publishes_and_reports(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "learner.demo", "--runs-root", str(tmp_path), "--run-name", "short", "--no-eval",
         "--set", "learner.max_steps=3", "--set", "learner.groups_per_step=4"],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
    )
    run_dir = tmp_path / "short"
    logs = "\n".join(path.read_text(errors="replace")[-2000:] for path in (run_dir / "logs").glob("*.log"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + logs

    records = read_step_records(run_dir / "metrics.jsonl")
    assert [record["step"] for record in records] == [1, 2, 3]  # learner steps
    for record in records:
        assert 0.0 <= record["accuracy"] <= 1.0 and 0.0 <= record["reduction_ratio"] <= 1.0
        assert record["reward_total"] >= 0.0  # rewards reached the learner
    assert records[-1]["policy_version"] == 3
    report = (run_dir / "report.md").read_text()
    published = float(re.search(r"groups_published: ([\d.]+)", report).group(1))
    assert published >= 3 * 4  # trajectories: at least the groups the learner trained on
    worker_version = float(re.search(r"worker_policy_version: ([\d.]+)", report).group(1))
    assert worker_version >= 1  # the worker picked up a weight version the learner published
    assert (run_dir / "training_curves.png").is_file() and "status: finished" in report
    settings = yaml.safe_load((run_dir / "settings.yaml").read_text())
    assert settings["redis"]["password"] is None and settings["reward_server"]["auth_token"] is None
    leftovers = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True, check=False).stdout
    assert leftovers.strip() == "", f"processes left running: {leftovers}"

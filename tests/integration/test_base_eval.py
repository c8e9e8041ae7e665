"""`python -m learner.base_eval` as a real subprocess on a copy of the committed tiny model and a few bundled
items: it rewrites only the report's "eval" section, with fresh-split rows beside the committed ones, and its
numbers are sf-eval's (one evaluator, one judge), budget for budget."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy  # starts vLLM, Ray or a benchmark: not in make test-fast

pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "assets" / "tiny-qwen25vl"
TASKS = REPO / "assets" / "tasks"
ITEMS = 6
BUDGETS = "r=1,r=0.25,tau=0.975"


def _small_copy(root: Path) -> Path:
    """The first ITEMS lines of each committed val/test split, with their images and recipes."""
    for family in ("digits", "scenes"):
        for split in ("val", "test"):
            source = TASKS / family / f"{split}.jsonl"
            lines = source.read_text().splitlines()[:ITEMS]
            target = root / family / source.name
            (target.parent / "images" / split).mkdir(parents=True, exist_ok=True)
            target.write_text("\n".join(lines) + "\n")
            shutil.copy(source.with_name(f"{split}.recipe.json"), target.parent)
            for line in lines:
                image = json.loads(line)["image"]
                shutil.copy(source.parent / image, target.parent / image)
    return root


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SF_")}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("base_eval")
    model = root / "model"
    shutil.copytree(MODEL, model)
    tasks = _small_copy(root / "tasks")
    done = _run("learner.base_eval", "--model", str(model), "--data-dir", str(tasks), "--budgets", BUDGETS,
                "--fresh-items", str(ITEMS), "--fresh-dir", str(root / "fresh"))
    return root, tasks, json.loads((model / "eval_report.json").read_text()), done


def test_report_keeps_training_facts_and_holds_committed_and_fresh_rows(evaluated) -> None:
    root, _, report, done = evaluated
    committed = json.loads((MODEL / "eval_report.json").read_text())
    assert report["config"] == committed["config"] and report["timing_s"] == committed["timing_s"]
    section = report["eval"]
    assert section["budgets"] == BUDGETS.split(",") and section["fresh_seed"] == 2026
    for family in ("digits", "scenes"):
        splits = section[family]
        assert list(splits) == ["val", "test", "fresh_test"]
        assert list(splits["val"]["budgets"]) == ["r=1"] and list(splits["test"]["budgets"]) == BUDGETS.split(",")
        assert splits["test"]["seed"] == 0 and splits["fresh_test"]["seed"] == 2026
        assert Path(splits["fresh_test"]["split"]).is_relative_to(root / "fresh")
        for split in splits.values():
            dense = split["budgets"]["r=1"]
            # The per-kind judgement of the dense answers and the sf-eval row are the same count.
            assert split["dense"]["correct"] == dense["correct"] and split["items"] == dense["items"] == ITEMS
            assert dense["reduction_mean"] == 0.0
        assert splits["test"]["budgets"]["r=0.25"]["reduction_mean"] == pytest.approx(0.75)
    assert "fresh_test (seed 2026" in done.stdout and "wrote" in done.stdout


def test_the_reports_numbers_are_sf_evals_budget_for_budget(evaluated) -> None:
    root, tasks, report, _ = evaluated
    dataset = tasks / "scenes" / "test.jsonl"
    _run("learner.evaluate", "--model", str(MODEL), "--label", "base", "--dataset", str(dataset), "--budgets", BUDGETS,
         "--speed-items", "0", "--out", str(root / "sf-eval"), "--config", "configs/default.yaml",
         "--config", "configs/demo.yaml")
    rows = json.loads((root / "sf-eval" / "eval.json").read_text())["models"][0]["rows"]
    ours = report["eval"]["scenes"]["test"]["budgets"]
    for row in rows:
        assert ours[row["budget"]]["correct"] == row["correct"]
        assert ours[row["budget"]]["reduction_mean"] == pytest.approx(row["reduction_mean"])

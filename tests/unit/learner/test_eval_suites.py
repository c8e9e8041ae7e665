"""sf-eval's benchmark inputs and outputs without an engine: flags, suites, per-benchmark rows, table and plots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from learner.eval_metrics import ItemOutcome, parse_budgets, summarize_budget
from learner.eval_suites import benchmark_argument, first_items, load_suites, primary_rows, suite_metrics
from learner.evaluate import PLOT_NAME, build_parser, main, print_table, write_outputs

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "benchmarks"
REPO = Path(__file__).resolve().parents[3]
MME = FIXTURES / "mme" / "MME_Benchmark_release_version"
MMBENCH = FIXTURES / "mmbench" / "mmbench_dev_en.tsv"
CHARTQA = FIXTURES / "chartqa" / "test"


def test_benchmark_flag_parses_format_and_path() -> None:
    args = build_parser().parse_args(["--model", "m", "--benchmark", "MME=/data/mme", "--benchmark",
                                      "chartqa=/data/ChartQA/test", "--circular"])
    assert [(b.format, str(b.path)) for b in args.benchmark] == [("mme", "/data/mme"), ("chartqa", "/data/ChartQA/test")]
    assert args.circular and args.dataset is None
    with pytest.raises(argparse.ArgumentTypeError, match="FORMAT one of: mme"):
        benchmark_argument("vqav2=/data/x")
    with pytest.raises(argparse.ArgumentTypeError):
        benchmark_argument("/data/mme")


def test_sf_eval_needs_a_dataset_or_a_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--model", str(REPO / "assets" / "tiny-qwen25vl")])
    assert exited.value.code == 2
    assert "give --dataset JSONL or at least one --benchmark FORMAT=PATH" in capsys.readouterr().err


def test_limit_keeps_whole_groups(tmp_path: Path) -> None:
    items = load_suites(None, [benchmark_argument(f"mme={MME}")], None, False, tmp_path)[0].items
    assert [entry.group for entry in first_items(items, 3)] == [items[0].group] * 2 + [items[2].group] * 2
    assert len(first_items(items, 2)) == 2 and len(first_items(items, 100)) == 8


def test_suites_are_named_by_format_or_file(tmp_path: Path) -> None:
    suites = load_suites(REPO / "assets" / "tasks" / "scenes" / "test.jsonl",
                         [benchmark_argument(f"chartqa={CHARTQA / 'test_human.json'}"),
                          benchmark_argument(f"chartqa={CHARTQA / 'test_augmented.json'}"),
                          benchmark_argument(f"mmbench={MMBENCH}")], 2, True, tmp_path)
    assert [suite.name for suite in suites] == ["scenes/test.jsonl", "chartqa:test_human", "chartqa:test_augmented",
                                                "mmbench"]
    assert [len(suite.items) for suite in suites] == [2, 2, 2, 4]  # mmbench: the first question's 4 rotations
    assert (tmp_path / "images" / "mmbench_dev_en" / "0.png").is_file()


def _outcome(score: float) -> ItemOutcome:
    return ItemOutcome(correct=score == 1.0, visual_tokens_kept=16, visual_tokens_total=64, engine_prompt_tokens=40,
                       completion_tokens=2, score=score)


def _fake_results(tmp_path: Path) -> dict:
    """Results shaped as run() writes them, for two suites and one model, with hand-set credits."""
    suites = load_suites(None, [benchmark_argument(f"mme={MME}"), benchmark_argument(f"chartqa={CHARTQA}")], None,
                         False, tmp_path)
    budgets = parse_budgets("r=1,r=0.25")
    credits = {"mme": [1, 1, 1, 0, 1, 1, 0, 0], "chartqa": [1, 0, 1, 1]}
    benchmarks = []
    for suite in suites:
        outcomes = [_outcome(float(score)) for score in credits[suite.name]]
        rows = [{**summarize_budget(budget, outcomes), "metrics": suite_metrics(suite, outcomes)} for budget in budgets]
        benchmarks.append({"name": suite.name, "format": suite.format, "data": str(suite.data),
                           "items": len(suite.items), "circular": False, "models": [{"label": "base", "rows": rows}],
                           "plot": f"accuracy_vs_reduction-{suite.name}.png"})
    pooled = [summarize_budget(budget, [_outcome(float(s)) for s in credits["mme"] + credits["chartqa"]])
              for budget in budgets]
    return {"dataset": "mme + chartqa", "title": "all benchmarks pooled", "items": 12, "max_new_tokens": 8,
            "decode_tokens": 8, "budgets": ["r=1", "r=0.25"], "models": [{"label": "base", "rows": pooled}],
            "benchmarks": benchmarks, "plot": PLOT_NAME}


def test_rows_carry_each_benchmarks_metrics(tmp_path: Path) -> None:
    results = _fake_results(tmp_path)
    mme_row = results["benchmarks"][0]["models"][0]["rows"][0]
    # MME pairs: (1,1) (1,0) (1,1) (0,0) -> accuracy 5/8, accuracy+ 2/4.
    assert mme_row["accuracy"] == pytest.approx(5 / 8)
    assert (mme_row["metrics"]["primary"], mme_row["metrics"]["value"]) == ("accuracy_plus", 0.5)
    plotted = primary_rows([mme_row])[0]
    assert plotted["accuracy"] == 0.5 and plotted["reduction_mean"] == mme_row["reduction_mean"]


def test_one_table_and_a_plot_per_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = _fake_results(tmp_path)
    print_table(results)
    table = capsys.readouterr().out
    assert "accuracy_plus 0.500 (score" in table and "relaxed_accuracy 0.750" in table
    assert table.count("r=0.25") == 2
    write_outputs(results, {"base": [{"benchmark": "mme", "id": "x"}]}, tmp_path / "out")
    for name in (PLOT_NAME, "accuracy_vs_reduction-mme.png", "accuracy_vs_reduction-chartqa.png"):
        with Image.open(tmp_path / "out" / name) as image:
            assert image.format == "PNG"
    written = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [benchmark["name"] for benchmark in written["benchmarks"]] == ["mme", "chartqa"]

"""Each benchmark's metrics on the committed fixtures, with answers judged by the reward server's checker,
against values computed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from learner.benchmark_metrics import ScoredItem, benchmark_metrics
from learner.eval_metrics import mean_interval, wilson_interval
from reward_server.rewards import check_answer
from services.benchmarks import BenchmarkItem, load_benchmark

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "benchmarks"


def judged(items: list[BenchmarkItem], completions: dict[str, str]) -> list[ScoredItem]:
    """Score one completion per task id with check_answer, as sf-eval does."""
    assert set(completions) == {entry.item.task.id for entry in items}
    scored = []
    for entry in items:
        task = entry.item.task
        result = check_answer(completions[task.id], task.answer, task.answer_type, task.choices,
                              answers=task.answers)
        scored.append(ScoredItem(entry.group, entry.category, result.score))
    return scored


def test_mme_accuracy_plus_and_scores(tmp_path: Path) -> None:
    items = load_benchmark("mme", FIXTURES / "mme" / "MME_Benchmark_release_version", tmp_path).items
    completions = {
        "mme/artwork/10002/1": "Yes", "mme/artwork/10002/2": "Yes",  # second wrong: image not both right
        "mme/code_reasoning/0020/1": "yes", "mme/code_reasoning/0020/2": "No.",
        "mme/existence/000000006040/1": "Yes, there is.", "mme/existence/000000006040/2": "No",
        "mme/existence/000000018150/1": "Yes", "mme/existence/000000018150/2": "yes",
    }
    metrics = benchmark_metrics("mme", judged(items, completions))
    assert metrics["primary"] == "accuracy_plus"
    assert metrics["value"] == pytest.approx(2 / 4) and metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    categories = metrics["categories"]
    # Per category: 100 * (accuracy + accuracy+): artwork 50 + 0, code_reasoning 100 + 100, existence 75 + 50.
    assert {name: entry["score"] for name, entry in categories.items()} == pytest.approx(
        {"artwork": 50.0, "code_reasoning": 200.0, "existence": 125.0})
    assert categories["existence"]["images"] == 2 and categories["existence"]["items"] == 4
    assert metrics["perception_score"] == pytest.approx(175.0)
    assert metrics["cognition_score"] == pytest.approx(200.0)
    assert metrics["total_score"] == pytest.approx(375.0)


def test_mme_tsv_gives_the_same_metrics_as_the_folder(tmp_path: Path) -> None:
    items = load_benchmark("mme", FIXTURES / "mme" / "MME.tsv", tmp_path).items
    completions = {"mme/0": "Yes", "mme/1": "Yes", "mme/2": "yes", "mme/3": "No"}
    metrics = benchmark_metrics("mme", judged(items, completions))
    # existence: 1 of 2 right, pair not both right -> 50 + 0; code_reasoning: both right -> 100 + 100.
    assert (metrics["value"], metrics["accuracy"]) == (0.5, 0.75)
    assert (metrics["perception_score"], metrics["cognition_score"]) == (50.0, 200.0)


def test_mmbench_circular_counts_a_question_only_if_every_rotation_is_right(tmp_path: Path) -> None:
    items = load_benchmark("mmbench", FIXTURES / "mmbench" / "mmbench_dev_en.tsv", tmp_path, circular=True).items
    completions = {}
    for entry in items:
        question = entry.group
        # 0: names the choice's text (right in every rotation); 1: always "B" (right only unrotated);
        # 2: the text "yes" (right in both rotations); 3: always "C" (right only unrotated).
        completions[entry.item.task.id] = {"0": "cat", "1": "B", "2": "yes", "3": "(C)"}[question]
    metrics = benchmark_metrics("mmbench", judged(items, completions))
    assert metrics["primary"] == "circular_accuracy" and metrics["questions"] == 4
    assert metrics["value"] == pytest.approx(2 / 4)
    assert metrics["accuracy"] == pytest.approx((4 + 1 + 2 + 1) / 14)
    assert metrics["categories"]["ocr"] == pytest.approx({"accuracy": 0.25, "items": 4, "circular_accuracy": 0.0})
    assert metrics["categories"]["image_scene"]["circular_accuracy"] == 1.0


def test_mmbench_without_rotations_is_plain_accuracy(tmp_path: Path) -> None:
    items = load_benchmark("mmbench", FIXTURES / "mmbench" / "mmbench_dev_en.tsv", tmp_path).items
    completions = {"mmbench/0": "cat", "mmbench/1": "B", "mmbench/2": "yes", "mmbench/3": "A"}
    metrics = benchmark_metrics("mmbench", judged(items, completions))
    assert (metrics["primary"], metrics["value"]) == ("accuracy", pytest.approx(3 / 4))
    assert "circular_accuracy" not in metrics["categories"]["ocr"]


def test_mmbench_file_with_rotated_copies(tmp_path: Path) -> None:
    items = load_benchmark("mmbench", FIXTURES / "mmbench" / "mmbench_dev_circular.tsv", tmp_path,
                           circular=True).items
    # "A" each time: right only on the original row (answer A); its copies moved the answer to D, C, B.
    metrics = benchmark_metrics("mmbench", judged(items, {entry.item.task.id: "A" for entry in items}))
    assert (metrics["value"], metrics["accuracy"], metrics["questions"]) == (0.0, 0.25, 1)


def test_textvqa_mean_vqa_accuracy(tmp_path: Path) -> None:
    items = load_benchmark("textvqa", FIXTURES / "textvqa" / "TextVQA_0.5.1_val.json", tmp_path).items
    # coke: 3 of 10 humans -> 0.9; two: 7 humans said 2 or two -> 1.0; 10:35: 2 humans -> 0.6.
    completions = {"textvqa/34602": "Coke", "textvqa/34603": "two", "textvqa/34604": "10:35"}
    metrics = benchmark_metrics("textvqa", judged(items, completions))
    assert metrics["primary"] == "vqa_accuracy" and metrics["value"] == pytest.approx(2.5 / 3)
    # Fractional credits: the normal interval, mean +- 1.96 * pstdev / sqrt(3) = 0.8333 +- 0.1923, clipped.
    assert metrics["ci95"] == pytest.approx([0.6410, 1.0], abs=1e-4)


def test_chartqa_relaxed_accuracy_per_file(tmp_path: Path) -> None:
    items = load_benchmark("chartqa", FIXTURES / "chartqa" / "test", tmp_path).items
    completions = {
        "chartqa/test_human/0": "24",  # within 5% of 23.5
        "chartqa/test_human/1": "Argentina",  # the label is Brazil
        "chartqa/test_augmented/0": "The answer is 1150.",  # 4.2% below 1,200
        "chartqa/test_augmented/1": "2019",
    }
    metrics = benchmark_metrics("chartqa", judged(items, completions))
    assert metrics["primary"] == "relaxed_accuracy" and metrics["value"] == pytest.approx(0.75)
    assert metrics["categories"]["test_human"]["relaxed_accuracy"] == 0.5
    assert metrics["categories"]["test_augmented"]["relaxed_accuracy"] == 1.0
    assert metrics["mean_of_categories"] == pytest.approx(0.75)


def test_mean_interval_is_wilson_for_binary_scores() -> None:
    assert mean_interval([1.0, 0.0, 1.0]) == wilson_interval(2, 3)
    low, high = mean_interval([0.3, 0.3, 0.3])
    assert low == high == pytest.approx(0.3)


def test_unknown_or_empty_benchmark_is_refused() -> None:
    with pytest.raises(ValueError, match="no judged items"):
        benchmark_metrics("mme", [])


def test_budget_row_averages_graded_credits() -> None:
    from learner.eval_metrics import ItemOutcome, parse_budget, summarize_budget

    outcomes = [ItemOutcome(correct=score == 1.0, visual_tokens_kept=16, visual_tokens_total=64,
                            engine_prompt_tokens=40, completion_tokens=2, score=score) for score in (0.9, 1.0, 0.6)]
    row = summarize_budget(parse_budget("r=0.25"), outcomes)
    assert row["accuracy"] == pytest.approx(2.5 / 3) and row["correct"] == 1
    assert row["accuracy_ci95"] == pytest.approx([0.6410, 1.0], abs=1e-4)
    binary = [ItemOutcome(True, 16, 64, 40, 2), ItemOutcome(False, 16, 64, 40, 2)]
    assert summarize_budget(parse_budget("r=0.25"), binary)["accuracy_ci95"] == list(wilson_interval(1, 2))

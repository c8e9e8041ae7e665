"""The run report reads step records and renders a table and a plot."""

import json
from pathlib import Path

from PIL import Image

from learner.report import markdown_table, read_step_records, write_report


def test_report_has_every_step_and_a_plot(tmp_path: Path) -> None:
    records = [{"step": step, "reward_total": 0.1 * step, "accuracy": 0.5, "reduction_ratio": 0.25 * step,
                "kl_mean": 0.0, "policy_version": step, "step_seconds": 1.5} for step in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert read_step_records(tmp_path / "metrics.jsonl") == records
    report = write_report(tmp_path, {"steps": 3}, evaluation_md="| budget | accuracy |")
    text = report.read_text()
    assert "| 3 | 0.300 | 0.500 | 0.750 |" in text and "- steps: 3" in text and "Base against trained" in text
    with Image.open(tmp_path / "training_curves.png") as image:
        assert image.size[0] > 600
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 3}  # what bench/vs_trl.py reads


def test_a_run_without_steps_says_so(tmp_path: Path) -> None:
    assert "No learner step" in write_report(tmp_path, {}).read_text()
    assert markdown_table([]).count("\n") == 2


def test_evaluation_markdown_has_one_row_per_model_and_budget() -> None:
    from learner.demo import evaluation_markdown

    row = {"budget": "r=0.25", "reduction_mean": 0.75, "accuracy": 0.5, "accuracy_ci95": [0.4, 0.6],
           "speed": {"prefill_ms_per_request": 5.25}, "kv_entries_mean": 49.5}
    text = evaluation_markdown({"plot": "/x/accuracy_vs_reduction.png",
                                "models": [{"label": "base", "rows": [row]}, {"label": "trained", "rows": [row]}]})
    assert "(eval/accuracy_vs_reduction.png)" in text
    assert "| trained | r=0.25 | 0.750 | 0.500 [0.400, 0.600] | 5.2 | 49.5 |" in text
    assert text.count("| r=0.25 |") == 2


def test_pareto_plot_draws_keep_ratios_and_thresholds_of_both_models(tmp_path: Path) -> None:
    from learner.evaluate import plot_results

    def row(budget: str, reduction: float, accuracy: float) -> dict:
        kind = "mass_threshold" if budget.startswith("tau=") else "keep_ratio"
        return {"budget": budget, "kind": kind, "reduction_mean": reduction, "accuracy": accuracy,
                "accuracy_ci95": [accuracy - 0.02, min(1.0, accuracy + 0.02)]}

    results = {"dataset": "tasks/digits/test.jsonl", "items": 200, "models": [
        {"label": "base", "rows": [row("r=1", 0.0, 0.99), row("r=0.25", 0.75, 0.9), row("tau=0.94", 0.2, 0.99)]},
        {"label": "trained", "rows": [row("r=0.25", 0.75, 0.98)]},  # no threshold row: that series is skipped
    ]}
    plot_results(results, tmp_path / "pareto.png")
    with Image.open(tmp_path / "pareto.png") as image:
        assert image.size[0] > 600

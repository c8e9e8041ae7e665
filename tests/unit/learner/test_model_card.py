"""The model card of a run's final weights: base model, data, settings, steps and sf-eval's table per budget."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from learner.model_card import (
    evaluation_table,
    final_weights_folder,
    version_step,
    write_model_card,
    write_run_card,
)
from services.settings import load_settings


def eval_row(budget: str, accuracy: float, low: float, high: float, reduction: float) -> dict[str, object]:
    return {"budget": budget, "accuracy": accuracy, "accuracy_ci95": [low, high], "reduction_mean": reduction}


# The shape of sf-eval's eval.json, cut to what the card reads.
EVALUATION = {
    "dataset": "assets/tasks/digits/test.jsonl", "items": 20, "budgets": ["r=1", "r=0.5", "tau=0.975"],
    "models": [
        {"label": "base", "rows": [eval_row("r=1", 0.8, 0.58, 0.92, 0.0), eval_row("r=0.5", 0.6, 0.39, 0.78, 0.5),
                                   eval_row("tau=0.975", 0.7, 0.48, 0.85, 0.21)]},
        {"label": "trained", "rows": [eval_row("r=1", 0.85, 0.64, 0.95, 0.0),
                                      eval_row("r=0.5", 0.75, 0.53, 0.89, 0.5),
                                      eval_row("tau=0.975", 0.8, 0.58, 0.92, 0.43)]},
    ],
}


def table_rows(markdown: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith("| |")]


def test_the_table_has_one_row_per_budget_with_each_models_accuracy_and_reduction() -> None:
    rows = table_rows(evaluation_table(EVALUATION))
    assert rows[0] == ["budget", "base accuracy [95% CI]", "trained accuracy [95% CI]", "base reduction",
                       "trained reduction"]
    assert rows[1:] == [
        ["r=1", "0.800 [0.580, 0.920]", "0.850 [0.640, 0.950]", "0.000", "0.000"],
        ["r=0.5", "0.600 [0.390, 0.780]", "0.750 [0.530, 0.890]", "0.500", "0.500"],
        ["tau=0.975", "0.700 [0.480, 0.850]", "0.800 [0.580, 0.920]", "0.210", "0.430"],
    ]


def test_the_card_names_base_data_steps_and_settings_and_holds_the_table(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    for version in (3, 12, 4):
        (weights / f"v{version:06d}").mkdir(parents=True)
    (weights / "v000013.tmp").mkdir()  # a publish in progress is not a version
    folder = final_weights_folder(weights)
    assert folder == weights / "v000012"
    settings = load_settings(overrides=["run_name=card-test", "learner.max_steps=12", "redis.password=hunter2",
                                        "learner.model_path=assets/tiny-qwen25vl"], environ={})
    card = write_model_card(folder, settings, 12, EVALUATION).read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "| base model | `assets/tiny-qwen25vl` |" in card and "| learner steps | 12 |" in card
    assert "| training data | `assets/tasks/digits/rl.jsonl` |" in card
    assert "| weights version | `v000012` |" in card
    assert ["tau=0.975", "0.700 [0.480, 0.850]", "0.800 [0.580, 0.920]", "0.210", "0.430"] in table_rows(card)
    resolved = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert resolved["run_name"] == "card-test" and resolved["learner"]["max_steps"] == 12
    assert "hunter2" not in card


def test_without_an_evaluation_the_card_says_how_to_run_one(tmp_path: Path) -> None:
    card = write_model_card(tmp_path, load_settings(environ={}), None).read_text()
    assert "No evaluation ran on these weights" in card and "sf-eval --model" in card
    assert "| learner steps | ? |" in card and "accuracy [95% CI]" not in card


def test_the_step_of_a_version_is_the_step_that_published_it() -> None:
    records = [{"step": 1, "policy_version": 0}, {"step": 2, "policy_version": 1, "publish_seconds": 0.1},
               {"step": 3, "policy_version": 1}, {"step": 4, "policy_version": 2, "publish_seconds": 0.1}]
    assert version_step(records, 1) == 2 and version_step(records, 2) == 4 and version_step(records, 5) is None
    assert final_weights_folder(Path("/nonexistent-weights")) is None


def test_the_run_card_goes_in_the_newest_published_version_with_the_step_that_published_it(tmp_path: Path) -> None:
    settings = load_settings(overrides=[f"learner.run_dir={tmp_path}", "learner.publish_every=2"], environ={})
    assert write_run_card(settings) is None  # nothing published: no card, no folder made
    records = [{"step": 1, "policy_version": 0}, {"step": 2, "policy_version": 1, "publish_seconds": 0.2},
               {"step": 3, "policy_version": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (tmp_path / "weights" / "v000001").mkdir(parents=True)
    card = write_run_card(settings, EVALUATION)
    assert card == tmp_path / "weights" / "v000001" / "README.md"
    text = card.read_text()
    assert "| learner steps | 2 |" in text and "| tau=0.975 | 0.700 [0.480, 0.850] |" in text

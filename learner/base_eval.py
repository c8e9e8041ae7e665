"""`python -m learner.base_eval --model assets/tiny-qwen25vl` (`make base-eval`): evaluate a base model with
the one evaluator and rewrite the "eval" section of its eval_report.json, keeping what training recorded.

Per task family (assets/tasks/<family>/): dense accuracy on the committed val split, and accuracy and
reduction at every budget on the committed test split and on a fresh test split drawn at evaluation time
(learner/fresh_split.py: the committed recipe, a seed no recipe was tuned on). Answers come from sf-eval's
evaluator (learner.evaluate.ModelEvaluator: the workers' pruned rollout path on vLLM, greedy) and are judged
by learner.judging.judge, the reward server's checkers. `python -m learner.sft` calls the same code at its end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from learner.eval_metrics import parse_budgets, summarize_budget
from learner.fresh_split import FRESH_SEED, fresh_split
from learner.judging import judged_summary
from services.data import TASK_FAMILIES, DatasetItem, load_dataset
from services.data.build import ALL_FAMILIES
from services.schemas.models import Budget
from services.settings import Settings, add_settings_arguments, load_settings

REPO = Path(__file__).resolve().parents[1]
# The demo's settings (vLLM dtype, 8 new tokens), so these numbers are the demo's "before RL" ones.
SETTINGS_FILES = [REPO / "configs" / "default.yaml", REPO / "configs" / "demo.yaml"]
REPORT_BUDGETS = "r=1,r=0.5,r=0.25,r=0.125,tau=0.94,tau=0.975"
DENSE = Budget(kind="keep_ratio", value=1.0)
FRESH_ITEMS = 300
EVALUATOR = ("sf-eval's evaluator (learner.evaluate.ModelEvaluator): greedy answers from the workers' pruned rollout "
             "path on vLLM, judged by the reward server's checkers (learner.judging.judge)")


def fresh_dir_for(seed: int) -> Path:
    """Where the base report's fresh splits of one seed are generated (git-ignored; reused while their recipe holds)."""
    return REPO / ".cache" / "fresh-splits" / f"seed{seed}"


def publish_base_model(report: dict[str, Any], staging: Path, out: Path, started: float) -> dict[str, Any]:
    """Close a base-model build: its total time into the report, eval_report.json into the staged folder, and the
    staged folder swapped in for `out` (a half-built model never replaces a working one)."""
    report["timing_s"]["total"] = round(time.perf_counter() - started, 1)
    (staging / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)
    return report


def split_report(evaluator: Any, items: Sequence[DatasetItem], budgets: Sequence[Budget], max_new_tokens: int,
                 batch_items: int, rel_tol: float, abs_tol: float) -> dict[str, Any]:
    """One split at every budget: each budget's sf-eval row, and the dense answers judged per question kind."""
    budgets = [DENSE, *(budget for budget in budgets if budget != DENSE)]
    outcomes, predictions, _, _ = evaluator.accuracy_run(items, budgets, max_new_tokens, batch_items)
    dense_completions = [record["completion"] for record in predictions if record["budget"] == DENSE.label]
    rows = {}
    for budget in budgets:
        row = summarize_budget(budget, outcomes[budget.label])
        rows[budget.label] = {key: value for key, value in row.items() if key != "speed"}
    return {"items": len(items), "dense": judged_summary(items, dense_completions, rel_tol, abs_tol), "budgets": rows}


def evaluate_base(
    model: Path, data_dir: Path, settings: Settings, budgets: Sequence[Budget], fresh_dir: Path,
    fresh_seed: int = FRESH_SEED, fresh_items: int = FRESH_ITEMS, batch_items: int = 32,
    families: Sequence[str] = TASK_FAMILIES,
) -> dict[str, Any]:
    """The report's "eval" section: per family, val (dense), committed test and fresh test (every budget)."""
    from learner.evaluate import ModelEvaluator, ModelSpec

    rewards = settings.reward_server.rewards
    tolerances = (rewards.number_rel_tolerance, rewards.number_abs_tolerance)
    max_new_tokens = settings.rollout.max_new_tokens
    section: dict[str, Any] = {
        "evaluator": EVALUATOR, "budgets": [budget.label for budget in budgets], "max_new_tokens": max_new_tokens,
        "scorer": settings.sparsity.scorer, "scorer_layer": settings.sparsity.scorer_layer,
        "fresh_seed": fresh_seed, "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    planned = []  # every split loaded before vLLM starts, so a bad file fails in seconds
    for family in families:
        committed = data_dir / family / "test.jsonl"
        splits = {"val": (data_dir / family / "val.jsonl", [DENSE]), "test": (committed, budgets),
                  "fresh_test": (fresh_split(committed, fresh_dir, fresh_seed, fresh_items), budgets)}
        for name, (path, split_budgets) in splits.items():
            seed = json.loads(path.with_name(f"{path.stem}.recipe.json").read_text())["seed"]
            planned.append((family, name, path, seed, load_dataset(path), split_budgets))
    evaluator = ModelEvaluator(ModelSpec("base", model), settings)
    try:
        for family, name, path, seed, items, split_budgets in planned:
            print(f"base_eval: {family}/{name} ({len(items)} items, seed {seed})", flush=True)
            report = split_report(evaluator, items, split_budgets, max_new_tokens, batch_items, *tolerances)
            section.setdefault(family, {})[name] = {"split": _shown(path), "seed": seed, **report}
    finally:
        evaluator.close()
    return section


def _shown(path: Path) -> str:
    """The path relative to the repository when it lies inside it (reports stay machine-independent)."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def rewrite_report(model: Path, section: dict[str, Any]) -> Path:
    """Replace the "eval" section of <model>/eval_report.json (training's config and timing stay)."""
    path = model / "eval_report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report["eval"] = section
    staging = path.with_name(path.name + ".partial")
    staging.write_text(json.dumps(report, indent=2) + "\n")
    staging.replace(path)
    return path


def summary_rows(section: dict[str, Any]) -> list[list[str]]:
    """One row per (family, split): dense accuracy [CI], then accuracy / reduction at each other budget."""
    rows = []
    for family in ALL_FAMILIES:
        for name, split in section.get(family, {}).items():
            dense = split["dense"]
            low, high = dense["accuracy_ci95"]
            cells = [f"{row['accuracy']:.3f} / {row['reduction_mean']:.2f}"
                     for label, row in split["budgets"].items() if label != DENSE.label]
            rows.append([family, f"{name} (seed {split['seed']}, {split['items']})",
                         f"{dense['accuracy']:.3f} [{low:.3f}, {high:.3f}]", *cells])
    return rows


def print_summary(section: dict[str, Any]) -> None:
    """The section as a table: accuracy / reduction per family, split and budget."""
    from rich.console import Console
    from rich.table import Table

    others = [label for label in section["budgets"] if label != DENSE.label]
    table = Table(title="base model: accuracy (greedy, sf-eval's evaluator); other budgets: accuracy / reduction")
    for column in ["task", "split", "dense [95% CI]", *others]:
        table.add_column(column)
    for row in summary_rows(section):
        table.add_row(*row, *[""] * (2 + 1 + len(others) - len(row)))
    Console(width=160).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate, rewrite the report, print the table."""
    parser = argparse.ArgumentParser(prog="python -m learner.base_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "assets" / "tiny-qwen25vl", help="HF model folder")
    parser.add_argument("--data-dir", type=Path, default=REPO / "assets" / "tasks",
                        help="task folder with <family>/val.jsonl and test.jsonl (and their .recipe.json)")
    parser.add_argument("--budgets", default=REPORT_BUDGETS, help=f"budgets of the test splits ({REPORT_BUDGETS})")
    parser.add_argument("--fresh-seed", type=int, default=FRESH_SEED, help="seed of the fresh test splits")
    parser.add_argument("--fresh-items", type=int, default=FRESH_ITEMS, help="items per fresh test split")
    parser.add_argument("--fresh-dir", type=Path, default=None,
                        help="where the fresh splits are generated (default .cache/fresh-splits/seed<seed>)")
    parser.add_argument("--batch-items", type=int, default=32, help="items per vLLM batch")
    add_settings_arguments(parser)
    args = parser.parse_args(argv)
    settings = load_settings([*SETTINGS_FILES, *args.config], args.overrides)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    section = evaluate_base(args.model, args.data_dir, settings, parse_budgets(args.budgets),
                            args.fresh_dir or fresh_dir_for(args.fresh_seed), args.fresh_seed, args.fresh_items,
                            args.batch_items)
    print_summary(section)
    print(f"wrote {rewrite_report(args.model, section)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

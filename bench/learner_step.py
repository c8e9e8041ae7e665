"""Learner step bench: the cost of the kept-set term, one GRPO step with and without it, side by side.

The groups are recorded once from the bundled model on bundled digit-grid tasks, with the paper's eight mass
thresholds (`learner.recorded`: real keep sets and log-probs, no vLLM), then the same step (`learner.step.grpo_step`, the demo's
loss knobs, a frozen reference for the KL) is timed with `kept_mass_weight` 0 and 1, alternating, so that the
machine's noise hits both alike. The term adds one scorer pass per group (decoder layers <= K on the unpruned
prompt, vision features without grad) and its backward. Run: `python bench/learner_step.py` (`--quick`: 2 reps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from common import RESULTS_DIR, print_table, save_results

from learner.algorithms import LossConfig
from learner.recorded import record_groups
from learner.step import PixelCache, StepConfig, grpo_step
from services.data.loader import load_dataset, open_image
from services.modeling import load_model_and_processor
from services.modeling.pruned_forward import image_inputs
from services.settings.models import paper_budgets
from services.sparsity.scorers import build_scorer


def main(argv: list[str] | None = None) -> int:
    """Time grpo_step with and without the kept-set term; print a table and save JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=REPO / "assets/tiny-qwen25vl")
    parser.add_argument("--tasks", type=Path, default=REPO / "assets/tasks/digits/train.jsonl")
    parser.add_argument("--groups", type=int, default=8, help="groups per step (the demo's groups_per_step)")
    parser.add_argument("--reps", type=int, default=6, help="timed steps per condition")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo's learner uses 1)")
    parser.add_argument("--quick", action="store_true", help="2 groups, 2 reps: a smoke run")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    groups_per_step, reps = (2, 2) if args.quick else (args.groups, args.reps)
    torch.set_num_threads(args.threads)

    policy, processor = load_model_and_processor(args.model)
    reference, _ = load_model_and_processor(args.model)
    items = load_dataset(args.tasks)[:groups_per_step]
    groups = record_groups(policy, processor, items, paper_budgets())
    images = {item.task.id: item.image_path for item in items}

    pixels = PixelCache(lambda group: image_inputs(processor, open_image(images[group.task.id])))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-8)  # the weights barely move: every step is alike
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    scorer = build_scorer("text_attention", 2)
    conditions = {
        name: StepConfig(loss=LossConfig(beta=0.04), micro_batch_groups=4, kept_mass_weight=weight, scorer=scorer)
        for name, weight in (("GRPO only", 0.0), ("GRPO + kept-set term", 1.0))
    }
    seconds: dict[str, list[float]] = {name: [] for name in conditions}
    for _ in range(reps + 1):  # the first round warms up and is not counted
        for name, config in conditions.items():
            started = time.perf_counter()
            grpo_step(policy, reference, optimizer, scheduler, groups, pixels, config)
            seconds[name].append(time.perf_counter() - started)
    baseline = statistics.mean(seconds["GRPO only"][1:])
    rows, results = [], []
    for name in conditions:
        timed = seconds[name][1:]
        mean = statistics.mean(timed)
        spread = statistics.stdev(timed) if len(timed) > 1 else 0.0
        rows.append([name, mean, spread, mean / baseline])
        results.append({"condition": name, "step_s_mean": mean, "step_s_std": spread, "ratio_to_grpo_only": mean / baseline,
                        "step_s": timed})
    print_table(f"learner step, {groups_per_step} groups x G=8, {args.threads} thread(s), {reps} reps",
                ["condition", "step s", "± s", "× GRPO only"], rows)
    path = save_results("learner_step", {"groups_per_step": groups_per_step, "group_size": 8, "reps": reps,
                                         "threads": args.threads, "results": results}, args.results_dir)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

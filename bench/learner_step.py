"""Learner step bench: the old per-rollout step against the new batched step, and the cost of the kept-set term.

The groups are recorded once from the bundled model on the first bundled digit-grid train tasks (the split is
generated, seeded, if missing), with the paper's eight mass
thresholds (`learner.recorded`: real keep sets and log-probs, no vLLM). Then one GRPO step
(`learner.step.grpo_step`, the demo's loss knobs: `LossConfig(beta=0.04)` with a frozen reference for the KL,
4 groups per vision chunk) is timed on those same groups under three conditions, taken in turn within each
round so that the machine's noise hits all of them alike:

    per-rollout (old path)           forward="per_rollout": every rollout re-runs the vision tower (policy and
                                     reference) and scores its completion alone, batch 1
    batched (new path)               forward="batched", micro_batch_tokens=16384: the vision towers run once
                                     per group image, the rows go through one padded LLM pass per micro-batch
    batched, GRPO only (kept_mass_weight 0)   the new path without the kept-set term

The first two carry the kept-set term (kept_mass_weight 1.0, the text_attention scorer at layer 2: the demo's
default), so the third, against the second, is the term's cost. Two more conditions time dense groups (the same
tasks recorded at keep 1.0 G times, as GRPO without pruning and bench/vs_trl.py's dense side run): the batched
path with one batch row per rollout (share_prompts off), and with each group's shared prompt computed once
(share_prompts on, the default). The first round warms up and is not counted.

Memory: a background thread samples the process's resident set (psutil) every 5 ms during each timed step;
the figure is the peak above the resident set just before the step. Freed memory is handed back to the OS
(`gc.collect`, glibc `malloc_trim`) before each step, so one condition's leftovers do not hide the next one's
growth. Run: `python bench/learner_step.py` (`--quick`: 2 groups, 2 reps).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import gc
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil
import torch
from common import RESULTS_DIR, print_table, save_results
from tqdm import tqdm

from learner.algorithms import LossConfig
from learner.recorded import record_groups
from learner.step import PixelCache, StepConfig, grpo_step
from services.data.build import prepare_rl_split
from services.data.loader import load_dataset, open_image
from services.modeling import load_model_and_processor
from services.modeling.pruned_forward import image_inputs
from services.schemas import Budget
from services.settings.models import paper_budgets
from services.sparsity.scorers import build_scorer

OLD, NEW, GRPO_ONLY = "per-rollout (old path)", "batched (new path)", "batched, GRPO only (kept_mass_weight 0)"
DENSE_ROWS, DENSE_SHARED = "dense groups, a row per rollout", "dense groups, shared prompts"
SAMPLE_EVERY_S = 0.005
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)


def _release_freed_memory() -> None:
    """Collect garbage and return the allocator's free pages to the OS (glibc's malloc_trim; elsewhere skipped)."""
    gc.collect()
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


class PeakRss:
    """Peak resident set size above the value at entry, sampled every SAMPLE_EVERY_S by a daemon thread."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._stop = threading.Event()
        self.start = self.peak = 0

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> Self:
        self.start = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def main(argv: list[str] | None = None) -> int:
    """Time grpo_step per condition, alternating; print a table and save JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "assets/tiny-qwen25vl")
    parser.add_argument("--tasks", type=Path, default=REPO / "assets/tasks/digits/rl.jsonl")
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
    # The bundled train split is not committed: a fresh clone generates it (seeded), as the learner would.
    items = load_dataset(prepare_rl_split(args.tasks))[:groups_per_step]
    groups = record_groups(policy, processor, items, paper_budgets())
    group_size = len(groups[0].rollouts)
    dense_groups = record_groups(policy, processor, items, [Budget(kind="keep_ratio", value=1.0)] * group_size)
    images = {item.task.id: item.image_path for item in items}

    pixels = PixelCache(lambda group: image_inputs(processor, open_image(images[group.task.id])))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-8)  # the weights barely move: every step is alike
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    scorer = build_scorer("text_attention", 2)
    loss = LossConfig(beta=0.04)
    batched = functools.partial(StepConfig, loss=loss, micro_batch_groups=4, micro_batch_tokens=16_384,
                                forward="batched", scorer=scorer)
    conditions = {
        OLD: (StepConfig(loss=loss, micro_batch_groups=4, forward="per_rollout", kept_mass_weight=1.0, scorer=scorer),
              groups),
        NEW: (batched(kept_mass_weight=1.0), groups),
        GRPO_ONLY: (batched(kept_mass_weight=0.0), groups),
        DENSE_ROWS: (batched(kept_mass_weight=1.0, share_prompts=False), dense_groups),
        DENSE_SHARED: (batched(kept_mass_weight=1.0, share_prompts=True), dense_groups),
    }
    baseline = {OLD: OLD, NEW: OLD, GRPO_ONLY: OLD, DENSE_ROWS: DENSE_ROWS, DENSE_SHARED: DENSE_ROWS}
    seconds: dict[str, list[float]] = {name: [] for name in conditions}
    peak_mb: dict[str, list[float]] = {name: [] for name in conditions}
    metrics: dict[str, list[dict[str, float]]] = {name: [] for name in conditions}
    for _ in tqdm(range(reps + 1), desc="rounds (the first warms up)", disable=None):
        for name, (config, step_groups) in conditions.items():
            _release_freed_memory()
            with PeakRss() as rss:
                started = time.perf_counter()
                step = grpo_step(policy, reference, optimizer, scheduler, step_groups, pixels, config)
                seconds[name].append(time.perf_counter() - started)
            peak_mb[name].append(rss.growth_mb)
            metrics[name].append(step)

    means = {name: statistics.mean(seconds[name][1:]) for name in conditions}
    table, results = [], []
    for name, (config, _groups) in conditions.items():
        timed, peaks = seconds[name][1:], peak_mb[name][1:]
        spread = statistics.stdev(timed) if len(timed) > 1 else 0.0
        ratio = means[name] / means[baseline[name]]
        table.append([name, means[name], spread, f"{ratio:.2f} ({baseline[name]})", max(peaks)])
        results.append(_result(name, config, timed, peaks, metrics[name][1:], means[name], spread,
                               baseline[name], ratio))
    speedup = means[OLD] / means[NEW]
    shared_speedup = means[DENSE_ROWS] / means[DENSE_SHARED]
    print_table(f"learner step, {groups_per_step} groups x G={group_size}, {args.threads} thread(s), {reps} reps",
                ["condition", "step s", "± s", "× baseline", "peak MB above start"], table)
    print(f"speedup new vs old: {speedup:.2f}x; dense groups, shared prompts vs a row per rollout: "
          f"{shared_speedup:.2f}x")
    path = save_results("learner_step", {
        "groups_per_step": groups_per_step, "group_size": group_size, "reps": reps, "threads": args.threads,
        "speedup_new_vs_old": speedup, "speedup_shared_prompts_dense": shared_speedup,
        "memory": "peak RSS above the pre-step RSS, sampled every 5 ms (psutil)",
        "results": results,
    }, args.results_dir)
    print(f"saved {path}")
    return 0


def _result(name: str, config: StepConfig, timed: list[float], peaks: list[float], steps: list[dict[str, float]],
            mean: float, spread: float, baseline: str, ratio: float) -> dict[str, Any]:
    """One condition's JSON row: its knobs, times, memory, and the step's loss (to see the paths agree)."""
    return {
        "condition": name, "forward": config.forward, "micro_batch_groups": config.micro_batch_groups,
        "micro_batch_tokens": config.micro_batch_tokens, "kept_mass_weight": config.kept_mass_weight,
        "share_prompts": config.share_prompts, "step_s_mean": mean, "step_s_std": spread, "baseline": baseline,
        "ratio_to_baseline": ratio, "step_s": timed,
        "peak_rss_mb_above_start_max": max(peaks), "peak_rss_mb_above_start_median": statistics.median(peaks),
        "peak_rss_mb_above_start": peaks,
        "loss_mean": statistics.mean(step["loss"] for step in steps),
        "grad_norm_mean": statistics.mean(step["grad_norm"] for step in steps),
    }


if __name__ == "__main__":
    raise SystemExit(main())

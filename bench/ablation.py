"""Which of the paper-faithful options buys what? (issue 20's ablation table)

Each variant is the demo configuration with a few settings changed (VARIANTS), trained from the base model on
the scenes RL split (where pruning hurts) with the same seeds and steps, then evaluated with `sf-eval` on a
**tuning split**: the committed val split's recipe drawn afresh from --tune-seed (300 items by default). The
test split and the fidelity bench's fresh test split are never looked at here, so a default chosen from this
table is tuned on val only.

Writes bench/results/ablation.json (every run's row with the fidelity bench's values and claims, and per
variant the mean and spread over seeds) and bench/results/ablation.png (per variant, the mean accuracy at
keep 0.25 and dense, and the reduction at tau = 0.975, with the seeds' spread), rewritten after every run.

Run: `.venv/bin/python bench/ablation.py` (6 variants x 3 seeds x 40 steps: about 55 min on a quiet 2-core
machine), `--variants default,rollout_gate --seeds 0`, or `--quick` (2 variants, 1 seed, 2 steps, 8 items).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import RESULTS_DIR, print_table, save_results
from fidelity import Phases, run_in_work_dir, sf_eval, train

from learner.fidelity import fidelity_row, summarize
from learner.fresh_split import fresh_split
from services.data.build import RL_ITEMS, RL_SPLIT, prepare_rl_split

FAMILY = "scenes"
BUDGETS = "r=1,r=0.25,tau=0.94,tau=0.975"
TUNE_SEED = 7  # not the committed val split's seed, not the fidelity bench's fresh test seed
RATIO_BUDGETS = "[" + ", ".join(f"{{kind: keep_ratio, value: {value}}}"
                                for value in (1.0, 0.75, 0.5, 0.375, 0.25, 0.1875, 0.125, 0.0625)) + "]"

# name -> (what it tests, settings overrides on top of the demo configuration)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("the demo configuration: per-group efficiency gate, kept-set term 1, beta 0.04, the paper's eight tau",
                []),
    "rollout_gate": ("the per-rollout efficiency gate (a wrong answer earns none; the default before this ablation)",
                     ["reward_server.rewards.efficiency_gate=rollout"]),
    "no_kept_term": ("GRPO alone: the kept-set term off", ["learner.kept_mass_weight=0"]),
    "kept_term_x3": ("the kept-set term at weight 3", ["learner.kept_mass_weight=3"]),
    "no_kl": ("no KL penalty (beta 0, no reference model)", ["learner.beta=0"]),
    "ratio_budgets": ("eight keep ratios 1 .. 1/16 instead of the paper's eight tau", [f"sparsity.budgets={RATIO_BUDGETS}"]),
}
# What the table and the plot show per run, beside the fidelity bench's values.
TABLE_METRICS = ["trained_dense", "trained_r025", "trained_tau0975_accuracy", "trained_tau0975_reduction"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; --quick shrinks every size to a smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--tune-seed", type=int, default=TUNE_SEED, help="seed of the tuning split (val recipe)")
    parser.add_argument("--tune-items", type=int, default=300, help="items of the tuning split")
    parser.add_argument("--steps", type=int, default=None, help="learner steps (default: the demo's)")
    parser.add_argument("--rl-items", type=int, default=RL_ITEMS, help="items of a bundled RL split that is missing")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="run folders, sf-eval outputs and logs (default runs/ablation-<time>; a temp dir with --quick)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in the results folder's ablation.json (same split, steps and "
                        "variant settings) and run only the missing or failed ones")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 variants, seed 0, 2 steps, 8 items")
    args = parser.parse_args(argv)
    extra: list[str] = []
    if args.quick:
        args.variants, args.seeds, args.tune_items, args.steps = "default,rollout_gate", "0", 8, 2
        extra = ["learner.groups_per_step=2", "rollout.group_size=4"]
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    args.seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    args.extra_overrides = extra
    return args


def plot(payload: dict[str, Any], path: Path) -> None:
    """Per variant, bars of the mean (with min-max over seeds) of dense and keep-0.25 accuracy and of the
    reduction at tau = 0.975; the base model's values as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, base = payload["summary"], payload["base"]
    variants = list(summary)
    metrics = [("trained_dense", "accuracy, dense", "base_dense"), ("trained_r025", "accuracy, keep 0.25", "base_r025"),
               ("trained_tau0975_reduction", "reduction at tau = 0.975", "base_tau0975_reduction")]
    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.2))
    for axis, (key, title, base_key) in zip(axes, metrics):
        means = [summary[variant][key]["mean"] for variant in variants]
        lows = [summary[variant][key]["mean"] - summary[variant][key]["min"] for variant in variants]
        highs = [summary[variant][key]["max"] - summary[variant][key]["mean"] for variant in variants]
        axis.bar(range(len(variants)), means, yerr=[lows, highs], capsize=4, color="tab:blue", alpha=0.8)
        axis.axhline(base[base_key], color="black", linestyle="--", linewidth=1, label="base model")
        axis.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
        axis.set_title(title)
        low = min(min(means), base[base_key])
        axis.set_ylim(max(0.0, low - 0.1) if "accuracy" in title else 0.0, 1.0 if "accuracy" in title else None)
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{FAMILY}, tuning split (val recipe, seed {payload['config']['tune_seed']}, "
                    f"{payload['config']['tune_items']} items); bars: mean over seeds, whiskers: min-max")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def resumable_rows(previous: dict[str, Any], config: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of an earlier ablation.json that this run may keep: measured on the same tuning split with the
    same steps and budgets, each with its variant's settings unchanged. Refuses a file measured otherwise."""
    same = ("family", "tune_seed", "tune_items", "steps", "budgets")
    differing = [key for key in same if previous.get("config", {}).get(key) != config[key]]
    if differing:
        raise SystemExit(f"--resume: the earlier ablation.json differs in {differing}; run without --resume")
    settings = {name: entry["overrides"] for name, entry in previous["config"]["variants"].items()}
    return [row for row in previous["rows"]
            if row["variant"] in config["variants"]
            and settings.get(row["variant"]) == config["variants"][row["variant"]]["overrides"]]


def write(payload: dict[str, Any], results_dir: Path) -> Path:
    """ablation.json and, once a run is done, ablation.png; rewritten after every run."""
    path = save_results("ablation", payload, results_dir)
    if payload["rows"]:
        plot(payload, results_dir / "ablation.png")
    return path


def run(args: argparse.Namespace, work: Path, phases: Phases) -> dict[str, Any]:
    """The tuning split and the base evaluation, then each seed's run of every variant; returns the payload."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    tasks = ROOT / "assets" / "tasks" / FAMILY
    tune = fresh_split(tasks / "val.jsonl", work / "tune", args.tune_seed, args.tune_items)
    dataset = prepare_rl_split(tasks / f"{RL_SPLIT}.jsonl", args.rl_items, say=phases.line)
    base_rows = sf_eval(ROOT / "assets" / "tiny-qwen25vl", "base", tune, work / "eval" / "base", work / "logs", BUDGETS)
    base_values = fidelity_row(FAMILY, -1, base_rows, base_rows)
    base = {key: base_values[key] for key in ("base_dense", "base_r025", "base_tau0975_reduction")}
    phases.line(f"tuning split {tune}; base: dense {base['base_dense']:.3f}, r=0.25 {base['base_r025']:.3f}, "
                f"tau=0.975 reduction {base['base_tau0975_reduction']:.3f}")
    payload: dict[str, Any] = {
        "config": {"family": FAMILY, "seeds": args.seeds, "tune_seed": args.tune_seed, "tune_items": args.tune_items,
                   "split": "val recipe, drawn afresh", "steps": args.steps or "the demo's (learner.max_steps)",
                   "budgets": BUDGETS.split(","), "quick": args.quick, "work_dir": str(work),
                   "variants": {name: {"what": VARIANTS[name][0], "overrides": VARIANTS[name][1]}
                                for name in args.variants}},
        "base": base, "rows": [], "failed": [], "summary": {}, "plot": "ablation.png"}
    earlier = args.results_dir / "ablation.json"
    if args.resume and earlier.is_file():
        payload["rows"] = resumable_rows(json.loads(earlier.read_text()), payload["config"])
        payload["summary"] = summarize(payload["rows"], by="variant")
        phases.line(f"--resume: kept {len(payload['rows'])} run(s) from {earlier}")
    done = {(row["variant"], row["seed"]) for row in payload["rows"]}
    for seed in args.seeds:  # seeds outer: an interrupted bench still has every variant
        for variant in args.variants:
            if (variant, seed) in done:
                continue
            variant_args = argparse.Namespace(steps=args.steps,
                                              overrides=[*args.extra_overrides, *VARIANTS[variant][1]])
            phases.line(f"{variant} seed {seed}: training")
            (work / variant / "logs").mkdir(parents=True, exist_ok=True)
            try:
                trained = train(FAMILY, seed, dataset, variant_args, work / variant)
                rows = sf_eval(trained["weights"], "trained", tune, work / "eval" / f"{variant}-seed{seed}",
                               work / "logs", BUDGETS)
            except RuntimeError as error:
                phases.line(f"{variant} seed {seed}: FAILED: {error}")
                payload["failed"].append({"variant": variant, "seed": seed, "error": str(error)})
            else:
                row = {"variant": variant, **fidelity_row(FAMILY, seed, base_rows, rows),
                       "steps": trained["steps"], "train_minutes": trained["train_minutes"]}
                payload["rows"].append(row)
                payload["summary"] = summarize(payload["rows"], by="variant")
                phases.line(f"{variant} seed {seed}: " + ", ".join(f"{key} {row[key]:.3f}" for key in TABLE_METRICS))
            write(payload, args.results_dir)
    return payload


def print_summary(payload: dict[str, Any]) -> None:
    """One line per variant: mean ± std over seeds, and the claims met."""
    columns = ["variant", "seeds", *TABLE_METRICS, "claims met"]
    table = [[variant, len(entry["seeds"]), *(f"{entry[key]['mean']:.3f} ± {entry[key]['std']:.3f}" for key in TABLE_METRICS),
              " ".join(f"{name.split('_')[0]}:{count}" for name, count in entry["claims_met"].items())]
             for variant, entry in payload["summary"].items()]
    base = payload["base"]
    print_table(f"ablation ({FAMILY}, tuning split; base dense {base['base_dense']:.3f}, r=0.25 {base['base_r025']:.3f}, "
                f"tau=0.975 reduction {base['base_tau0975_reduction']:.3f})", columns, table)


def main(argv: list[str] | None = None) -> int:
    """Run the bench; write the JSON and the plot."""
    args = parse_args(argv)
    phases = Phases("ablation")
    phases.line(f"variants {args.variants}, seeds {args.seeds}, tuning split seed {args.tune_seed}")
    payload = run_in_work_dir("ablation", args, run, phases)
    path = write(payload, args.results_dir)
    if payload["rows"]:
        print_summary(payload)
    phases.line(f"wrote {path}; {len(payload['failed'])} run(s) failed")
    return 1 if payload["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

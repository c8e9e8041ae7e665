"""Does the trade-off hold across seeds and where pruning hurts? (issue 20's reproduction script)

For each task family (digits, scenes) and each training seed: train the demo configuration from the base
model (`python -m learner.demo --no-eval`: configs/default.yaml + configs/demo.yaml, the family's bundled
RL split, learner.seed = rollout.seed = the seed), then evaluate base and trained with the one evaluator
(`sf-eval`: the workers' pruned rollout path on vLLM, greedy, judged by the reward server's checkers) on a
fresh test split generated at run time from --eval-seed (default: one no recipe was tuned on) with the
committed test split's generator recipe, at r = 1, .5, .25, .125 and tau = 0.94, 0.975. The base model is
evaluated once per family (it does not depend on the seed).

Writes bench/results/fidelity.json (one row per (family, seed) with 95% CIs, issue 20's three claims as
booleans with margins, the mean and spread over seeds) and bench/results/fidelity.png (accuracy against
reduction of every run), rewritten after every run (seeds outer, families inner), so an interrupted bench keeps
what it measured; a run that fails is listed under "failed" and the bench goes on (exit 1). Prints one line per
phase.

Run: `.venv/bin/python bench/fidelity.py` (2 families x 3 seeds x 40 steps; about 75 min on a quiet 2-core
machine), `--families scenes --seeds 0`, or `--quick` (one family, one seed, 2 steps, 8 items: the smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import RESULTS_DIR, print_table, save_results

from learner.demo import DEFAULT_CONFIGS
from learner.fidelity import ROW_METRICS, fidelity_row, summarize
from learner.fresh_split import FRESH_SEED, fresh_split
from learner.model_card import final_weights_folder
from learner.report import read_step_records
from services.data.build import RL_ITEMS, RL_SPLIT, prepare_rl_split

BUDGETS = "r=1,r=0.5,r=0.25,r=0.125,tau=0.94,tau=0.975"
TRAIN_TIMEOUT_S = 40 * 60
EVAL_TIMEOUT_S = 20 * 60


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; --quick shrinks every size to a smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="digits,scenes", help="comma-separated task families")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--eval-seed", type=int, default=FRESH_SEED,
                        help=f"seed of the fresh test splits (default {FRESH_SEED}: no recipe was tuned on it)")
    parser.add_argument("--eval-items", type=int, default=300, help="items per fresh test split")
    parser.add_argument("--steps", type=int, default=None, help="learner steps (default: the demo's)")
    parser.add_argument("--rl-items", type=int, default=RL_ITEMS, help="items of a bundled RL split that is missing")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="extra settings override for every training run (e.g. learner.kept_mass_weight=0)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="run folders, sf-eval outputs and logs (default runs/fidelity-<time>; a temp dir with --quick)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--quick", action="store_true", help="smoke run: digits, seed 0, 2 steps, 8 items")
    args = parser.parse_args(argv)
    if args.quick:
        args.families, args.seeds, args.eval_items, args.steps = "digits", "0", 8, 2
        args.overrides = [*args.overrides, "learner.groups_per_step=2", "rollout.group_size=4"]
    args.families = [family.strip() for family in args.families.split(",") if family.strip()]
    args.seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    return args


class Phases:
    """One progress line per phase, with the time since the bench started."""

    def __init__(self, bench: str = "fidelity") -> None:
        self.bench = bench
        self.started = time.monotonic()

    def line(self, text: str) -> None:
        """Print `[<bench> +M:SS] text`."""
        elapsed = int(time.monotonic() - self.started)
        print(f"[{self.bench} +{elapsed // 60}:{elapsed % 60:02d}] {text}", flush=True)


def run_logged(command: list[str], log_path: Path, timeout_s: float) -> int:
    """Run a child in its own session, its output into log_path; SIGTERM its group (then SIGKILL) on timeout."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SF_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    with log_path.open("wb") as log, subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                      stdin=subprocess.DEVNULL, start_new_session=True) as child:
        try:
            return child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGTERM)  # the demo tears its services down on SIGTERM
            try:
                return child.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                return child.wait()


def sf_eval(model: Path, label: str, dataset: Path, out: Path, logs: Path, budgets: str = BUDGETS) -> list[dict[str, Any]]:
    """sf-eval on one model at the given budgets (no timing runs), with the demo's settings; its rows."""
    command = [sys.executable, "-m", "learner.evaluate", "--model", str(model), "--label", label,
               "--dataset", str(dataset), "--budgets", budgets, "--speed-items", "0", "--out", str(out)]
    for config in DEFAULT_CONFIGS:
        command += ["--config", str(config)]
    log = logs / f"eval-{out.name}.log"
    code = run_logged(command, log, EVAL_TIMEOUT_S)
    if code != 0:
        raise RuntimeError(f"sf-eval on {model} failed (exit {code}); see {log}")
    return json.loads((out / "eval.json").read_text())["models"][0]["rows"]


def train(family: str, seed: int, dataset: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The demo configuration on one family's train split with one seed; its final weights and step records."""
    name = f"{family}-seed{seed}"
    command = [sys.executable, "-m", "learner.demo", "--no-eval", "--runs-root", str(work / "runs"),
               "--run-name", name, "--set", f"learner.datasets=[{dataset}]", "--set", f"learner.seed={seed}",
               "--set", f"rollout.seed={seed}"]
    if args.steps:
        command += ["--set", f"learner.max_steps={args.steps}"]
    for override in args.overrides:
        command += ["--set", override]
    started = time.monotonic()
    log = work / "logs" / f"train-{name}.log"
    code = run_logged(command, log, TRAIN_TIMEOUT_S)
    run_dir = work / "runs" / name
    records = read_step_records(run_dir / "metrics.jsonl")
    weights = final_weights_folder(run_dir / "weights")
    if code != 0 or weights is None:
        raise RuntimeError(f"training {name} failed (exit {code}); see {log} and {run_dir / 'logs'}")
    return {"weights": weights, "steps": len(records), "train_minutes": (time.monotonic() - started) / 60,
            "final_train_reduction": records[-1]["reduction_ratio"] if records else None,
            "final_train_accuracy": records[-1]["accuracy"] if records else None}


def plot(rows: list[dict[str, Any]], path: Path, eval_seed: int) -> None:
    """Accuracy against reduction: per family, the base model and every trained run (keep ratios as lines,
    thresholds as squares)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(row["family"] for row in rows))
    figure, axes = plt.subplots(1, len(families), figsize=(6.5 * len(families), 4.5), squeeze=False)
    for axis, family in zip(axes[0], families):
        runs = [row for row in rows if row["family"] == family]
        curves = [("base", runs[0]["budgets"]["base"], "black", "--")]
        curves += [(f"trained seed {row['seed']}", row["budgets"]["trained"], None, "-") for row in runs]
        for label, points, color, style in curves:
            ratios = sorted((p for b, p in points.items() if b.startswith("r=")), key=lambda p: p["reduction"])
            line = axis.plot([p["reduction"] for p in ratios], [p["accuracy"] for p in ratios], marker="o",
                             linestyle=style, color=color, label=label)[0]
            taus = [p for b, p in points.items() if b.startswith("tau=")]
            axis.plot([p["reduction"] for p in taus], [p["accuracy"] for p in taus], marker="s", linestyle="none",
                      color=line.get_color(), markersize=7)
        axis.axhline(runs[0]["base_dense"] - 0.02, color="grey", linewidth=0.8, linestyle=":",
                     label="base dense - 2 points")
        axis.axvline(0.60, color="grey", linewidth=0.8, linestyle="-.", label="claim 2: reduction 0.60 at tau = 0.975")
        axis.set_title(f"{family}: fresh test split (seed {eval_seed}, {runs[0]['budgets']['base']['r=1']['items']} items)")
        axis.set_xlabel("visual-token reduction ratio (mean); squares: tau = 0.94, 0.975")
        axis.set_ylabel("accuracy")
        axis.set_xlim(-0.05, 1.0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def train_and_evaluate(family: str, seed: int, dataset: Path, test: Path, base_rows: list[dict[str, Any]],
                       args: argparse.Namespace, work: Path, phases: Phases) -> dict[str, Any]:
    """One training run and the trained model's evaluation: its row."""
    phases.line(f"{family} seed {seed}: training the demo configuration")
    trained = train(family, seed, dataset, args, work)
    phases.line(f"{family} seed {seed}: trained {trained['steps']} steps in {trained['train_minutes']:.1f} min "
                f"(last step's rollout reduction {trained['final_train_reduction']})")
    trained_rows = sf_eval(trained["weights"], "trained", test, work / "eval" / f"{family}-seed{seed}", work / "logs")
    row = fidelity_row(family, seed, base_rows, trained_rows)
    row |= {key: (str(value) if isinstance(value, Path) else value) for key, value in trained.items()}
    met = ", ".join(f"{name.split('_')[0]} {'met' if claim['met'] else 'MISSED'}"
                    for name, claim in row["claims"].items() if claim["applies"])
    phases.line(f"{family} seed {seed}: trained dense {row['trained_dense']:.3f}, r=0.25 {row['trained_r025']:.3f}, "
                f"tau=0.975 {row['trained_tau0975_accuracy']:.3f} at reduction {row['trained_tau0975_reduction']:.3f}; "
                f"{met}")
    return row


def write(payload: dict[str, Any], args: argparse.Namespace) -> Path:
    """fidelity.json and, once a run is done, fidelity.png; rewritten after every run, so an interrupted bench
    keeps what it measured."""
    path = save_results("fidelity", payload, args.results_dir)
    if payload["rows"]:
        plot(payload["rows"], args.results_dir / "fidelity.png", args.eval_seed)
    return path


def run(args: argparse.Namespace, work: Path, phases: Phases) -> dict[str, Any]:
    """Every phase: fresh splits and base evaluations, then per seed each family's run; returns the payload."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    tests, datasets, base_rows = {}, {}, {}
    for family in args.families:
        tests[family] = fresh_split(ROOT / "assets" / "tasks" / family / "test.jsonl", work / "fresh",
                                    args.eval_seed, args.eval_items)
        datasets[family] = prepare_rl_split(ROOT / "assets" / "tasks" / family / f"{RL_SPLIT}.jsonl",
                                            args.rl_items, say=phases.line)
        phases.line(f"{family}: fresh test split {tests[family]} ({args.eval_items} items, seed {args.eval_seed}); "
                    f"RL split {datasets[family]}")
        base_rows[family] = sf_eval(ROOT / "assets" / "tiny-qwen25vl", "base", tests[family],
                                    work / "eval" / f"{family}-base", work / "logs")
        base = {row["budget"]: row for row in base_rows[family]}
        phases.line(f"{family}: base evaluated: dense {base['r=1']['accuracy']:.3f}, r=0.25 "
                    f"{base['r=0.25']['accuracy']:.3f}, tau=0.975 reduction {base['tau=0.975']['reduction_mean']:.3f}")
    payload: dict[str, Any] = {
        "config": {"families": args.families, "seeds": args.seeds, "eval_seed": args.eval_seed,
                   "eval_items": args.eval_items, "steps": args.steps or "the demo's (learner.max_steps)",
                   "overrides": args.overrides, "budgets": BUDGETS.split(","), "quick": args.quick,
                   "work_dir": str(work)},
        "rows": [], "failed": [], "summary": {}, "plot": "fidelity.png"}
    # Seeds outer, families inner: an interrupted bench still has both families.
    for seed in args.seeds:
        for family in args.families:
            try:
                row = train_and_evaluate(family, seed, datasets[family], tests[family], base_rows[family], args,
                                         work, phases)
            except RuntimeError as error:
                phases.line(f"{family} seed {seed}: FAILED: {error}")
                payload["failed"].append({"family": family, "seed": seed, "error": str(error)})
            else:
                payload["rows"].append(row)
                payload["summary"] = summarize(payload["rows"])
            write(payload, args)
    return payload


def run_in_work_dir(name: str, args: argparse.Namespace,
                    run: Callable[[argparse.Namespace, Path, Phases], dict[str, Any]], phases: Phases) -> dict[str, Any]:
    """Run a bench in --work-dir; without one, in a temporary folder for --quick, else in runs/<name>-<time>."""
    if args.work_dir is None and args.quick:
        with tempfile.TemporaryDirectory(prefix=f"{name}-") as temporary:
            return run(args, Path(temporary), phases)
    work = args.work_dir or ROOT / "runs" / time.strftime(f"{name}-%Y%m%d-%H%M%S")
    phases.line(f"work folder {work}")
    return run(args, work, phases)


SHORT_NAMES = {"base_dense": "base dense", "base_r025": "base r=.25", "trained_dense": "trained dense",
               "trained_r025": "trained r=.25", "trained_tau0975_accuracy": "trained τ=.975 acc",
               "trained_tau0975_reduction": "trained τ=.975 red", "base_tau0975_reduction": "base τ=.975 red"}


def print_rows(payload: dict[str, Any]) -> None:
    """The rows as a table, then the summary over seeds."""
    columns = ["family", "seed", *(SHORT_NAMES[key] for key in ROW_METRICS), "claims met"]
    table = [[row["family"], row["seed"], *(row[key] for key in ROW_METRICS),
              " ".join(f"{name.split('_')[0]}:{'y' if c['met'] else 'n'}" for name, c in row["claims"].items()
                       if c["applies"])] for row in payload["rows"]]
    print_table("fidelity: fresh test split, one row per training run", columns, table)
    summary = [[family, "mean ± std", *(f"{s[key]['mean']:.3f} ± {s[key]['std']:.3f}" for key in ROW_METRICS),
                " ".join(f"{name.split('_')[0]}:{count}" for name, count in s["claims_met"].items())]
               for family, s in payload["summary"].items()]
    print_table("fidelity: summary over seeds", columns, summary)


def main(argv: list[str] | None = None) -> int:
    """Run the bench; write the JSON and the plot."""
    args = parse_args(argv)
    phases = Phases()
    phases.line(f"families {args.families}, seeds {args.seeds}, fresh split seed {args.eval_seed}")
    payload = run_in_work_dir("fidelity", args, run, phases)
    path = write(payload, args)
    if payload["rows"]:
        print_rows(payload)
    phases.line(f"wrote {path} and {args.results_dir / 'fidelity.png'}; {len(payload['failed'])} run(s) failed")
    return 1 if payload["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

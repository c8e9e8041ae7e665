"""`sf-eval`: accuracy against visual-token reduction, per budget, for one model or two (base vs trained).

Run: `sf-eval --model FOLDER [--label NAME] [--model FOLDER2 --label NAME2] --dataset TASKS.jsonl
--budgets r=1,r=0.5,tau=0.975 --out DIR` (or `python -m learner.evaluate ...`). It prints a table and
writes DIR/eval.json, DIR/accuracy_vs_reduction.png and DIR/predictions-<label>.jsonl.
Standard benchmarks: `--benchmark FORMAT=PATH` (repeatable; mme, mmbench [--circular], textvqa, chartqa; read by
``services.benchmarks``), alone or beside --dataset. Each benchmark gets its rows (with its own metrics:
learner/benchmark_metrics.py) in one table, eval.json's "benchmarks" list and, when there are several, its
own accuracy_vs_reduction-<name>.png of its primary metric; the top-level rows then pool every item.

How each number is measured:
- accuracy: greedy completions (temperature 0) from the pruned rollout path the workers use
  (``services.rollout.pruned``: score each image once, every budget selects from those scores, one vLLM
  batch), judged by the reward server's checkers (``learner.judging.judge``: ``check_answer`` by
  answer_type, the one judge of every evaluation). An item's credit is 0 or 1, or the VQA accuracy in [0, 1]
  for 'vqa' items; accuracy is the mean credit. 95% CI: Wilson (normal interval when credits are fractional).
- reduction ratio: 1 - kept/total visual tokens of each request; mean, std (population), min and max.
- prefill time: each budget's batch (the first --speed-items items) run through ``llm.generate`` with
  max_tokens=1 after resetting vLLM's prefix, encoder and multimodal caches; wall time / requests. It
  includes vLLM's vision tower on the whole image (pruning happens after it) and one sampled token, and
  excludes the HF scorer (reported once per model as score_ms_per_item).
- decode tokens/s: the same batch again with max_tokens=--decode-tokens and ignore_eos (every request
  decodes exactly that many tokens, however short its answer), caches reset again; tokens after each
  request's first, divided by the extra wall time over the prefill run. A batch throughput, not one
  stream's speed; the fixed length keeps the decode time well above the prefill run's jitter.
  Both wall times are medians over --speed-repeats runs; on a tiny model the decode rate is mostly
  engine overhead, so read small differences between budgets as noise.
- KV-cache entries per request: the prompt as vLLM ran it (len(kept) image placeholders + text) plus
  the completion, from the accuracy run (an upper bound by one: the last sampled token is never fed back).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learner.eval_metrics import BatchTiming, BudgetParseError, ItemOutcome, parse_budgets, summarize_budget
from learner.eval_suites import (
    Suite,
    benchmark_argument,
    load_suites,
    primary_rows,
    primary_text,
    suite_metrics,
)
from learner.judging import EvaluationError, judge_item
from learner.progress import ChunkProgress
from services.data.loader import DatasetError, DatasetItem, open_media
from services.schemas.models import Budget
from services.settings import SettingsError, add_settings_arguments, settings_from_args
from services.settings.models import Settings

DEFAULT_BUDGETS = "r=1,r=0.5,r=0.25,r=0.125,tau=0.975"
JSON_NAME = "eval.json"
PLOT_NAME = "accuracy_vs_reduction.png"


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: its HF folder and the name its curve and rows carry."""

    label: str
    path: Path


def _budgets_argument(text: str) -> list[Budget]:
    try:
        return parse_budgets(text)
    except BudgetParseError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    """The CLI flags: models, dataset, budgets, sizes, output folder, plus --config/--set."""
    parser = argparse.ArgumentParser(prog="sf-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, type=Path, metavar="FOLDER",
                        help="HF model folder; give it twice to compare two models (e.g. base, trained)")
    parser.add_argument("--label", action="append", default=[], metavar="NAME",
                        help="name of each --model in the table and plot (default: the folder name)")
    parser.add_argument("--dataset", type=Path, metavar="JSONL", help="task file to evaluate on")
    parser.add_argument("--benchmark", action="append", default=[], type=benchmark_argument, metavar="FORMAT=PATH",
                        help="a standard benchmark to evaluate on (repeatable): mme=FOLDER, mmbench=TSV, "
                             "textvqa=JSON, chartqa=JSON|FOLDER; see the README's dataset formats")
    parser.add_argument("--circular", action="store_true",
                        help="mmbench: ask every rotation of the options; a question counts if all are right")
    parser.add_argument("--budgets", type=_budgets_argument, default=parse_budgets(DEFAULT_BUDGETS),
                        metavar="LIST", help=f"comma-separated r=<keep ratio> / tau=<mass> (default {DEFAULT_BUDGETS})")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="evaluate the first N items of each dataset/benchmark only (whole groups)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="completion length cap (default: rollout.max_new_tokens)")
    parser.add_argument("--batch-items", type=int, default=32, metavar="N",
                        help="items per vLLM batch of the accuracy run (each with every budget)")
    parser.add_argument("--speed-items", type=int, default=64, metavar="N",
                        help="items of each budget's timing runs (0 skips the speed columns)")
    parser.add_argument("--speed-repeats", type=int, default=3, metavar="K",
                        help="timing runs per budget; the speed columns use the median wall times")
    parser.add_argument("--decode-tokens", type=int, default=64, metavar="N",
                        help="tokens every request decodes in the timing runs (ignore_eos), >= 2")
    parser.add_argument("--out", type=Path, default=Path("eval-results"), metavar="DIR",
                        help="folder for eval.json, the plot and the predictions")
    add_settings_arguments(parser)
    return parser


def model_specs(paths: Sequence[Path], labels: Sequence[str]) -> list[ModelSpec]:
    """Pair --model folders with --label names; refuse missing folders, >2 models and label mismatches."""
    if len(paths) > 2:
        raise ValueError(f"--model given {len(paths)} times; sf-eval compares at most two models")
    if labels and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} --label for {len(paths)} --model; give one label per model or none")
    for path in paths:
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {path} is not a model folder (no config.json there)")
    names = list(labels) or [path.resolve().name for path in paths]
    if len(set(names)) < len(names):
        if labels:
            raise ValueError(f"--label values repeat ({', '.join(labels)}); each model needs its own")
        names = [f"{name}#{index + 1}" for index, name in enumerate(names)]
    return [ModelSpec(label, path) for label, path in zip(names, paths)]


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


class ModelEvaluator:
    """One model loaded twice over (HF scorer + vLLM engine), evaluated on every budget."""

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        import torch

        from rollout_worker.vllm_engine import build_llm
        from services.modeling import load_model_and_processor
        from services.sparsity.scorers import build_scorer

        self.spec = spec
        self.settings = settings
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.processor = load_model_and_processor(spec.path, device=device)
        self.scorer = build_scorer(settings.sparsity.scorer, settings.sparsity.scorer_layer)
        self.llm = build_llm(spec.path, settings)

    def close(self) -> None:
        """Stop vLLM's engine-core process."""
        self.llm.llm_engine.engine_core.shutdown()

    def accuracy_run(
        self, items: Sequence[DatasetItem], budgets: Sequence[Budget], max_new_tokens: int, batch_items: int
    ) -> tuple[dict[str, list[ItemOutcome]], list[dict[str, object]], dict[str, list[Any]], float]:
        """Greedy answers for every (item, budget): outcomes per budget, prediction records, the rollouts
        per budget (for the timing runs) and the HF scoring time per item in ms."""
        from vllm import SamplingParams

        greedy = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outcomes: dict[str, list[ItemOutcome]] = {budget.label: [] for budget in budgets}
        rollouts: dict[str, list[Any]] = {budget.label: [] for budget in budgets}
        predictions: list[dict[str, object]] = []
        score_s = 0.0
        with ChunkProgress(f"{self.spec.label} accuracy", len(items), "items") as progress:
            for chunk in _chunks(items, batch_items):
                score_s += self._accuracy_chunk(chunk, budgets, greedy, outcomes, rollouts, predictions)
                progress.advance(len(chunk))
        return outcomes, predictions, rollouts, 1000.0 * score_s / len(items)

    def _accuracy_chunk(
        self, chunk: Sequence[DatasetItem], budgets: Sequence[Budget], greedy: Any,
        outcomes: dict[str, list[ItemOutcome]], rollouts: dict[str, list[Any]], predictions: list[dict[str, object]],
    ) -> float:
        """Answer and judge one batch of items at every budget (appending to the three collections);
        returns the HF scoring seconds it took."""
        import torch

        from services.rollout.pruned import PrunedRequest, pruned_rollouts

        rewards = self.settings.reward_server.rewards
        images = [open_media(item) for item in chunk]
        # One image (or video) object per item: pruned_rollouts scores each (image, question) once for all budgets.
        requests = [PrunedRequest(image, item.task.question, budget)
                    for item, image in zip(chunk, images) for budget in budgets]
        with torch.no_grad():
            results = pruned_rollouts(self.llm, self.model, self.processor, self.scorer, requests, greedy)
        score_s = results[0].score_s * len(results)
        for request_index, result in enumerate(results):
            item = chunk[request_index // len(budgets)]
            verdict = judge_item(item, result.completion_text, rewards.number_rel_tolerance,
                                 rewards.number_abs_tolerance)
            correct, parsed = verdict.correct, verdict.parsed_answer
            label = result.budget.label
            rollouts[label].append(result)
            outcomes[label].append(ItemOutcome(
                correct=correct, visual_tokens_kept=result.visual_tokens_kept,
                visual_tokens_total=result.visual_tokens_total,
                engine_prompt_tokens=len(result.engine_prompt_token_ids),
                completion_tokens=len(result.completion_token_ids), score=verdict.partial_credit,
            ))
            predictions.append({
                "id": item.task.id, "budget": label, "answer": item.task.answer, "correct": correct,
                "score": verdict.score,
                "parsed_answer": parsed, "completion": result.completion_text,
                "visual_tokens_kept": result.visual_tokens_kept,
                "visual_tokens_total": result.visual_tokens_total,
            })
        return score_s

    def timing_run(
        self, items: Sequence[DatasetItem], rollouts: Sequence[Any], decode_tokens: int, repeats: int
    ) -> BatchTiming:
        """One budget's batch run max_tokens=1 then full length, `repeats` times, on cold caches (module doc)."""
        from vllm import SamplingParams

        from rollout_worker.vllm_engine import reset_engine_caches
        from services.modeling import build_prompt
        from services.rollout.pruned import engine_request
        from services.sparsity.budgets import Selection

        requests = [
            engine_request(build_prompt(self.processor, item.task.question, video=item.is_video), open_media(item),
                           Selection(rollout.kept_indices, rollout.visual_tokens_total))
            for item, rollout in zip(items, rollouts)
        ]
        walls: dict[int, list[float]] = {1: [], decode_tokens: []}
        tokens = 0
        for max_tokens in [1, decode_tokens] * repeats:
            # ignore_eos: every request decodes exactly max_tokens, so the decode rate is measured over
            # a fixed, known length (greedy answers are often one or two tokens long).
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            reset_engine_caches(self.llm)  # each timed run redoes vision tower and prefill
            started = time.perf_counter()
            outputs = self.llm.generate(requests, params, use_tqdm=False)
            walls[max_tokens].append(time.perf_counter() - started)
            tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
        return BatchTiming(requests=len(requests), prefill_s=statistics.median(walls[1]),
                           full_s=statistics.median(walls[decode_tokens]), full_completion_tokens=tokens,
                           repeats=repeats)


@dataclass(frozen=True)
class SuiteRun:
    """One model on one suite: a row per budget (with the benchmark's metrics) and its prediction records."""

    rows: list[dict[str, object]]
    predictions: list[dict[str, object]]


def evaluate_model(
    spec: ModelSpec, settings: Settings, suites: Sequence[Suite], budgets: Sequence[Budget],
    max_new_tokens: int, batch_items: int, speed_items: int, speed_repeats: int = 3, decode_tokens: int = 64,
) -> tuple[dict[str, object], list[SuiteRun]]:
    """The model's summary (rows over every item pooled) and, per suite, its rows and predictions.

    One engine answers every suite's items in one accuracy run; timing runs use each suite's first items.
    """
    from rollout_worker.vllm_engine import stored_dtype  # vllm loads lazily, after argument checks

    dtype = stored_dtype(spec.path, settings.rollout.vllm_dtype)
    items = [item for suite in suites for item in suite.dataset_items]
    evaluator = ModelEvaluator(spec, settings)
    try:
        outcomes, predictions, rollouts, score_ms = evaluator.accuracy_run(items, budgets, max_new_tokens, batch_items)
        runs, start = [], 0
        for suite in suites:
            end = start + len(suite.items)
            timed = suite.dataset_items[:speed_items]
            timings: dict[str, BatchTiming | None] = {budget.label: None for budget in budgets}
            if timed:
                with ChunkProgress(f"{spec.label} {suite.name} timing", len(budgets), "budgets") as progress:
                    for budget in budgets:
                        timings[budget.label] = evaluator.timing_run(
                            timed, rollouts[budget.label][start : start + len(timed)], decode_tokens, speed_repeats)
                        progress.advance(1)
            rows = []
            for budget in budgets:
                row = summarize_budget(budget, outcomes[budget.label][start:end], timings[budget.label])
                rows.append({**row, "metrics": suite_metrics(suite, outcomes[budget.label][start:end])})
            runs.append(SuiteRun(rows, predictions[start * len(budgets) : end * len(budgets)]))
            start = end
    finally:
        evaluator.close()
    pooled = runs[0].rows if len(runs) == 1 else [summarize_budget(budget, outcomes[budget.label]) for budget in budgets]
    summary = {"label": spec.label, "path": str(spec.path), "vllm_dtype": dtype,
               "score_ms_per_item": score_ms, "rows": pooled}
    return summary, runs


def _format_speed(row: dict[str, Any]) -> tuple[str, str]:
    speed = row["speed"]
    if speed is None:
        return "-", "-"
    decode = speed["decode_tokens_per_s"]
    return f"{speed['prefill_ms_per_request']:.1f}", "-" if decode is None else f"{decode:.0f}"


def print_table(results: dict[str, Any]) -> None:
    """The results as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sf-eval: {results['dataset']} ({results['items']} items, greedy, "
                        f"max {results['max_new_tokens']} new tokens)")
    for column in ("benchmark", "model", "budget", "reduction mean ± std [min, max]", "accuracy [95% CI]",
                   "benchmark metric", "prefill ms/req", f"decode tok/s ({results['decode_tokens']}-token runs)",
                   "KV entries/req"):
        table.add_column(column, justify="left" if column in ("benchmark", "model", "budget") else "right")
    # One table for every benchmark: a row per (benchmark, model, budget).
    for benchmark in results["benchmarks"]:
        for model in benchmark["models"]:
            for row in model["rows"]:
                low, high = row["accuracy_ci95"]
                table.add_row(
                    benchmark["name"], model["label"], row["budget"],
                    f"{row['reduction_mean']:.3f} ± {row['reduction_std']:.3f} "
                    f"[{row['reduction_min']:.3f}, {row['reduction_max']:.3f}]",
                    f"{row['accuracy']:.3f} [{low:.3f}, {high:.3f}]", primary_text(row), *_format_speed(row),
                    f"{row['kv_entries_mean']:.1f}",
                )
    Console(width=200).print(table)


def plot_results(results: dict[str, Any], path: Path, metric: str = "accuracy") -> None:
    """Accuracy (95% CI bars) against mean reduction ratio per model: keep ratios as a line, thresholds as squares.

    `metric` names what the rows' accuracy holds (a benchmark's primary metric in its own plot); a "title" key
    in results replaces the dataset-path title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    lowest = 1.0
    for model in results["models"]:
        color = None
        for kind, marker, style in (("keep_ratio", "o", "-"), ("mass_threshold", "s", "none")):
            rows = sorted((row for row in model["rows"] if row["kind"] == kind),
                          key=lambda row: row["reduction_mean"])
            if not rows:
                continue
            xs = [row["reduction_mean"] for row in rows]
            ys = [row["accuracy"] for row in rows]
            errors = [[row["accuracy"] - row["accuracy_ci95"][0] for row in rows],
                      [row["accuracy_ci95"][1] - row["accuracy"] for row in rows]]
            lowest = min([lowest, *(row["accuracy_ci95"][0] for row in rows)])
            label = f"{model['label']} ({'keep ratio' if kind == 'keep_ratio' else 'mass threshold'})"
            line = axes.errorbar(xs, ys, yerr=errors, marker=marker, linestyle=style, capsize=3, label=label,
                                 color=color)
            color = line[0].get_color()
            for index, (row, x, y) in enumerate(zip(rows, xs, ys)):
                # Alternate above/below: budgets that prune little sit close together near x = 0.
                axes.annotate(row["budget"], (x, y), textcoords="offset points",
                              xytext=(6, 10 if index % 2 else -14), fontsize=8, color=color,
                              bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.7, "lw": 0})
    axes.set_xlabel("visual-token reduction ratio (mean)")
    axes.set_ylabel(f"{metric} (95% CI)")
    axes.set_xlim(-0.05, 1.05)
    # Zoom to the data (in steps of 0.1) so that one-point differences show; the axis says where it starts.
    axes.set_ylim(max(0.0, math.floor(lowest * 10) / 10 - 0.05), 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower left")
    dataset = Path(results["dataset"])
    title = results.get("title", f"{dataset.parent.name}/{dataset.name}")
    axes.set_title(f"{title}: {metric} vs reduction ({results['items']} items)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def write_outputs(results: dict[str, Any], predictions: dict[str, list[dict[str, object]]], out: Path) -> None:
    """eval.json, the plot and one predictions JSONL per model, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(results, indent=2) + "\n")
    plot_results(results, out / PLOT_NAME)
    for benchmark in results["benchmarks"]:
        if benchmark["plot"] != PLOT_NAME:
            metric = benchmark["models"][0]["rows"][0]["metrics"]["primary"]
            models = [{**model, "rows": primary_rows(model["rows"])} for model in benchmark["models"]]
            plot_results({"dataset": benchmark["data"], "title": benchmark["name"], "items": benchmark["items"],
                          "models": models}, out / benchmark["plot"], metric)
    for label, records in predictions.items():
        with (out / f"predictions-{_file_label(label)}.jsonl").open("w") as lines:
            lines.writelines(json.dumps(record) + "\n" for record in records)


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Evaluate every model on every budget; write and return the results."""
    specs = model_specs(args.model, args.label)
    suites = load_suites(args.dataset, args.benchmark, args.limit, args.circular, args.out)
    items = [item for suite in suites for item in suite.items]
    max_new_tokens = args.max_new_tokens or settings.rollout.max_new_tokens
    single = len(suites) == 1
    results: dict[str, Any] = {
        "dataset": str(suites[0].data) if single else " + ".join(suite.name for suite in suites),
        "items": len(items), "budgets": [b.label for b in args.budgets],
        "decoding": "greedy", "max_new_tokens": max_new_tokens, "speed_items": min(args.speed_items, len(items)),
        "speed_repeats": args.speed_repeats, "decode_tokens": args.decode_tokens,
        "scorer": settings.sparsity.scorer, "scorer_layer": settings.sparsity.scorer_layer,
        "models": [], "plot": PLOT_NAME,
        "benchmarks": [{"name": suite.name, "format": suite.format, "data": str(suite.data), "items": len(suite.items),
                        "circular": args.circular and suite.format == "mmbench", "models": [],
                        "plot": PLOT_NAME if single else f"accuracy_vs_reduction-{_file_label(suite.name)}.png"}
                       for suite in suites],
    }
    if not single:
        results["title"] = "all benchmarks pooled"
    predictions = {}
    for spec in specs:
        summary, runs = evaluate_model(spec, settings, suites, args.budgets, max_new_tokens, args.batch_items,
                                       args.speed_items, args.speed_repeats, args.decode_tokens)
        results["models"].append(summary)
        predictions[spec.label] = []
        for benchmark, suite_run in zip(results["benchmarks"], runs):
            benchmark["models"].append({"label": spec.label, "rows": suite_run.rows})
            predictions[spec.label] += [{"benchmark": benchmark["name"], **record} for record in suite_run.predictions]
    write_outputs(results, predictions, args.out)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, evaluate, print the table; exit 2 with a clear message on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("limit", "max_new_tokens", "batch_items", "speed_repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.speed_items < 0:
        parser.error(f"--speed-items must be >= 0, got {args.speed_items}")
    if args.decode_tokens < 2:
        parser.error(f"--decode-tokens must be >= 2 (one prefill token plus decoding), got {args.decode_tokens}")
    if args.dataset is None and not args.benchmark:
        parser.error("give --dataset JSONL or at least one --benchmark FORMAT=PATH")
    try:
        model_specs(args.model, args.label)
        settings = settings_from_args(args)
    except (ValueError, SettingsError) as error:
        parser.error(str(error))
    # vLLM logs every engine step at INFO; the table is this tool's output.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        results = run(args, settings)
    except (DatasetError, FileNotFoundError, EvaluationError) as error:
        print(f"sf-eval: error: {error}", file=sys.stderr)
        return 2
    print_table(results)
    print(f"wrote {args.out / JSON_NAME} and {args.out / PLOT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

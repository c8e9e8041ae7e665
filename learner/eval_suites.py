"""sf-eval's inputs: the bundled task JSONL and standard benchmarks (`--benchmark FORMAT=PATH`), each a suite
whose items are judged together and summarised with its own metrics (learner/benchmark_metrics.py)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learner.benchmark_metrics import ScoredItem, benchmark_metrics
from learner.eval_metrics import ItemOutcome
from services.benchmarks import FORMATS, BenchmarkItem, load_benchmark
from services.data.loader import DatasetItem

IMAGES_FOLDER = "images"  # under --out: images a benchmark stores inline (MMBench's base64 cells), decoded


@dataclass(frozen=True)
class BenchmarkArgument:
    """One --benchmark FORMAT=PATH."""

    format: str
    path: Path


@dataclass(frozen=True)
class Suite:
    """One benchmark (or the task JSONL) to evaluate: its name in the table, format, source and items."""

    name: str
    format: str
    data: Path
    items: list[BenchmarkItem]

    @property
    def dataset_items(self) -> list[DatasetItem]:
        """The items as the evaluator takes them."""
        return [entry.item for entry in self.items]


def benchmark_argument(text: str) -> BenchmarkArgument:
    """Parse FORMAT=PATH (argparse type); the error lists the known formats."""
    name, sep, path = text.partition("=")
    name = name.strip().lower()
    if not sep or not path.strip() or name not in FORMATS:
        known = "; ".join(f"{key}: {what}" for key, what in FORMATS.items())
        raise argparse.ArgumentTypeError(f"--benchmark {text!r} must be FORMAT=PATH with FORMAT one of: {known}")
    return BenchmarkArgument(name, Path(path.strip()))


def first_items(items: Sequence[BenchmarkItem], limit: int | None) -> list[BenchmarkItem]:
    """The first `limit` items, extended to the end of the last one's group (an MME pair, an MMBench question's
    rotations), so that group metrics never see half a group."""
    if limit is None or limit >= len(items):
        return list(items)
    end = limit
    while end < len(items) and items[end].group == items[limit - 1].group:
        end += 1
    return list(items[:end])


def _unique_names(arguments: Sequence[BenchmarkArgument]) -> list[str]:
    names = [argument.format for argument in arguments]
    return [name if names.count(name) == 1 else f"{name}:{argument.path.stem}"
            for name, argument in zip(names, arguments)]


def load_suites(
    dataset: Path | None, benchmarks: Sequence[BenchmarkArgument], limit: int | None, circular: bool, out: Path,
) -> list[Suite]:
    """The task JSONL (if given) then every benchmark, each cut to `limit` items (whole groups)."""
    arguments = ([BenchmarkArgument("tasks", dataset)] if dataset is not None else []) + list(benchmarks)
    if not arguments:
        raise ValueError("give --dataset or at least one --benchmark FORMAT=PATH")
    suites = []
    for name, argument in zip(_unique_names(arguments), arguments):
        benchmark = load_benchmark(argument.format, argument.path, out / IMAGES_FOLDER, circular)
        suite_name = f"{argument.path.parent.name}/{argument.path.name}" if argument.format == "tasks" else name
        suites.append(Suite(suite_name, argument.format, argument.path, first_items(benchmark.items, limit)))
    return suites


def suite_metrics(suite: Suite, outcomes: Sequence[ItemOutcome]) -> dict[str, object]:
    """The suite's benchmark metrics at one budget, from its items' outcomes (in item order)."""
    if len(outcomes) != len(suite.items):
        raise ValueError(f"{len(outcomes)} outcomes for the {len(suite.items)} items of {suite.name}")
    scored = [ScoredItem(entry.group, entry.category, outcome.credit) for entry, outcome in zip(suite.items, outcomes)]
    return benchmark_metrics(suite.format, scored)


def primary_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose accuracy and CI are the benchmark's primary metric (for its accuracy-vs-reduction plot)."""
    return [{**row, "accuracy": row["metrics"]["value"], "accuracy_ci95": row["metrics"]["ci95"]} for row in rows]


def primary_text(row: dict[str, Any]) -> str:
    """'accuracy_plus 0.500' and, for MME, its total score: the table's metric column."""
    metrics = row["metrics"]
    text = f"{metrics['primary']} {metrics['value']:.3f}"
    if "total_score" in metrics:
        text += f" (score {metrics['total_score']:.1f})"
    return text

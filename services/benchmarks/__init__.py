"""Adapters from standard VQA benchmark files (MME, MMBench, TextVQA, ChartQA) to the project's tasks.

Each adapter reads a benchmark in the layout it is distributed in and returns BenchmarkItems: a task the
worker, learner and sf-eval understand (answer types yes_no, choice, vqa, relaxed) plus the group and
category its metric needs (learner/benchmark_metrics.py). `python -m services.benchmarks` writes them as a
task JSONL for training.
"""

from __future__ import annotations

from pathlib import Path

from services.benchmarks.chartqa import load_chartqa
from services.benchmarks.items import Benchmark, BenchmarkItem
from services.benchmarks.mmbench import load_mmbench
from services.benchmarks.mme import load_mme
from services.benchmarks.textvqa import load_textvqa
from services.data.loader import load_dataset

# Format name -> what --data points at (shown in help texts and errors).
FORMATS = {
    "mme": "the MME release folder (one subfolder per category) or VLMEvalKit's MME.tsv",
    "mmbench": "an MMBench TSV (base64 images)",
    "textvqa": "a TextVQA annotation JSON (TextVQA_0.5.1_val.json, images in train_images/ beside it)",
    "chartqa": "a ChartQA JSON (test_human.json, charts in png/ beside it) or its split folder",
    "tasks": "a task JSONL of this project (e.g. assets/tasks/scenes/test.jsonl)",
}


def load_benchmark(benchmark_format: str, path: Path, image_dir: Path, circular: bool = False) -> Benchmark:
    """Read one benchmark; image_dir receives images that must be decoded (the base64 cells of a TSV)."""
    if benchmark_format == "mme":
        items = load_mme(path, image_dir)
    elif benchmark_format == "mmbench":
        items = load_mmbench(path, image_dir, circular)
    elif benchmark_format == "textvqa":
        items = load_textvqa(path)
    elif benchmark_format == "chartqa":
        items = load_chartqa(path)
    elif benchmark_format == "tasks":
        items = [BenchmarkItem(item, item.task.id, "all") for item in load_dataset(path)]
    else:
        raise ValueError(f"unknown benchmark format {benchmark_format!r}; known: {', '.join(FORMATS)}")
    return Benchmark(benchmark_format, path, items)


__all__ = ["FORMATS", "Benchmark", "BenchmarkItem", "load_benchmark"]

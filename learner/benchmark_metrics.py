"""Each benchmark's own metrics from per-item scores (pure: plain numbers in, a JSON-able dict out).

- mme: accuracy over questions, accuracy+ over images (both questions right), per category the MME score
  100 * (accuracy + accuracy+), summed into the perception (10 categories, max 2000) and cognition
  (4 categories, max 800) scores. Primary metric: accuracy+.
- mmbench: accuracy over the asked questions; with rotations (circular), the circular accuracy: the share of
  questions right under every rotation (the primary metric then). Per category both.
- textvqa: VQA accuracy, the mean of the per-item credits in [0, 1].
- chartqa: relaxed accuracy, overall and per file (test_human, test_augmented) with their mean.
- tasks (the bundled JSONL): accuracy.

Every dict has "primary" (the metric's name), "value" and "ci95" (of the primary metric) and "categories".
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from learner.eval_metrics import mean_interval
from services.benchmarks.mme import COGNITION, PERCEPTION


@dataclass(frozen=True)
class ScoredItem:
    """One judged item: its metric group and category (from the adapter) and its credit in [0, 1]."""

    group: str
    category: str
    score: float


def _by(scored: Sequence[ScoredItem], key: Callable[[ScoredItem], str]) -> dict[str, list[ScoredItem]]:
    grouped: dict[str, list[ScoredItem]] = defaultdict(list)
    for item in scored:
        grouped[key(item)].append(item)
    return dict(grouped)


def _accuracy(scored: Sequence[ScoredItem]) -> float:
    return statistics.fmean(item.score for item in scored)


def _all_right(scored: Sequence[ScoredItem]) -> list[float]:
    """Per group, 1.0 when every item of the group got full credit, else 0.0 (groups in first-seen order)."""
    return [float(all(item.score >= 1.0 for item in group)) for group in _by(scored, lambda i: i.group).values()]


def _primary(name: str, values: Sequence[float], categories: dict[str, dict[str, float]]) -> dict[str, object]:
    return {"primary": name, "value": statistics.fmean(values), "ci95": list(mean_interval(values)),
            "categories": categories}


def mean_metrics(scored: Sequence[ScoredItem], name: str = "accuracy") -> dict[str, object]:
    """The mean credit as metric `name`, overall and per category."""
    categories = {category: {name: _accuracy(items), "items": len(items)}
                  for category, items in sorted(_by(scored, lambda i: i.category).items())}
    return _primary(name, [item.score for item in scored], categories)


def chartqa_metrics(scored: Sequence[ScoredItem]) -> dict[str, object]:
    """Relaxed accuracy overall and per file, plus the mean over files (how ChartQA papers report it)."""
    metrics = mean_metrics(scored, "relaxed_accuracy")
    categories = metrics["categories"]
    assert isinstance(categories, dict)
    metrics["mean_of_categories"] = statistics.fmean(entry["relaxed_accuracy"] for entry in categories.values())
    return metrics


def mme_metrics(scored: Sequence[ScoredItem]) -> dict[str, object]:
    """Accuracy, accuracy+ (per image), per-category MME scores and the perception/cognition sums."""
    categories = {}
    for category, items in sorted(_by(scored, lambda i: i.category).items()):
        accuracy, accuracy_plus = _accuracy(items), statistics.fmean(_all_right(items))
        categories[category] = {"accuracy": accuracy, "accuracy_plus": accuracy_plus,
                                "score": 100.0 * (accuracy + accuracy_plus), "items": len(items),
                                "images": len(_all_right(items))}
    metrics = _primary("accuracy_plus", _all_right(scored), categories)
    metrics["accuracy"] = _accuracy(scored)
    metrics["perception_score"] = sum(categories[c]["score"] for c in PERCEPTION if c in categories)
    metrics["cognition_score"] = sum(categories[c]["score"] for c in COGNITION if c in categories)
    metrics["total_score"] = sum(entry["score"] for entry in categories.values())
    return metrics


def mmbench_metrics(scored: Sequence[ScoredItem]) -> dict[str, object]:
    """Accuracy over asked questions and, when the questions were rotated, the circular accuracy."""
    circular = len(_by(scored, lambda i: i.group)) < len(scored)
    categories = {}
    for category, items in sorted(_by(scored, lambda i: i.category).items()):
        entry = {"accuracy": _accuracy(items), "items": len(items)}
        if circular:
            entry["circular_accuracy"] = statistics.fmean(_all_right(items))
        categories[category] = entry
    if circular:
        metrics = _primary("circular_accuracy", _all_right(scored), categories)
        metrics["questions"] = len(_all_right(scored))
    else:
        metrics = _primary("accuracy", [item.score for item in scored], categories)
    metrics["accuracy"] = _accuracy(scored)
    return metrics


BENCHMARK_METRICS: dict[str, Callable[[Sequence[ScoredItem]], dict[str, object]]] = {
    "mme": mme_metrics,
    "mmbench": mmbench_metrics,
    "textvqa": lambda scored: mean_metrics(scored, "vqa_accuracy"),
    "chartqa": chartqa_metrics,
    "tasks": mean_metrics,
}


def benchmark_metrics(benchmark_format: str, scored: Sequence[ScoredItem]) -> dict[str, object]:
    """The metrics of one benchmark format over its judged items (see the module docstring)."""
    if not scored:
        raise ValueError(f"benchmark {benchmark_format} has no judged items")
    return BENCHMARK_METRICS[benchmark_format](scored)

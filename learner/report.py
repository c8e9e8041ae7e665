"""The run report: per-step reward, accuracy and reduction from the learner's metrics.jsonl, as markdown + PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STEP_COLUMNS = ("step", "reward_total", "accuracy", "reduction_ratio", "kl_mean", "policy_version", "step_seconds")


def read_step_records(metrics_path: Path) -> list[dict[str, Any]]:
    """The learner's step records, one per line of metrics.jsonl."""
    if not metrics_path.is_file():
        return []
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def plot_training_curves(records: list[dict[str, Any]], out_path: Path) -> Path:
    """Reward, accuracy and reduction ratio per learner step, on one figure."""
    steps = [record["step"] for record in records]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, key, title in zip(axes, ("reward_total", "accuracy", "reduction_ratio"),
                                ("reward (mean of the step's rollouts)", "accuracy", "reduction ratio")):
        axis.plot(steps, [record.get(key, float("nan")) for record in records], marker="o", markersize=3)
        axis.set_title(title)
        axis.set_xlabel("learner step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return out_path


def markdown_table(records: list[dict[str, Any]], columns: tuple[str, ...] = STEP_COLUMNS) -> str:
    """The step records as a markdown table."""
    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    rows = "".join("| " + " | ".join(cell(record.get(column, "")) for column in columns) + " |\n"
                   for record in records)
    return header + rows


def write_report(run_dir: Path, summary: dict[str, Any], evaluation_md: str = "") -> Path:
    """Write <run_dir>/report.md (and training_curves.png) from the run's step records, and summary.json."""
    records = read_step_records(run_dir / "metrics.jsonl")
    lines = [f"# Sparsity Forcing run `{run_dir.name}`", ""]
    lines += [f"- {key}: {value}" for key, value in summary.items()]
    if records:
        plot_training_curves(records, run_dir / "training_curves.png")
        lines += ["", "## Training", "", "![training curves](training_curves.png)", "", markdown_table(records)]
    else:
        lines += ["", "No learner step was recorded."]
    if evaluation_md:
        lines += ["", "## Base against trained", "", evaluation_md]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

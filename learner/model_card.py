"""The model card: a README.md in a run's final weights folder that says what the weights are.

The folder keeps its `save_pretrained` layout (transformers and vLLM load it as it is; the README is not
part of the weights hash, services.weights.store). The card holds the base model, the training data, the
resolved settings, the learner steps behind the weights and, when sf-eval ran on them (the demo runs it),
the base-against-trained table of accuracy and reduction per budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.settings import Settings, settings_yaml

CARD_NAME = "README.md"


def final_weights_folder(weights_root: Path) -> Path | None:
    """The newest published version folder (v000040) under weights_root, or None when there is none."""
    root = Path(weights_root)
    versions = sorted(path for path in root.glob("v*") if path.is_dir() and path.name[1:].isdigit())
    return versions[-1] if versions else None


def run_folder(settings: Settings) -> Path:
    """The run folder the trainer writes (learner.run_dir, or runs/<run_name>: the trainer's own rule)."""
    return Path(settings.learner.run_dir or Path("runs") / settings.run_name)


def run_weights_root(settings: Settings) -> Path:
    """Where the learner publishes weight versions (learner.weights_root, or <run folder>/weights)."""
    return Path(settings.learner.weights_root or run_folder(settings) / "weights")


def version_step(records: Sequence[dict[str, Any]], version: int) -> int | None:
    """The learner step that published weight version `version`, from the run's step records."""
    for record in records:
        if record.get("policy_version") == version and "publish_seconds" in record:
            return int(record["step"])
    return None


def evaluation_table(evaluation: dict[str, Any]) -> str:
    """sf-eval's results as one row per budget: each model's accuracy [95% CI] and mean reduction ratio."""
    models = evaluation["models"]
    budgets = list(evaluation.get("budgets") or [row["budget"] for row in models[0]["rows"]])
    rows_of = [{row["budget"]: row for row in model["rows"]} for model in models]
    header = ["budget", *(f"{model['label']} accuracy [95% CI]" for model in models),
              *(f"{model['label']} reduction" for model in models)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for budget in budgets:
        accuracy, reduction = [], []
        for rows in rows_of:
            row = rows.get(budget)
            if row is None:
                accuracy.append("-")
                reduction.append("-")
                continue
            low, high = row["accuracy_ci95"]
            accuracy.append(f"{row['accuracy']:.3f} [{low:.3f}, {high:.3f}]")
            reduction.append(f"{row['reduction_mean']:.3f}")
        lines.append("| " + " | ".join([budget, *accuracy, *reduction]) + " |")
    return "\n".join(lines)


def model_card(folder: Path, settings: Settings, steps: int | None, evaluation: dict[str, Any] | None = None) -> str:
    """The README of a weights folder: what it was trained from and on, how, and how it scores."""
    base = settings.learner.model_path or settings.rollout.model_path
    facts = {
        "run": f"`{settings.run_name}`", "weights version": f"`{folder.name}`", "base model": f"`{base}`",
        "learner steps": "?" if steps is None else str(steps),
        "training data": ", ".join(f"`{path}`" for path in settings.learner.datasets),
        "epochs": str(settings.learner.epochs), "group size G": str(settings.rollout.group_size),
        "rollout budgets": ", ".join(budget.label for budget in settings.sparsity.budgets),
        "inference budget": settings.sparsity.inference_budget.label,
        "scorer": f"{settings.sparsity.scorer} (layer {settings.sparsity.scorer_layer})",
    }
    here = f"path/to/{folder.name}"  # the card travels with the folder: no absolute path of this machine
    if evaluation:
        scores = (f"Greedy answers on `{evaluation['dataset']}` ({evaluation['items']} items); reduction is "
                  f"1 - kept/total visual tokens, averaged over the items.\n\n{evaluation_table(evaluation)}")
    else:
        scores = ("No evaluation ran on these weights. Measure them with `sf-eval --model "
                  f"{base} --label base --model {here} --label trained --dataset TEST.jsonl`.")
    fact_rows = "\n".join(f"| {name} | {value} |" for name, value in facts.items())
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [sparsity-forcing, grpo, qwen2_5_vl, visual-token-pruning]
---

# Sparsity Forcing policy `{settings.run_name}` {folder.name}

Qwen2.5-VL post-trained with GRPO under visual-token budgets (Sparsity Forcing, arXiv 2504.18579): each
rollout of a group answers from the visual tokens its budget keeps, and the reward pays for correct answers
from fewer tokens. This folder is a `save_pretrained` checkpoint with its processor files.

| | |
|---|---|
{fact_rows}

## Base against trained (sf-eval)

{scores}

## Use

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{here}")
processor = AutoProcessor.from_pretrained("{here}")
```

vLLM loads the folder as it is (`vllm serve {here}`); pruning by budget at inference needs this
project's vLLM plugin (`services.vllm_plugin`, installed with the package).

## Settings

The resolved settings of the run (secrets masked):

```yaml
{settings_yaml(settings).rstrip()}
```
"""


def write_model_card(folder: Path, settings: Settings, steps: int | None,
                     evaluation: dict[str, Any] | None = None) -> Path:
    """Write (or rewrite) <folder>/README.md; returns its path."""
    path = Path(folder) / CARD_NAME
    path.write_text(model_card(Path(folder), settings, steps, evaluation), encoding="utf-8")
    return path


def write_run_card(settings: Settings, evaluation: dict[str, Any] | None = None) -> Path | None:
    """The card of the run's final weights, with the steps that made them (None when nothing was published)."""
    # Imported here: learner.report loads matplotlib, which sf-train (and its Ray actor) has no use for.
    from learner.report import read_step_records

    folder = final_weights_folder(run_weights_root(settings))
    if folder is None:
        return None
    records = read_step_records(run_folder(settings) / "metrics.jsonl")
    return write_model_card(folder, settings, version_step(records, int(folder.name[1:])), evaluation)

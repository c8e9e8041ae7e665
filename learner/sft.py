"""Supervised fine-tuning recipe: build the tiny Qwen2.5-VL and teach it the bundled tasks on dense tokens.

    python -m learner.sft --out assets/tiny-qwen25vl

Generates any missing task splits (deterministic by seed), trains a BPE tokenizer on the train split's
text, builds the random-weight model, trains it with teacher forcing (loss on the answer tokens only),
then writes the checkpoint (save_pretrained + processor files, loadable by transformers and vLLM) and
eval_report.json: dense greedy accuracy per task and, through services.sparsity, accuracy at keep
ratios 0.5 / 0.25 / 0.125 with the default attention scorer (the 'before RL' row).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from services.data import TASK_FAMILIES, DatasetItem, SplitSizes, build_family, load_dataset, open_image
from services.data.digits import DigitGridSpec
from services.data.scenes import SceneSpec
from services.modeling import TinyModelSpec, build_tiny_model, count_parameters, load_model_and_processor
from services.modeling.batching import greedy_answers, normalize_answer, training_inputs


class SFTConfig(BaseModel):
    """Every knob of the SFT recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: Path = Field(description="Checkpoint folder to write.")
    data_dir: Path = Field(Path("assets/tasks"), description="Task folder (one subfolder per family).")
    seed: int = Field(0, description="Seed of data generation, init, shuffling.")
    train_items: int = Field(8000, ge=1, description="Train items per family (generated when missing).")
    val_items: int = Field(100, ge=1, description="Validation items per family.")
    test_items: int = Field(200, ge=1, description="Test items per family.")
    batch_size: int = Field(32, ge=1, description="Training batch size.")
    steps: int = Field(1500, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(2e-3, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    eval_batch_size: int = Field(64, ge=1, description="Batch size of greedy evaluation.")
    keep_ratios: tuple[float, ...] = Field((0.5, 0.25, 0.125), description="Pruned-eval keep ratios.")
    pruned_eval_items: int = Field(200, ge=0, description="Test items per family in the pruned eval.")
    threads: int = Field(1, ge=1, description="torch intra-op threads (1 is fastest on a shared 2-core box).")
    train_scene_mix: dict[str, float] = Field(
        default_factory=lambda: {"colour": 1.0, "shape": 1.0, "position": 1.0, "count": 1.0, "list_objects": 4.0},
        description="Question mix of the scenes train split (dense 'list_objects' teaches seeing).",
    )
    train_digit_mix: dict[str, float] = Field(
        default_factory=lambda: {"digit_at": 3.0, "is_digit": 1.0, "read_grid": 4.0},
        description="Question mix of the digits train split (dense 'read_grid' teaches seeing).",
    )


def split_recipe(config: SFTConfig, family: str, split: str) -> dict:
    """What a split is generated from; a split on disk made from another recipe is regenerated."""
    sizes = {"train": config.train_items, "val": config.val_items, "test": config.test_items}
    recipe: dict = {"family": family, "split": split, "seed": config.seed, "items": sizes[split]}
    if split == "train":
        recipe["question_mix"] = config.train_scene_mix if family == "scenes" else config.train_digit_mix
    return recipe


def ensure_splits(config: SFTConfig) -> dict[str, dict[str, Path]]:
    """Generate each split whose recipe file is missing or differs; return family -> split -> JSONL path."""
    sizes = SplitSizes(train=config.train_items, val=config.val_items, test=config.test_items)
    paths: dict[str, dict[str, Path]] = {}
    for family in TASK_FAMILIES:
        family_dir = config.data_dir / family
        paths[family] = {}
        for split in ("train", "val", "test"):
            recipe = split_recipe(config, family, split)
            recipe_path = family_dir / f"{split}.recipe.json"
            jsonl_path = family_dir / f"{split}.jsonl"
            current = json.loads(recipe_path.read_text()) if recipe_path.is_file() else None
            if current != recipe or not jsonl_path.is_file():
                mix = recipe.get("question_mix")
                scene_spec = SceneSpec(question_mix=mix) if mix and family == "scenes" else None
                digit_spec = DigitGridSpec(question_mix=mix) if mix and family == "digits" else None
                shutil.rmtree(family_dir / "images" / split, ignore_errors=True)
                build_family(family, config.data_dir, config.seed, sizes, scene_spec, digit_spec, (split,))
                recipe_path.write_text(json.dumps(recipe, indent=2) + "\n")
            paths[family][split] = jsonl_path
    return paths


def learning_rate_at(step: int, config: SFTConfig) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def train(model: torch.nn.Module, processor, items: Sequence[DatasetItem], config: SFTConfig) -> list[float]:
    """Teacher-forced SFT on the answer tokens; returns the loss of each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay, betas=(0.9, 0.98))
    order_rng = random.Random(config.seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    progress = tqdm(range(config.steps), desc="sft", unit="step")
    for step in progress:
        if len(order) < config.batch_size:
            fresh = list(range(len(items)))
            order_rng.shuffle(fresh)
            order.extend(fresh)
        batch_items = [items[i] for i in order[:config.batch_size]]
        del order[:config.batch_size]
        batch = training_inputs(
            processor, [it.task.question for it in batch_items],
            [open_image(it.image_path) for it in batch_items], [it.task.answer for it in batch_items],
        )
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{learning_rate_at(step, config):.1e}")
    model.eval()
    return losses


def question_kind(item: DatasetItem) -> str:
    """A short label of the question's kind, for per-kind accuracy (its first three words)."""
    return " ".join(item.task.question.split()[:3])


def dense_accuracy(model, processor, items: Sequence[DatasetItem], batch_size: int, label: str) -> dict:
    """Greedy dense exact-match accuracy over items, overall and per question kind."""
    correct_by_kind: dict[str, list[bool]] = defaultdict(list)
    mistakes: list[dict[str, str]] = []
    for start in tqdm(range(0, len(items), batch_size), desc=f"eval {label}", unit="batch", leave=False):
        chunk = items[start:start + batch_size]
        answers = greedy_answers(model, processor, [it.task.question for it in chunk],
                                 [open_image(it.image_path) for it in chunk])
        for item, answer in zip(chunk, answers, strict=True):
            correct = normalize_answer(answer) == normalize_answer(item.task.answer)
            correct_by_kind[question_kind(item)].append(correct)
            if not correct and len(mistakes) < 10:
                mistakes.append({"id": item.task.id, "expected": item.task.answer, "got": answer})
    flat = [c for values in correct_by_kind.values() for c in values]
    return {
        "items": len(flat),
        "accuracy": float(np.mean(flat)),
        "by_kind": {kind: float(np.mean(values)) for kind, values in sorted(correct_by_kind.items())},
        "mistakes": mistakes,
    }


def keep_ratio_accuracy(model, processor, items: Sequence[DatasetItem], keep_ratios: Sequence[float]) -> dict:
    """Accuracy at each keep ratio with the default attention scorer (layer 2); 'pending' if unavailable."""
    try:
        from services.modeling.pruned_eval import pruned_greedy_answers
    except ImportError as error:  # the pruning package is another issue's work
        return {"status": "pending", "reason": str(error)}
    rows = {}
    questions = [it.task.question for it in items]
    images = [open_image(it.image_path) for it in items]
    for ratio in tqdm(keep_ratios, desc="pruned eval", unit="ratio", leave=False):
        answers = pruned_greedy_answers(model, processor, questions, images, ratio)
        correct = [normalize_answer(a.text) == normalize_answer(it.task.answer) for a, it in zip(answers, items)]
        kept = [a.visual_tokens_kept / a.visual_tokens_total for a in answers]
        rows[f"r={ratio:g}"] = {"accuracy": float(np.mean(correct)), "kept_share": float(np.mean(kept)),
                                "items": len(items)}
    return {"status": "ok", "scorer": "text_attention", "scorer_layer": 2, "rows": rows}


def evaluate(model, processor, paths: dict[str, dict[str, Path]], config: SFTConfig) -> dict:
    """Dense accuracy on val and test, and pruned accuracy on test, per family."""
    report = {}
    for family, splits in paths.items():
        test_items = load_dataset(splits["test"])
        report[family] = {
            "val": dense_accuracy(model, processor, load_dataset(splits["val"]), config.eval_batch_size,
                                  f"{family}/val"),
            "test": dense_accuracy(model, processor, test_items, config.eval_batch_size, f"{family}/test"),
            "test_pruned": keep_ratio_accuracy(model, processor, test_items[:config.pruned_eval_items],
                                               config.keep_ratios),
        }
    return report


def run(config: SFTConfig) -> dict:
    """The whole recipe; returns the eval report (also written to <out>/eval_report.json)."""
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    paths = ensure_splits(config)
    train_items = [item for family in TASK_FAMILIES for item in load_dataset(paths[family]["train"])]
    # Answers stand alone, as they follow "assistant\n" in the prompt (no leading space).
    corpus = [text for it in train_items for text in (it.task.question, it.task.answer)]
    data_s = time.perf_counter() - started
    staging = config.out.with_name(config.out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    build_tiny_model(staging, TinyModelSpec(seed=config.seed), corpus=corpus)
    model, processor = load_model_and_processor(staging)
    losses = train(model, processor, train_items, config)
    train_s = time.perf_counter() - started - data_s
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    report = {
        "config": json.loads(config.model_dump_json()),
        "parameters": count_parameters(model),
        "timing_s": {"data": round(data_s, 1), "train": round(train_s, 1)},
        "final_loss": float(np.mean(losses[-50:])),
        "torch_threads": torch.get_num_threads(),
    }
    report["eval"] = evaluate(model, processor, paths, config)
    report["timing_s"]["total"] = round(time.perf_counter() - started, 1)
    (staging / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(config.out, ignore_errors=True)
    staging.replace(config.out)
    return report


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m learner.sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, field in SFTConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name == "keep_ratios":
            parser.add_argument(flag, type=float, nargs="*", help=field.description)
        elif name.endswith("_mix"):
            parser.add_argument(flag, type=json.loads, help=field.description + " (JSON object)")
        else:
            parser.add_argument(flag, type=str, required=field.is_required(), help=field.description)
    values = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    report = run(SFTConfig(**values))
    print_summary(report)


def print_summary(report: dict) -> None:
    """A table of dense and pruned test accuracy per task, and the run's timing."""
    from rich.console import Console
    from rich.table import Table

    ratios = list(report["config"]["keep_ratios"])
    table = Table(title=f"base model: test accuracy (timing {report['timing_s']} s)")
    for column in ["task", "val dense", "test dense", *[f"test r={r:g}" for r in ratios]]:
        table.add_column(column)
    for family, result in report["eval"].items():
        pruned = result["test_pruned"]
        cells = [f"{pruned['rows'][f'r={r:g}']['accuracy']:.3f}" if pruned["status"] == "ok" else "pending"
                 for r in ratios]
        table.add_row(family, f"{result['val']['accuracy']:.3f}", f"{result['test']['accuracy']:.3f}", *cells)
    Console().print(table)

if __name__ == "__main__":
    main()

"""Supervised fine-tuning recipe: build the tiny Qwen2.5-VL and teach it the bundled tasks on dense tokens.

    python -m learner.sft --out assets/tiny-qwen25vl

Generates any missing task splits (deterministic by seed), trains a BPE tokenizer on the train split's
text, builds the random-weight model, trains it with teacher forcing (loss on the answer tokens only),
then writes the checkpoint (save_pretrained + processor files, loadable by transformers and vLLM) and
eval_report.json, whose "eval" section comes from the one evaluator (learner/base_eval.py: sf-eval's
pruned rollout path on vLLM, judged by the reward server's checkers): per task, dense val accuracy, and
accuracy and reduction at every budget on the committed test split and on a fresh one (the 'before RL' rows).
`python -m learner.base_eval` redoes that section alone, without retraining.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from learner.base_eval import (
    REPORT_BUDGETS,
    SETTINGS_FILES,
    evaluate_base,
    fresh_dir_for,
    print_summary,
    publish_base_model,
)
from learner.eval_metrics import parse_budgets
from learner.fresh_split import FRESH_SEED
from learner.grounding import (
    VisualTokenProbe,
    answer_token_mask,
    attention_mass_loss,
    set_text_attention,
    token_grids,
)
from learner.judging import judged_summary
from learner.lr_schedule import warmup_cosine
from learner.progress import ChunkProgress
from services.data import TASK_FAMILIES, DatasetItem, SplitSizes, build_family, load_dataset, open_image
from services.data.build import build_part
from services.data.digits import DigitGridSpec
from services.data.layout import Layout, load_layouts
from services.data.scenes import SceneSpec
from services.modeling import TinyModelSpec, build_tiny_model, count_parameters, load_model_and_processor
from services.modeling.batching import greedy_answers, training_inputs
from services.settings import load_settings


class TrainPart(BaseModel):
    """One slice of the training data: a task family at one image size, with its own question mix."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str = Field(description="'scenes' or 'digits'.")
    image_size: int = Field(description="Image side in px.")
    items: int = Field(ge=1, description="Items in this part.")
    question_mix: dict[str, float] = Field(description="Relative weight of each question kind.")
    grid_size: int = Field(2, ge=1, description="Digit grid side (digits only).")
    cell_pixels: int = Field(112, ge=28, description="Side of one object's placement cell (scenes only).")
    min_objects: int = Field(2, ge=1, description="Fewest shapes (scenes only).")
    max_objects: int = Field(3, ge=1, description="Most shapes (scenes only).")

    @property
    def name(self) -> str:
        """Split name on disk, e.g. 'train' for the full-size part, 'train-56' for 56-px images."""
        return "train" if self.image_size == 224 else f"train-{self.image_size}"

    def specs(self, position_tint: float = 0.0) -> tuple[SceneSpec | None, DigitGridSpec | None]:
        """The generator spec of this part's family."""
        if self.family == "scenes":
            return SceneSpec(image_size=self.image_size, cell_pixels=self.cell_pixels, min_objects=self.min_objects,
                             max_objects=self.max_objects, question_mix=self.question_mix,
                             position_tint=position_tint), None
        return None, DigitGridSpec(image_size=self.image_size, grid_size=self.grid_size,
                                   question_mix=self.question_mix, position_tint=position_tint)


_DENSE_SCENES = {"colour_at": 1.0, "shape_at": 1.0, "is_at": 1.0, "count_objects": 1.0, "list_objects": 2.0}
_DENSE_DIGITS = {"digit_at": 2.0, "is_digit": 1.0, "read_grid": 2.0}

# A curriculum by image size: when one object or digit fills the picture, a model from scratch learns
# to see it within ~50 steps; when it covers a small share of a large image, the model sits on the
# answer prior for hundreds of steps. The single-cell parts use the same cell size as the full tasks,
# so what is learned there transfers.
DEFAULT_TRAIN_PARTS: tuple[TrainPart, ...] = (
    TrainPart(family="scenes", image_size=112, items=4000, min_objects=1, max_objects=1,
              question_mix={"colour_at": 1.0, "shape_at": 1.0, "list_objects": 1.0}),
    TrainPart(family="scenes", image_size=224, items=8000, min_objects=2, max_objects=3,
              question_mix=_DENSE_SCENES),
    TrainPart(family="digits", image_size=112, items=4000, grid_size=1, question_mix=_DENSE_DIGITS),
    TrainPart(family="digits", image_size=224, items=8000, grid_size=2, question_mix=_DENSE_DIGITS),
)


class SFTConfig(BaseModel):
    """Every knob of the SFT recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: Path = Field(description="Checkpoint folder to write.")
    data_dir: Path = Field(Path("assets/tasks"), description="Task folder (one subfolder per family).")
    seed: int = Field(0, description="Seed of data generation, init, shuffling.")
    train_parts: tuple[TrainPart, ...] = Field(DEFAULT_TRAIN_PARTS, description="Training data curriculum.")
    val_items: int = Field(100, ge=1, description="Validation items per family.")
    test_items: int = Field(200, ge=1, description="Test items per family.")
    batch_size: int = Field(32, ge=1, description="Training batch size.")
    steps: int = Field(1400, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(2e-3, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    eval_batch_size: int = Field(64, ge=1, description="Batch size of the progress evaluations (--eval-every).")
    eval_budgets: str = Field(REPORT_BUDGETS, description="Budgets of the report's test rows (sf-eval's syntax).")
    fresh_seed: int = Field(FRESH_SEED, description="Seed of the report's fresh test splits (no recipe uses it).")
    fresh_items: int = Field(300, ge=1, description="Items per family in the report's fresh test split.")
    threads: int = Field(2, ge=1, description="torch intra-op threads (use 1 when a second job shares 2 cores).")
    attention_weight: float = Field(
        1.0, ge=0, description="Weight of the answer-attention loss (learner/grounding.py); 0 turns it off."
    )
    attention_layer: int = Field(3, ge=0, description="Decoder layer whose attention is grounded (not the scorer's).")
    attention_heads: int = Field(2, ge=1, description="How many of that layer's heads are grounded.")
    eval_every: int = Field(0, ge=0, description="Print val accuracy every N steps (0: only at the end).")
    position_tint: float = Field(
        48.0, ge=0, le=96, description="Background position tint of every generated split (services/data/layout.py)."
    )
    probe_weight: float = Field(
        1.0, ge=0, description="Weight of the per-visual-token content loss (a linear head, not saved); 0: off."
    )
    rope_theta: float = Field(
        10.0, gt=1.0, description="Text M-RoPE base of the built model (TinyModelSpec); bases 100 to 1e4 were tried "
        "and not adopted (README)."
    )


def _eval_specs(config: SFTConfig) -> tuple[SceneSpec, DigitGridSpec]:
    """The generator parameters of the evaluation splits (recorded, so a changed generator rebuilds them)."""
    return SceneSpec(position_tint=config.position_tint), DigitGridSpec(position_tint=config.position_tint)


def _up_to_date(recipe_path: Path, jsonl_path: Path, recipe: dict) -> bool:
    current = json.loads(recipe_path.read_text()) if recipe_path.is_file() else None
    return current == recipe and jsonl_path.is_file()


def ensure_splits(config: SFTConfig) -> tuple[list[Path], dict[str, dict[str, Path]]]:
    """Generate each split or train part whose recipe differs; return (train JSONLs, family -> eval splits)."""
    sizes = SplitSizes(train=1, val=config.val_items, test=config.test_items)
    eval_paths: dict[str, dict[str, Path]] = {}
    eval_scenes, eval_digits = _eval_specs(config)
    for family in TASK_FAMILIES:
        family_dir = config.data_dir / family
        eval_paths[family] = {}
        for split in ("val", "test"):
            recipe = {"family": family, "split": split, "seed": config.seed, "items": getattr(sizes, split),
                      "spec": (eval_scenes if family == "scenes" else eval_digits).model_dump()}
            jsonl_path = family_dir / f"{split}.jsonl"
            if not _up_to_date(family_dir / f"{split}.recipe.json", jsonl_path, recipe):
                shutil.rmtree(family_dir / "images" / split, ignore_errors=True)
                build_family(family, config.data_dir, config.seed, sizes, eval_scenes, eval_digits, splits=(split,))
                (family_dir / f"{split}.recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
            eval_paths[family][split] = jsonl_path
    train_paths = []
    for part in config.train_parts:
        family_dir = config.data_dir / part.family
        scene_spec, digit_spec = part.specs(config.position_tint)
        recipe = {"seed": config.seed, **part.model_dump(),
                  "spec": (scene_spec or digit_spec).model_dump()}
        jsonl_path = family_dir / f"{part.name}.jsonl"
        if not _up_to_date(family_dir / f"{part.name}.recipe.json", jsonl_path, recipe):
            shutil.rmtree(family_dir / "images" / part.name, ignore_errors=True)
            build_part(part.family, config.data_dir, part.name, part.items, config.seed, scene_spec, digit_spec)
            (family_dir / f"{part.name}.recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        train_paths.append(jsonl_path)
    return train_paths, eval_paths


def learning_rate_at(step: int, config: SFTConfig) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    return warmup_cosine(step, config.learning_rate, config.warmup_steps, config.steps)


def batch_indices(total: int, config: SFTConfig) -> Iterator[list[int]]:
    """Each step's item indices: shuffled passes over all items, every part mixed in from the first step."""
    order_rng = random.Random(config.seed)
    order: list[int] = []
    while True:
        if len(order) < config.batch_size:
            fresh = list(range(total))
            order_rng.shuffle(fresh)
            order.extend(fresh)
        yield order[:config.batch_size]
        del order[:config.batch_size]


def train(model: torch.nn.Module, processor, items: Sequence[DatasetItem], layouts: dict[str, Layout],
          config: SFTConfig, eval_items: dict[str, Sequence[DatasetItem]] | None = None) -> list[float]:
    """Teacher-forced SFT on the answer tokens plus the grounding loss; returns each step's answer loss."""
    probe = VisualTokenProbe(model) if config.probe_weight > 0 else None
    parameters = list(model.parameters()) + (list(probe.parameters()) if probe else [])
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98))
    batches = batch_indices(len(items), config)
    losses: list[float] = []
    grounding_losses: list[float] = []
    model.train()
    with ChunkProgress("sft", config.steps, "steps") as progress:
        for step in range(config.steps):
            loss, grounding = _train_step(model, processor, probe, parameters, optimizer,
                                          [items[i] for i in next(batches)], layouts, config, step)
            losses.append(loss)
            grounding_losses.append(grounding)
            progress.advance(1, loss=f"{np.mean(losses[-20:]):.4f}", grounding=f"{np.mean(grounding_losses[-20:]):.3f}",
                             lr=f"{learning_rate_at(step, config):.1e}")
            if eval_items and config.eval_every and (step + 1) % config.eval_every == 0:
                model.eval()
                scores = {family: progress_accuracy(model, processor, family_items, config.eval_batch_size, family)
                          for family, family_items in eval_items.items()}
                progress.note(f"step {step + 1}: val " + ", ".join(
                    f"{family} {score['accuracy']:.3f} "
                    f"({', '.join(f'{k} {v:.2f}' for k, v in score['by_kind'].items())})"
                    for family, score in scores.items()))
                model.train()
    if probe:
        probe.detach()
    model.eval()
    return losses


def _train_step(model: torch.nn.Module, processor, probe: VisualTokenProbe | None, parameters: list,
                optimizer: torch.optim.Optimizer, batch_items: Sequence[DatasetItem], layouts: dict[str, Layout],
                config: SFTConfig, step: int) -> tuple[float, float]:
    """One optimizer step on a batch; returns (answer loss, grounding loss)."""
    batch = training_inputs(
        processor, [it.task.question for it in batch_items],
        [open_image(it.image_path) for it in batch_items], [it.task.answer for it in batch_items],
    )
    for group in optimizer.param_groups:
        group["lr"] = learning_rate_at(step, config)
    batch_layouts = [layouts.get(it.task.id) for it in batch_items]
    grounded = all(batch_layouts)
    output = model(**batch, output_attentions=grounded and config.attention_weight > 0)
    loss = output.loss
    grounding = grounding_loss(model, batch, output, batch_layouts, config) if grounded else torch.zeros(())
    if probe and grounded:
        grounding = grounding + config.probe_weight * probe.loss(batch_layouts, batch["image_grid_thw"])
    (loss + grounding).backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), float(grounding.detach())


def grounding_loss(model, batch: dict, output, layouts: Sequence[Layout], config: SFTConfig) -> torch.Tensor:
    """The weighted answer-attention loss of one batch (learner/grounding.py); 0 when nothing is grounded."""
    if config.attention_weight == 0:
        return torch.zeros(())
    masks = [answer_token_mask(layout, *grid)
             for layout, grid in zip(layouts, token_grids(batch["image_grid_thw"]), strict=True)]
    attention = attention_mass_loss(output.attentions[config.attention_layer], batch["input_ids"],
                                    batch["labels"], model.config.image_token_id, masks, config.attention_heads)
    return torch.zeros(()) if attention is None else config.attention_weight * attention


def progress_accuracy(model, processor, items: Sequence[DatasetItem], batch_size: int, label: str) -> dict:
    """Greedy dense accuracy of the in-memory model (transformers generate), judged by the one judge; for the
    progress lines during training only (the report comes from learner/base_eval.py)."""
    completions: list[str] = []
    with ChunkProgress(f"eval {label}", len(items), "items") as progress:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            completions += greedy_answers(model, processor, [it.task.question for it in chunk],
                                          [open_image(it.image_path) for it in chunk])
            progress.advance(len(chunk))
    return judged_summary(items, completions)


def run(config: SFTConfig) -> dict:
    """The whole recipe; returns the eval report (also written to <out>/eval_report.json)."""
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    train_paths, paths = ensure_splits(config)
    train_items = [item for path in train_paths for item in load_dataset(path)]
    layouts = {task_id: layout for path in train_paths for task_id, layout in load_layouts(path).items()}
    # Answers stand alone, as they follow "assistant\n" in the prompt (no leading space).
    corpus = [text for it in train_items for text in (it.task.question, it.task.answer)]
    data_s = time.perf_counter() - started
    staging = config.out.with_name(config.out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    build_tiny_model(staging, TinyModelSpec(seed=config.seed, rope_theta=config.rope_theta), corpus=corpus)
    model, processor = load_model_and_processor(staging)
    if config.attention_weight > 0:
        set_text_attention(model, "eager")
    eval_items = {family: load_dataset(splits["val"])[:64] for family, splits in paths.items()}
    losses = train(model, processor, train_items, layouts, config, eval_items)
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
    del model  # the evaluator loads the saved folder (HF scorer + vLLM), as sf-eval would
    report["eval"] = evaluate_base(staging, config.data_dir, load_settings(SETTINGS_FILES),
                                   parse_budgets(config.eval_budgets), fresh_dir_for(config.fresh_seed),
                                   config.fresh_seed, config.fresh_items)
    return publish_base_model(report, staging, config.out, started)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m learner.sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, field in SFTConfig.model_fields.items():
        if name != "train_parts":
            parser.add_argument("--" + name.replace("_", "-"), type=str, required=field.is_required(),
                                help=field.description)
    values = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    report = run(SFTConfig(**values))
    print(f"timing {report['timing_s']} s")
    print_summary(report["eval"])


if __name__ == "__main__":
    main()

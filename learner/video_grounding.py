"""Stage 2 of the video recipe: teach the decoder to read a video by temporal slot, on cached visual tokens.

Qwen2.5-VL's vision tower sees one temporal slot at a time, so no visual token says when it was seen: the
decoder has to find "the digit at step k" through the temporal M-RoPE ids alone. The answer loss by itself does
not teach the tiny model that lookup (step, row and column stay at chance after 1,500 steps of plain SFT).
Grounding does: a few heads of one late decoder layer learn to attend, from the position that predicts the
answer, to the tokens of the step and cell the answer is read at (``learner.grounding.attention_mass_loss``,
as the image recipe grounds cells). The pruning scorer's layer stays unsupervised.

The vision tower is frozen in this stage, so each video's visual tokens are computed once and only the decoder
runs in the loop. Questions are drawn afresh at every step from each video's layout
(``services.data.moving_digits.question_about``), so every (kind, step) question of a training video is seen,
not only the one its task line asks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from learner.grounding import attention_mass_loss, video_answer_token_mask
from learner.lr_schedule import warmup_cosine
from learner.progress import ChunkProgress
from services.data import DatasetItem
from services.data.layout import Layout
from services.data.moving_digits import PER_STEP_KINDS, MovingDigitQuestion, question_about
from services.data.video import load_video
from services.modeling.batching import IGNORE_INDEX, cached_video_training_inputs
from services.modeling.pruned_forward import image_features, video_inputs


@dataclass(frozen=True)
class CachedVideos:
    """Visual tokens of a split's videos from a frozen vision tower, with each video's layout."""

    features: torch.Tensor  # (videos, visual tokens, hidden)
    layouts: list[Layout]
    grid_thw: torch.Tensor  # (3,): one patch grid for every video of the split
    seconds_per_grid: float


@dataclass(frozen=True)
class GroundingSchedule:
    """How the decoder is trained in this stage."""

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    kinds: dict[str, float]  # question kind -> relative weight
    attention_layer: int
    attention_heads: int
    attention_weight: float
    seed: int


@torch.no_grad()
def cache_visual_tokens(model: torch.nn.Module, processor, items: Sequence[DatasetItem],
                        layouts: dict[str, Layout], label: str) -> CachedVideos:
    """Run the vision tower once over every item's video; every video must share one patch grid."""
    missing = [item.task.id for item in items if item.task.id not in layouts]
    if missing:
        raise ValueError(f"{label}: {len(missing)} video(s) have no layout line (first: {missing[0]}); grounding "
                         "needs the generator's <split>.layout.jsonl beside the split")
    features, grids, seconds = [], set(), set()
    with ChunkProgress(f"visual tokens ({label})", len(items), "videos") as progress:
        for item in items:
            pixels, grid_thw, seconds_per_grid = video_inputs(processor, load_video(item.image_path))
            features.append(image_features(model, pixels, grid_thw))  # one tower for images and videos
            grids.add(tuple(grid_thw[0].tolist()))
            seconds.add(seconds_per_grid)
            progress.advance(1)
    if len(grids) != 1 or len(seconds) != 1:
        raise ValueError(f"{label}: videos of one split must share one patch grid and frame rate, got "
                         f"grids {sorted(grids)} and seconds per slot {sorted(seconds)}")
    return CachedVideos(torch.stack(features), [layouts[item.task.id] for item in items],
                        torch.tensor(grids.pop()), seconds.pop())


def draw_questions(rng: np.random.Generator, videos: CachedVideos, count: int,
                   kinds: dict[str, float]) -> list[tuple[int, MovingDigitQuestion]]:
    """``count`` (video index, question) pairs: a random video, a kind by weight, a random step."""
    names = list(kinds)
    weights = np.array([kinds[name] for name in names], dtype=float)
    probabilities = weights / weights.sum()
    drawn = []
    for _ in range(count):
        video = int(rng.integers(len(videos.layouts)))
        kind = names[int(rng.choice(len(names), p=probabilities))]
        layout = videos.layouts[video]
        drawn.append((video, _question(layout, kind, int(rng.integers(len(layout.cells))))))
    return drawn


def every_question(videos: CachedVideos, kinds: Sequence[str]) -> list[tuple[int, str, MovingDigitQuestion]]:
    """Every (video, kind, step) question of a split, as (video index, kind, question): for evaluation."""
    asked = []
    for video, layout in enumerate(videos.layouts):
        for kind in kinds:
            steps = range(len(layout.cells)) if kind in PER_STEP_KINDS else range(1)
            asked.extend((video, kind, _question(layout, kind, step)) for step in steps)
    return asked


def _question(layout: Layout, kind: str, step: int) -> MovingDigitQuestion:
    path = [cell.row * layout.cells_per_side + cell.column for cell in layout.cells]
    return question_about(kind, step, path, int(layout.cells[0].digit), layout.cells_per_side)


def _inputs(model: torch.nn.Module, processor, videos: CachedVideos,
            asked: Sequence[tuple[int, MovingDigitQuestion]]) -> dict:
    return cached_video_training_inputs(
        model, processor, [question.question for _, question in asked], [question.answer for _, question in asked],
        [videos.features[video] for video, _ in asked], videos.grid_thw, videos.seconds_per_grid)


def grounded_losses(model: torch.nn.Module, processor, videos: CachedVideos,
                    asked: Sequence[tuple[int, MovingDigitQuestion]],
                    schedule: GroundingSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer loss, attention loss) of one batch; the attention loss is 0 when no question reads one step."""
    batch = _inputs(model, processor, videos, asked)
    input_ids = batch.pop("input_ids")
    output = model(**batch, output_attentions=schedule.attention_weight > 0)
    if schedule.attention_weight == 0:
        return output.loss, torch.zeros(())
    grid = videos.grid_thw.tolist()
    masks = [video_answer_token_mask(videos.layouts[video], grid, question.step,
                                     divmod(question.cell, videos.layouts[video].cells_per_side))
             if question.step is not None else torch.zeros(videos.features.shape[1], dtype=torch.bool)
             for video, question in asked]
    attention = attention_mass_loss(output.attentions[schedule.attention_layer], input_ids, batch["labels"],
                                    model.config.video_token_id, masks, schedule.attention_heads)
    return output.loss, torch.zeros(()) if attention is None else attention


def train_decoder(model: torch.nn.Module, processor, videos: CachedVideos, schedule: GroundingSchedule) -> list[float]:
    """Grounded SFT of every decoder weight (the vision tower frozen); returns each step's total loss."""
    decoder = []
    for name, parameter in model.named_parameters():
        in_decoder = ".visual." not in f".{name}"
        parameter.requires_grad_(in_decoder)
        if in_decoder:
            decoder.append(parameter)
    optimizer = torch.optim.AdamW(decoder, lr=schedule.learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    rng = np.random.default_rng(schedule.seed)
    losses: list[float] = []
    model.train()
    with ChunkProgress("video grounding", schedule.steps, "steps") as progress:
        for step in range(schedule.steps):
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, schedule.learning_rate, schedule.warmup_steps, schedule.steps)
            asked = draw_questions(rng, videos, schedule.batch_size, schedule.kinds)
            answer, attention = grounded_losses(model, processor, videos, asked, schedule)
            (answer + schedule.attention_weight * attention).backward()
            torch.nn.utils.clip_grad_norm_(decoder, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(answer.detach() + schedule.attention_weight * attention.detach()))
            progress.advance(1, loss=f"{np.mean(losses[-20:]):.4f}", answer=f"{answer.item():.3f}")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.eval()
    return losses


@torch.no_grad()
def teacher_forced_accuracy(model: torch.nn.Module, processor, videos: CachedVideos, kinds: Sequence[str],
                            batch_size: int = 128) -> dict[str, float]:
    """Kind -> share of every question of the split whose answer tokens are all the dense model's argmax."""
    asked = every_question(videos, kinds)
    correct: dict[str, list[bool]] = {kind: [] for kind in kinds}
    for start in range(0, len(asked), batch_size):
        chunk = asked[start:start + batch_size]
        batch = _inputs(model, processor, videos, [(video, question) for video, _, question in chunk])
        batch.pop("input_ids")
        labels = batch.pop("labels")
        predicted = model(**batch).logits[:, :-1].argmax(-1)
        targets = labels[:, 1:]
        right = ((predicted == targets) | (targets == IGNORE_INDEX)).all(dim=1)
        for (_, kind, _), ok in zip(chunk, right.tolist(), strict=True):
            correct[kind].append(ok)
    return {kind: round(float(np.mean(flags)), 4) for kind, flags in correct.items()}

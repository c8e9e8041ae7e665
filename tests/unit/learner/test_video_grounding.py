"""Stage 2 of the video recipe: the answer's step-and-cell tokens, cached visual tokens, and the grounded decoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learner.grounding import video_answer_token_mask
from learner.video_grounding import (
    GroundingSchedule,
    cache_visual_tokens,
    every_question,
    grounded_losses,
    teacher_forced_accuracy,
    train_decoder,
)
from services.data import SplitSizes, build_family, load_dataset
from services.data.layout import CellContent, Layout, load_layouts
from services.data.video import load_video
from services.modeling import load_model_and_processor
from services.modeling.batching import cached_video_training_inputs, video_training_inputs

MODEL = Path(__file__).resolve().parents[3] / "assets/tiny-qwen25vl"
KINDS = {"when": 1.0, "where_row": 1.0, "where_column": 1.0, "which": 1.0}


def _layout(path: list[tuple[int, int]]) -> Layout:
    return Layout(id="v", cells_per_side=2, cell_pixels=56,
                  cells=[CellContent(row=row, column=column, digit=7) for row, column in path])


def test_the_video_answer_mask_covers_one_steps_tokens_in_one_cell() -> None:
    layout = _layout([(0, 0), (0, 1), (1, 0), (1, 1)])
    mask = video_answer_token_mask(layout, [4, 8, 8], step=2, cell=(1, 0))  # 4 slots of 4 x 4 tokens
    assert mask.shape == (64,)
    assert torch.nonzero(mask).flatten().tolist() == [32 + 8, 32 + 9, 32 + 12, 32 + 13]
    # Two slots a step (a step shown for 4 frames): both slots of step 1, the cell's 4 tokens in each.
    wide = video_answer_token_mask(layout, [8, 8, 8], step=1, cell=(0, 1))
    assert torch.nonzero(wide).flatten().tolist() == [32 + i for i in (2, 3, 6, 7)] + [48 + i for i in (2, 3, 6, 7)]
    with pytest.raises(ValueError, match="do not split evenly"):
        video_answer_token_mask(layout, [6, 8, 8], step=0, cell=(0, 0))


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    torch.manual_seed(0)
    model, processor = load_model_and_processor(MODEL)
    model.set_attn_implementation({"text_config": "eager",
                                   "vision_config": model.config.vision_config._attn_implementation})
    path = build_family("video", tmp_path_factory.mktemp("video"), seed=5, splits=("val",),
                        sizes=SplitSizes(train=0, val=4, test=0, rl=0))["val"]
    items = load_dataset(path)
    return model, processor, items, cache_visual_tokens(model, processor, items, load_layouts(path), "test")


def test_every_question_asks_each_step_of_each_video_with_the_layouts_answer(videos: tuple) -> None:
    *_, cached = videos
    asked = every_question(cached, list(KINDS))
    assert len(asked) == 4 * (4 + 4 + 4 + 1)
    for video, kind, question in asked:
        cells = cached.layouts[video].cells
        if kind == "which":
            assert question.answer == str(cells[0].digit) and question.step is None
            continue
        cell = cells[question.step]
        assert question.cell == cell.row * 2 + cell.column
        expected = {"when": question.step + 1, "where_row": cell.row + 1, "where_column": cell.column + 1}[kind]
        assert question.answer == str(expected)


def test_cached_visual_tokens_give_the_pixel_paths_inputs_and_logits(videos: tuple) -> None:
    model, processor, items, cached = videos
    questions, answers = [it.task.question for it in items], [it.task.answer for it in items]
    pixel_batch = video_training_inputs(model, processor, questions, [load_video(it.image_path) for it in items],
                                        answers)
    cached_batch = cached_video_training_inputs(model, processor, questions, answers, list(cached.features),
                                                cached.grid_thw, cached.seconds_per_grid)
    for key in ("input_ids", "attention_mask", "labels", "position_ids"):
        assert torch.equal(cached_batch[key], pixel_batch[key]), key
    cached_batch.pop("input_ids")
    with torch.no_grad():
        expected = model(**pixel_batch)
        got = model(**cached_batch)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    assert got.loss == pytest.approx(float(expected.loss), abs=1e-6)


def test_the_grounding_stage_trains_the_decoder_alone_and_pulls_attention_onto_the_answers_step(
    videos: tuple,
) -> None:
    import copy

    import numpy as np

    from learner.video_grounding import draw_questions

    base, processor, _items, cached = videos
    model = copy.deepcopy(base)
    schedule = GroundingSchedule(steps=20, batch_size=8, learning_rate=3e-3, warmup_steps=2, kinds=KINDS,
                                 attention_layer=3, attention_heads=2, attention_weight=1.0, seed=0)
    probe = draw_questions(np.random.default_rng(1), cached, 16, {"when": 1.0, "where_row": 1.0})
    with torch.no_grad():
        _, attention_before = grounded_losses(model, processor, cached, probe, schedule)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = train_decoder(model, processor, cached, schedule)
    with torch.no_grad():
        _, attention_after = grounded_losses(model, processor, cached, probe, schedule)
    assert len(losses) == 20 and all(np.isfinite(losses))
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]) == ("visual" in name), name  # the tower frozen, all else moved
        assert parameter.requires_grad  # handed back trainable
    assert float(attention_after) < 0.5 * float(attention_before)
    accuracy = teacher_forced_accuracy(model, processor, cached, list(KINDS))
    assert set(accuracy) == set(KINDS) and all(0.0 <= value <= 1.0 for value in accuracy.values())


def test_the_video_recipe_grounds_a_base_that_had_stage_one_and_keeps_its_lineage(tmp_path: Path) -> None:
    import json

    from learner.sft_video import VideoSFTConfig, run
    from services.modeling import count_parameters

    stage_one = VideoSFTConfig(base=MODEL, out=tmp_path / "stage1", data_dir=tmp_path / "tasks", train_items=4,
                               val_items=2, test_items=2, batch_size=2, steps=2, grounding_steps=0, evaluate=False)
    first = run(stage_one)
    assert "grounding" not in first and first["final_loss"] > 0
    grounded = run(VideoSFTConfig(**{**stage_one.model_dump(), "base": stage_one.out, "out": tmp_path / "stage2",
                                     "steps": 0, "grounding_steps": 3, "grounding_batch_size": 2}))
    assert grounded["final_loss"] is None  # no stage 1 this time
    assert set(grounded["grounding"]["val_teacher_forced"]["after"]) == {"when", "where_row", "where_column", "which"}
    assert grounded["base_recipe"]["config"]["steps"] == 2  # where the base came from
    assert json.loads((tmp_path / "stage2" / "eval_report.json").read_text())["grounding"] == grounded["grounding"]
    before, _ = load_model_and_processor(stage_one.out)
    after, _ = load_model_and_processor(tmp_path / "stage2")
    assert count_parameters(after) == count_parameters(before)
    assert after.config.text_config._attn_implementation == before.config.text_config._attn_implementation
    changed = {name for (name, a), (_, b) in zip(after.named_parameters(), before.named_parameters(), strict=True)
               if not torch.equal(a, b)}
    assert changed and not any("visual" in name for name in changed)


def test_caching_refuses_videos_without_a_layout_before_running_the_tower(videos: tuple) -> None:
    model, processor, items, _ = videos
    with pytest.raises(ValueError, match=r"4 video\(s\) have no layout line .*layout.jsonl"):
        cache_visual_tokens(model, processor, items, {}, "user split")

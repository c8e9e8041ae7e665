"""The learner's video forward without vLLM: positions by the engine's rule, batched path = per-rollout path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.data.video import Video
from services.modeling import build_prompt, load_model_and_processor
from services.modeling.batched_forward import RowSpec, rows_completion_logprobs
from services.modeling.pruned_forward import pruned_completion_logprobs, video_inputs, video_rope_positions
from services.rollout.pruned import score_prompt
from services.sparsity import KeepSetError
from services.sparsity.scorers import TextAttentionScorer

MODEL = Path(__file__).resolve().parents[3] / "assets" / "tiny-qwen25vl"


@pytest.fixture(scope="module")
def hf() -> tuple:
    if not (MODEL / "config.json").is_file():
        pytest.skip("the bundled tiny model is not in this checkout")
    return load_model_and_processor(MODEL)


def _video(frames: int, height: int, width: int, fps: float, seed: int = 0) -> Video:
    pixels = np.random.RandomState(seed).randint(0, 256, size=(frames, height, width, 3), dtype=np.uint8)
    return Video(frames=pixels, fps=fps)


def _prompt_ids(hf: tuple, video: Video, question: str = "Which digit moves across the grid?") -> torch.Tensor:
    model, processor = hf
    return score_prompt(model, processor, None, video, question).inputs.input_ids


def test_video_positions_space_slots_in_time_and_continue_after_the_videos_largest_position(hf: tuple) -> None:
    model, processor = hf
    video = _video(5, 56, 84, fps=1.0)  # 3 slots (odd count padded) of 2 x 3 tokens, 2 s a slot
    _, grid, seconds = video_inputs(processor, video)
    assert grid.tolist() == [[3, 4, 6]] and seconds == 2.0
    ids = _prompt_ids(hf, video)[0]
    positions = video_rope_positions(model, ids, grid[0], seconds)
    start = int(torch.nonzero(ids == model.config.video_token_id)[0])
    media = positions[:, start:start + 18] - start
    interval = model.config.vision_config.tokens_per_second * seconds  # 2 tokens/s * 2 s = 4
    assert media[0].tolist() == [interval * t for t in range(3) for _ in range(6)]
    assert media[1].tolist() == [h for _ in range(3) for h in range(2) for _ in range(3)]
    assert media[2].tolist() == [w for _ in range(3) for _ in range(2) for w in range(3)]
    assert positions[:, start + 18].tolist() == [start + 2 * interval + 1] * 3  # the video's max + 1 (vLLM)
    assert (positions[:, :start] == torch.arange(start)).all()
    # transformers' get_rope_index continues after max(h, w) = 3 instead; they agree while time is shorter.
    hf_positions, _ = model.model.get_rope_index(
        ids[None], mm_token_type_ids=(ids == model.config.video_token_id).int()[None] * 2,
        video_grid_thw=grid, second_per_grid_ts=torch.tensor([seconds]))
    assert int(hf_positions[0, 0, start + 18]) == start + 3
    short = _video(2, 112, 112, fps=4.0)  # 1 slot: no temporal extent
    ids, (_, grid, seconds) = _prompt_ids(hf, short)[0], video_inputs(processor, short)
    hf_positions, _ = model.model.get_rope_index(
        ids[None], mm_token_type_ids=(ids == model.config.video_token_id).int()[None] * 2,
        video_grid_thw=grid, second_per_grid_ts=torch.tensor([seconds]))
    assert torch.equal(video_rope_positions(model, ids, grid[0], seconds), hf_positions[:, 0])


def test_video_rows_batch_like_the_per_rollout_reference(hf: tuple) -> None:
    model, processor = hf
    videos = [_video(8, 112, 112, 2.0, seed=1), _video(6, 84, 140, 4.0, seed=2)]
    inputs = [video_inputs(processor, video) for video in videos]
    prompts = [_prompt_ids(hf, video)[0].tolist() for video in videos]
    totals = [int(g.prod()) // 4 for _, g, _ in inputs]
    rng = np.random.default_rng(0)
    rows = []
    for image, (prompt, total) in enumerate(zip(prompts, totals)):
        for keep in (total, total // 2, 3):
            kept = sorted(rng.choice(total, size=keep, replace=False).tolist())
            rows.append(RowSpec(prompt, [int(t) for t in rng.integers(5, 400, size=4)], kept, image))
    with torch.no_grad():
        batched, mask = rows_completion_logprobs(
            model, rows, torch.cat([p for p, _, _ in inputs]), torch.cat([g for _, g, _ in inputs]),
            [s for _, _, s in inputs])
        for index, row in enumerate(rows):
            pixel_values, grid, seconds = inputs[row.image]
            ids = torch.tensor([list(row.prompt_token_ids) + list(row.completion_token_ids)])
            reference = pruned_completion_logprobs(model, ids, pixel_values, grid, row.kept_indices, 4, seconds)
            assert mask[index].all()
            torch.testing.assert_close(batched[index], reference, atol=1e-5, rtol=0)
    # Pruning changes the log-probs (the agreement is not vacuous).
    assert float((batched[0] - batched[2]).abs().max()) > 1e-3
    # An image's planning of a video prompt finds no image placeholders: a clear error, not a silent mix-up.
    with pytest.raises(KeepSetError, match="placeholders"):
        rows_completion_logprobs(model, rows[:1], inputs[0][0], inputs[0][1])


def test_the_scorer_ranks_all_frames_tokens_of_a_video(hf: tuple) -> None:
    model, processor = hf
    video = _video(8, 112, 112, 2.0, seed=3)
    scored = score_prompt(model, processor, TextAttentionScorer(layer=2), video, "At which step is the digit in row 1, column 2?")
    assert scored.scores.shape == (64,) and bool((scored.scores >= 0).all())
    assert int((scored.inputs.input_ids == model.config.video_token_id).sum()) == 64
    assert scored.inputs.video_seconds_per_grid == 1.0
    assert "<|video_pad|>" in build_prompt(processor, "q", video=True)
    assert "<|image_pad|>" not in build_prompt(processor, "q", video=True)

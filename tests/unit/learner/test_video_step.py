"""The learner's GRPO step on video groups: the batched path takes the per-rollout path's step, kept-set term included."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from learner.algorithms import LossConfig
from learner.recorded import record_groups
from learner.step import PixelCache, StepConfig, grpo_step, rollout_logprobs
from services.data import SplitSizes, build_family, load_dataset
from services.data.video import load_video
from services.modeling import load_model_and_processor
from services.modeling.pruned_forward import video_inputs
from services.schemas import Budget
from services.sparsity.scorers import build_scorer

MODEL = Path(__file__).resolve().parents[3] / "assets/tiny-qwen25vl"
BUDGETS = [Budget(kind="keep_ratio", value=value) for value in (1.0, 0.5, 0.25, 0.125)]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    torch.manual_seed(0)
    model, processor = load_model_and_processor(MODEL)
    path = build_family("video", tmp_path_factory.mktemp("video"), seed=5, splits=("val",),
                        sizes=SplitSizes(train=0, val=3, test=0, rl=0))["val"]
    items = load_dataset(path)
    groups = record_groups(model, processor, items, BUDGETS)
    videos = {item.task.id: item.image_path for item in items}
    pixels = PixelCache(lambda group: video_inputs(processor, load_video(videos[group.task.id])))
    return model, groups, pixels


def _step(model: torch.nn.Module, groups: list, pixels: PixelCache, **knobs: object) -> tuple[dict, dict]:
    policy, reference = copy.deepcopy(model), copy.deepcopy(model)
    reference.requires_grad_(False)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    config = StepConfig(loss=LossConfig(beta=0.04), scorer=build_scorer("text_attention", 2), **knobs)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    metrics = grpo_step(policy, reference, optimizer, scheduler, groups, pixels, config)
    return metrics, {name: p.detach() - before[name] for name, p in policy.named_parameters()}


def test_recorded_video_rollouts_replay_to_their_logprobs(recorded: tuple) -> None:
    model, groups, pixels = recorded
    video_pad = int(model.config.video_token_id)
    for group in groups:
        assert len(pixels.get(group)) == 3  # a video's pixel inputs carry its seconds per temporal slot
        for rollout in group.rollouts:
            assert rollout.prompt_token_ids.count(video_pad) == rollout.visual_tokens_total == 64
            with torch.no_grad():
                alone = rollout_logprobs(model, rollout, pixels.get(group))
            torch.testing.assert_close(alone, torch.tensor(rollout.completion_logprobs), atol=1e-5, rtol=0)


def test_batched_video_step_takes_the_per_rollout_step(recorded: tuple) -> None:
    model, groups, pixels = recorded
    reference_metrics, reference_update = _step(model, groups, pixels, forward="per_rollout", micro_batch_groups=3,
                                                kept_mass_weight=1.0, grad_clip=1e9)
    metrics, update = _step(model, groups, pixels, micro_batch_groups=2, micro_batch_tokens=300,
                            kept_mass_weight=1.0, grad_clip=1e9)
    for name in ("loss", "policy_loss", "kl_penalty", "kept_mass_loss", "ratio_mean", "tokens", "rows"):
        assert metrics[name] == pytest.approx(reference_metrics[name], abs=1e-6), name
    assert metrics["kept_mass_loss"] != 0.0  # the kept-set term ran its scorer pass over the video's tokens
    assert max(float(u.abs().max()) for u in update.values()) > 0
    for name, change in update.items():
        torch.testing.assert_close(change, reference_update[name], atol=1e-5, rtol=1e-4, msg=name)

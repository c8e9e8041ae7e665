"""Checkpoints: an HF folder plus the training state; atomic `latest`, pruning, exact optimizer/RNG round trip."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, get_scheduler

from learner.checkpoint import (
    TrainingState,
    checkpoints_dir,
    latest_checkpoint,
    load_training_state,
    restore_rng_states,
    save_checkpoint,
)
from learner.feeder import FeederPosition
from services.modeling import TinyModelSpec, build_tiny_model, load_model_and_processor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny"), TinyModelSpec(num_hidden_layers=3, vision_depth=1))
    return load_model_and_processor(folder)


def trained_optimizer(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, object]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_scheduler("cosine", optimizer, 1, 10)
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer, scheduler


def test_checkpoint_round_trips_state_optimizer_and_rng(tmp_path: Path, tiny) -> None:
    model, processor = tiny
    optimizer, scheduler = trained_optimizer(model)
    state = TrainingState(run_id="r1", step=7, policy_version=3, base_model_path="/base",
                          feeder=FeederPosition(epoch=1, index=4, enqueued=20), groups_done=9,
                          groups_trained=2, trained_groups={"g1": 2, "g2": 3})
    folder = save_checkpoint(tmp_path, model, processor, optimizer, scheduler, state)
    expected = (random.random(), float(np.random.rand()), torch.rand(3))

    assert latest_checkpoint(tmp_path) == folder and folder.name == "step-00000007"
    loaded_state, torch_state = load_training_state(folder)
    assert loaded_state == state
    restore_rng_states(torch_state["rng"])
    assert (random.random(), float(np.random.rand())) == expected[:2] and torch.equal(torch.rand(3), expected[2])

    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)  # a plain HF folder
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    fresh = torch.optim.AdamW(reloaded.parameters(), lr=1e-3)
    fresh.load_state_dict(torch_state["optimizer"])
    for before, after in zip(optimizer.state.values(), fresh.state.values(), strict=True):
        assert all(torch.equal(before[key], after[key]) for key in ("exp_avg", "exp_avg_sq", "step"))
    assert torch_state["scheduler"]["last_epoch"] == scheduler.state_dict()["last_epoch"] == 1


def test_latest_moves_atomically_and_old_checkpoints_are_pruned(tmp_path: Path, tiny) -> None:
    model, processor = tiny
    optimizer, scheduler = trained_optimizer(model)
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 4, 6):
        state = TrainingState(run_id="r", step=step, base_model_path="/base")
        save_checkpoint(tmp_path, model, processor, optimizer, scheduler, state, keep=2)
    root = checkpoints_dir(tmp_path)
    assert sorted(path.name for path in root.glob("step-*")) == ["step-00000004", "step-00000006"]
    (root / ".tmp-step-00000008").mkdir()  # a checkpoint whose write crashed halfway
    assert latest_checkpoint(tmp_path).name == "step-00000006"
    (root / "latest").write_text("step-00000099\n")
    with pytest.raises(FileNotFoundError, match="step-00000099"):
        latest_checkpoint(tmp_path)

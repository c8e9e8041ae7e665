"""Checkpoints: an HF folder plus the training state; atomic `latest`, pruning, exact optimizer/RNG round trip."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, get_scheduler

from learner.checkpoint import (
    TORCH_STATE_FILE,
    TrainingState,
    UnsafeCheckpointError,
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


class _RunsCodeWhenUnpickled:
    """A pickle that makes a folder when loaded: what a compromised container could plant in /runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_torch_state_loads_with_weights_only(tmp_path: Path, tiny) -> None:
    model, processor = tiny
    optimizer, scheduler = trained_optimizer(model)
    folder = save_checkpoint(tmp_path, model, processor, optimizer, scheduler,
                             TrainingState(run_id="r", step=1, base_model_path="/base"))
    # weights_only=True refuses any global outside torch's allow-list: the file cannot carry code.
    torch.load(folder / TORCH_STATE_FILE, map_location="cpu", weights_only=True)


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path: Path, tiny) -> None:
    model, processor = tiny
    optimizer, scheduler = trained_optimizer(model)
    folder = save_checkpoint(tmp_path, model, processor, optimizer, scheduler,
                             TrainingState(run_id="r", step=1, base_model_path="/base"))
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": _RunsCodeWhenUnpickled(marker)}, folder / TORCH_STATE_FILE)
    with pytest.raises(UnsafeCheckpointError, match=TORCH_STATE_FILE):
        load_training_state(folder)
    assert not marker.exists()


class _Crash(RuntimeError):
    """Stands for the process dying at one file-system call."""


def _crash_at(monkeypatch: pytest.MonkeyPatch, crash_index: int) -> list[str]:
    """Make the crash_index-th rename, replace, rmtree or fsync raise _Crash; returns the calls seen."""
    calls: list[str] = []

    def wrap(owner: object, name: str) -> None:
        original = getattr(owner, name)

        def crashing(*args, **kwargs):
            calls.append(name)
            if len(calls) - 1 == crash_index:
                raise _Crash(f"crash at call {crash_index} ({name})")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, crashing)

    for owner, name in ((os, "replace"), (os, "rename"), (os, "fsync"), (shutil, "rmtree")):
        wrap(owner, name)
    return calls


def _assert_whole(folder: Path, allowed_groups_done: set[int]) -> None:
    state, torch_state = load_training_state(folder)
    assert state.groups_done in allowed_groups_done
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    assert set(torch_state) >= {"optimizer", "scheduler", "rng"}


@pytest.mark.parametrize("step", [4, 6], ids=["rewrite-latest-step", "new-step"])
def test_a_crash_at_any_point_of_a_save_leaves_a_whole_latest(
    tmp_path: Path, tiny, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    model, processor = tiny
    optimizer, scheduler = trained_optimizer(model)
    before = tmp_path / "before"
    for done, at_step in ((1, 2), (2, 4)):
        save_checkpoint(before, model, processor, optimizer, scheduler,
                        TrainingState(run_id="r", step=at_step, base_model_path="/base", groups_done=done), keep=2)
    crash_index, crashed = 0, True
    while crashed:
        run_dir = tmp_path / f"crash-{crash_index}"
        shutil.copytree(before, run_dir)
        with monkeypatch.context() as patch:
            calls = _crash_at(patch, crash_index)
            try:
                save_checkpoint(run_dir, model, processor, optimizer, scheduler,
                                TrainingState(run_id="r", step=step, base_model_path="/base", groups_done=3), keep=2)
                crashed = False
            except _Crash:
                pass
        where = f"crash at call {crash_index} of {calls}"
        latest = latest_checkpoint(run_dir)
        assert latest is not None, where
        _assert_whole(latest, {2, 3} if crashed else {3})
        # The next save after the crash succeeds and becomes the latest.
        save_checkpoint(run_dir, model, processor, optimizer, scheduler,
                        TrainingState(run_id="r", step=step, base_model_path="/base", groups_done=4), keep=2)
        _assert_whole(latest_checkpoint(run_dir), {4})
        assert [p.name for p in checkpoints_dir(run_dir).iterdir() if p.name.startswith(".")] == [], where
        crash_index += 1
    assert crash_index > 3, calls  # the loop did reach past the renames

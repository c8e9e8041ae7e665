"""Atomic checkpoints: an HF folder (save_pretrained) plus everything needed to resume bit-identically.

Layout of `<run_dir>/checkpoints/step-00000010/`:
  config.json, model.safetensors, processor/tokenizer files  (transformers and vLLM load the folder)
  trainer_state.json   step, policy version, dataset position, trained group ids (TrainingState)
  optimizer.pt         optimizer + LR scheduler state and the torch/numpy/python RNG states

A checkpoint is written into a `.tmp` sibling, fsynced, then renamed into place, and `<run_dir>/checkpoints/
latest` is replaced atomically last: a crash at any point leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from learner.feeder import FeederPosition

STATE_FILE = "trainer_state.json"
TORCH_STATE_FILE = "optimizer.pt"
LATEST_FILE = "latest"


class TrainingState(BaseModel):
    """The scalar part of a checkpoint (JSON)."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="Identity of this run across resumes (namespaces task dedup keys).")
    step: int = Field(0, ge=0, description="Optimizer steps taken.")
    policy_version: int = Field(0, ge=0, description="Latest published weight version.")
    base_model_path: str = Field(description="The model the run started from (the frozen KL reference).")
    feeder: FeederPosition = Field(default_factory=FeederPosition)
    groups_done: int = Field(0, ge=0, description="Groups trained or dropped as stale.")
    groups_trained: int = Field(0, ge=0, description="Groups trained on.")
    trained_groups: dict[str, int] = Field(
        default_factory=dict,
        description="Group id -> its policy version, for the groups trained within the staleness bound (dedup).",
    )


def checkpoints_dir(run_dir: Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(run_dir) / "checkpoints"


def rng_states() -> dict[str, Any]:
    """The RNG states of python, numpy and torch (CPU and, when present, CUDA)."""
    states: dict[str, Any] = {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back RNG states saved by rng_states."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    with staging.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def save_checkpoint(
    run_dir: Path, model: torch.nn.Module, processor: Any, optimizer: torch.optim.Optimizer,
    scheduler: Any, state: TrainingState, keep: int = 2,
) -> Path:
    """Write the checkpoint of `state.step` atomically, point `latest` at it, keep the newest `keep`."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{state.step:08d}"
    staging = root / f".tmp-{target.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    model.save_pretrained(staging)
    if processor is not None:
        processor.save_pretrained(staging)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states()},
        staging / TORCH_STATE_FILE,
    )
    (staging / STATE_FILE).write_text(state.model_dump_json(indent=1) + "\n", encoding="utf-8")
    _fsync_tree(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    _write_atomic(root / LATEST_FILE, target.name + "\n")
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder `latest` names, or None when the run has no checkpoint yet."""
    pointer = checkpoints_dir(run_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    folder = checkpoints_dir(run_dir) / pointer.read_text(encoding="utf-8").strip()
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which has no {STATE_FILE}")
    return folder


def load_training_state(folder: Path) -> tuple[TrainingState, dict[str, Any]]:
    """The TrainingState and the torch state (optimizer, scheduler, rng) of one checkpoint folder."""
    state = TrainingState.model_validate(json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8")))
    # weights_only=False: the file holds numpy/python RNG tuples, and it is this run's own output.
    torch_state = torch.load(Path(folder) / TORCH_STATE_FILE, map_location="cpu", weights_only=False)
    return state, torch_state

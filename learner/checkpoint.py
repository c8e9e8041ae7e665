"""Atomic checkpoints: an HF folder (save_pretrained) plus everything needed to resume bit-identically.

Layout of `<run_dir>/checkpoints/step-00000010/`:
  config.json, model.safetensors, processor/tokenizer files  (transformers and vLLM load the folder; a sharded
                       run writes them in its last checkpoint only)
  distributed/         a sharded run's model and optimizer tensors (torch distributed checkpoint, one file per
                       rank; loads on any number of ranks, `learner.sharding`); its one pickle, .metadata, is
                       read by an unpickler that refuses every global but DCP's own dataclasses and torch types
  trainer_state.json   step, policy version, dataset position, trained group ids (TrainingState)
  optimizer.pt         optimizer (sharded: its param_groups only) + LR scheduler state_dicts and the torch RNG
                       states: tensors and plain containers only, read back with torch.load(weights_only=True)
  rng_state.json       the python and numpy RNG states

Nothing here is unpickled: /runs is shared with other containers, and a planted pickle would run in the
learner on resume. weights_only=True refuses every global outside torch's allow-list.

A checkpoint is written into a `.tmp-` sibling and fsynced. Re-writing a step moves the old folder aside
(`.old-`) before the new one is renamed into place, and `latest` is replaced atomically last; every rename is
followed by an fsync of the folder that holds it. A crash at any point leaves `latest` naming a whole
checkpoint (under its own name, or still aside), and the next save tidies what the crash left.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from learner.feeder import FeederPosition

STATE_FILE = "trainer_state.json"
TORCH_STATE_FILE = "optimizer.pt"
RNG_FILE = "rng_state.json"
LATEST_FILE = "latest"
STAGING_PREFIX = ".tmp-"
ASIDE_PREFIX = ".old-"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than tensors and plain containers; it is not loaded."""


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


class HostRngState(BaseModel):
    """The python and numpy RNG states as JSON (rng_state.json)."""

    model_config = ConfigDict(extra="forbid")

    python: tuple[int, list[int], float | None] = Field(description="random.getstate(): version, state, gauss.")
    numpy: tuple[str, list[int], int, int, float] = Field(
        description="np.random.get_state(): name, keys, pos, has_gauss, cached_gaussian."
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
    """Put back RNG states saved by rng_states (as returned, or as read back from a checkpoint)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))  # JSON gives lists; setstate wants tuples
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _host_rng_json(states: dict[str, Any]) -> str:
    version, internal, gauss = states["python"]
    name, keys, pos, has_gauss, cached = states["numpy"]
    host = HostRngState(python=(version, list(internal), gauss),
                        numpy=(name, [int(key) for key in keys], int(pos), int(has_gauss), float(cached)))
    return host.model_dump_json() + "\n"


def _fsync_dir(folder: Path) -> None:
    """Make the folder's entries (renames, new files) durable, not only the files' bytes."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_dir():
            _fsync_tree(path)
        elif path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    with staging.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)
    _fsync_dir(path.parent)


def _tidy_after_crash(root: Path) -> None:
    """Finish what a crashed save left: drop half-written staging folders, and for a folder moved aside,
    put it back if its replacement never arrived (then `latest` names it again) or drop it if it did."""
    for staging in root.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(staging)
    for aside in root.glob(f"{ASIDE_PREFIX}*"):
        original = root / aside.name.removeprefix(ASIDE_PREFIX)
        if original.exists():
            shutil.rmtree(aside)
        else:
            os.rename(aside, original)
            _fsync_dir(root)


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename a complete, fsynced staging folder to target; an existing target is moved aside first and
    removed only after the new one is in place, so some whole copy always exists under a known name."""
    root = target.parent
    aside = root / f"{ASIDE_PREFIX}{target.name}"
    if target.exists():
        os.rename(target, aside)
        _fsync_dir(root)
    os.rename(staging, target)
    _fsync_dir(root)
    if aside.exists():
        shutil.rmtree(aside)


def save_checkpoint(
    run_dir: Path, model: torch.nn.Module, processor: Any, optimizer: torch.optim.Optimizer,
    scheduler: Any, state: TrainingState, keep: int = 2, *, rank: int = 0, world_size: int = 1,
    hf_weights: bool = True,
) -> Path:
    """Write the checkpoint of `state.step` atomically, point `latest` at it, keep the newest `keep`.

    world_size > 1 (a sharded policy): every rank calls this; the model and optimizer go to a DCP folder
    (`distributed/`, each rank its shards) and rank 0 writes the rest. hf_weights: also gather the full weights
    into the folder's save_pretrained files (always with one rank; sharded, the run's last checkpoint).
    """
    root = checkpoints_dir(run_dir)
    target = root / f"step-{state.step:08d}"
    staging = root / f"{STAGING_PREFIX}{target.name}"
    optimizer_state: dict[str, Any]
    full_weights = None
    if world_size > 1:
        import torch.distributed as dist

        from learner.sharding import SHARDED_DIR, full_state_dict, save_sharded

        if rank == 0:
            _start_staging(root, staging)
        dist.barrier()  # the staging folder exists before any rank writes into it
        optimizer_state = {"param_groups": save_sharded(staging / SHARDED_DIR, model, optimizer)}
        full_weights = full_state_dict(model) if hf_weights else None
        if rank != 0:
            dist.barrier()  # returns once rank 0 has put the checkpoint in place
            return target
    else:
        _start_staging(root, staging)
        optimizer_state = optimizer.state_dict()
    if hf_weights:
        model.save_pretrained(staging, state_dict=full_weights)
    if processor is not None:
        processor.save_pretrained(staging)
    rng = rng_states()
    torch_rng = {key: rng[key] for key in ("torch", "cuda") if key in rng}
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": torch_rng},
               staging / TORCH_STATE_FILE)
    (staging / RNG_FILE).write_text(_host_rng_json(rng), encoding="utf-8")
    (staging / STATE_FILE).write_text(state.model_dump_json(indent=1) + "\n", encoding="utf-8")
    _fsync_tree(staging)
    _move_into_place(staging, target)
    _write_atomic(root / LATEST_FILE, target.name + "\n")
    # The folder `latest` names is never pruned, even when a crashed run left a newer step behind.
    others = [folder for folder in sorted(root.glob("step-*")) if folder != target]
    for old in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    return target


def _start_staging(root: Path, staging: Path) -> None:
    """Tidy what a crashed save left and create the (empty) staging folder."""
    root.mkdir(parents=True, exist_ok=True)
    _tidy_after_crash(root)
    staging.mkdir()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The whole checkpoint `latest` names (still aside, if a save crashed mid-swap), or None before the first."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    for folder in (root / name, root / f"{ASIDE_PREFIX}{name}"):
        if (folder / STATE_FILE).is_file():
            return folder
    raise FileNotFoundError(f"{pointer} names {name}, which has no {STATE_FILE}")


def load_training_state(folder: Path) -> tuple[TrainingState, dict[str, Any]]:
    """The TrainingState and the torch state (optimizer, scheduler, rng) of one checkpoint folder."""
    folder = Path(folder)
    state = TrainingState.model_validate(json.loads((folder / STATE_FILE).read_text(encoding="utf-8")))
    host_rng = HostRngState.model_validate_json((folder / RNG_FILE).read_text(encoding="utf-8"))
    try:
        torch_state = torch.load(folder / TORCH_STATE_FILE, map_location="cpu", weights_only=True)
    except UnpicklingError as error:  # weights_only refused a global: the file would have run code
        raise UnsafeCheckpointError(
            f"{folder / TORCH_STATE_FILE} holds more than tensors and plain containers (planted, or written "
            f"before checkpoints stopped pickling); refusing to load it: {error}"
        ) from error
    torch_state["rng"] = {**torch_state["rng"], "python": host_rng.python, "numpy": host_rng.numpy}
    return state, torch_state

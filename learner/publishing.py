"""Publish the policy as weight version N: save_pretrained, hash + atomic copy, announce on Redis, prune old."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import torch

from services.schemas import WeightVersion
from services.weights import announce_weights, publish_weights_folder


@dataclass(frozen=True)
class PublishTimings:
    """Where the time of one publish went (seconds)."""

    save_s: float
    copy_and_hash_s: float
    announce_s: float

    @property
    def total_s(self) -> float:
        """Whole publish, save to announcement."""
        return self.save_s + self.copy_and_hash_s + self.announce_s


def publish_policy(
    model: torch.nn.Module, processor: Any, *, staging: Path, weights_root: Path, version: int, learner_step: int,
    client: redis.Redis | None, run_name: str, keep_versions: int = 3, dtype: torch.dtype | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> tuple[WeightVersion, PublishTimings]:
    """Save the model (+ processor files, so vLLM loads the folder) as version `version` and announce it.

    dtype: what the published tensors are cast to (the checkpoint's own dtype when the learner trains fp32
    master weights for a bf16 checkpoint); None keeps the model's. state_dict: a snapshot to save instead of
    the model's live tensors (``weights_snapshot``), so training can go on while this runs on another thread.
    """
    started = time.perf_counter()
    shutil.rmtree(staging, ignore_errors=True)
    if state_dict is None and dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        state_dict = weights_snapshot(model, dtype)
    if state_dict is not None:
        state_dict = {name: tensor.cpu() for name, tensor in state_dict.items()}  # safetensors writes host memory
    model.save_pretrained(staging, state_dict=state_dict)
    if dtype is not None and state_dict is not None:  # save_pretrained writes the model's own dtype
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        name = str(dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:  # older transformers wrote this key
            config["torch_dtype"] = name
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    if processor is not None:
        processor.save_pretrained(staging)
    saved = time.perf_counter()
    weight_version = publish_weights_folder(staging, weights_root, version, learner_step)
    copied = time.perf_counter()
    if client is not None:
        announce_weights(client, run_name, weight_version)
    announced = time.perf_counter()
    shutil.rmtree(staging, ignore_errors=True)
    prune_versions(weights_root, keep_versions)
    return weight_version, PublishTimings(saved - started, copied - saved, announced - copied)


def prune_versions(weights_root: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` version folders; returns what was removed."""
    versions = sorted(path for path in Path(weights_root).glob("v*") if path.is_dir() and path.name[1:].isdigit())
    removed = versions[:-keep] if keep > 0 else versions
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def weights_snapshot(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A copy of the model's state dict on its own device (floating tensors cast to dtype): the one extra copy a
    publish makes, taken in one fast device copy so the step can go on while the copy is written out."""
    return {name: tensor.detach().to(dtype=dtype if dtype is not None and tensor.is_floating_point()
                                     else tensor.dtype, copy=True)
            for name, tensor in model.state_dict().items()}


class BackgroundPublisher:
    """Runs publishes on one background thread, in order, at most one at a time.

    The learner's step hands over a snapshot and goes on; it waits only when the previous publish is still
    running (so versions never reorder and at most one snapshot is held). A publish that failed raises on the
    next ``submit`` or ``wait``, so a broken publish path stops the run instead of going unnoticed.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish")
        self._pending: Future | None = None

    def submit(self, publish: Callable[[], Any]) -> float:
        """Wait for the previous publish (re-raising its error), start this one; returns the seconds waited."""
        waited = self.wait()[1]
        self._pending = self._executor.submit(publish)
        return waited

    def wait(self) -> tuple[Any, float]:
        """Block until the running publish (if any) is done; returns its result and the seconds waited."""
        started = time.perf_counter()
        pending, self._pending = self._pending, None
        result = pending.result() if pending is not None else None
        return result, time.perf_counter() - started

    def close(self) -> None:
        """Finish the running publish and stop the thread."""
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

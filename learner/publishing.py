"""Publish the policy as weight version N: one hashed pass into <weights_root>/v<N>, announce on Redis, prune.

The tensors go straight from the snapshot into the version's safetensors blob, hashed chunk by chunk as they
are written (services.weights.stream); there is no save_pretrained staging folder and no second read. With
learner.weights_root on a tmpfs (/dev/shm) the bytes move once through memory.
"""

from __future__ import annotations

import copy
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
from services.weights import announce_weights, write_weights_version
from services.weights.hf import checkpoint_tensors
from services.weights.stream import keep_spare_blob


@dataclass(frozen=True)
class PublishTimings:
    """Where the time of one publish went (seconds)."""

    write_s: float
    announce_s: float

    @property
    def total_s(self) -> float:
        """Whole publish, first byte written to announcement."""
        return self.write_s + self.announce_s


def _config_writer(model: torch.nn.Module, processor: Any, dtype: torch.dtype) -> Callable[[Path], None]:
    """Writes config.json (with the published dtype), generation_config.json and the processor files."""
    config = copy.deepcopy(model.config)  # the live model's config is left as it is
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__.removeprefix("FSDP")]  # fully_shard renames the class

    def write(folder: Path) -> None:
        config.save_pretrained(folder)
        if model.can_generate():
            model.generation_config.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
    return write


def publish_policy(
    model: torch.nn.Module, processor: Any, *, weights_root: Path, version: int, learner_step: int,
    client: redis.Redis | None, run_name: str, keep_versions: int = 3, dtype: torch.dtype | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> tuple[WeightVersion, PublishTimings]:
    """Write the model (+ config and processor files, so vLLM loads the folder) as version `version`, announce it.

    dtype: what the published tensors are cast to (the checkpoint's own dtype when the learner trains fp32
    master weights for a bf16 checkpoint); None keeps the model's. state_dict: a snapshot to write instead of
    the model's live tensors (``weights_snapshot``), so training can go on while this runs on another thread;
    its tensors may sit on the GPU (each is brought to host memory as it is written).
    """
    started = time.perf_counter()
    if state_dict is None and dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        state_dict = weights_snapshot(model, dtype)
    tensors = checkpoint_tensors(model, state_dict if state_dict is not None else model.state_dict())
    published_dtype = dtype or next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    weight_version = write_weights_version(tensors, weights_root, version, learner_step=learner_step,
                                           write_config=_config_writer(model, processor, published_dtype))
    written = time.perf_counter()
    if client is not None:
        announce_weights(client, run_name, weight_version)
    announced = time.perf_counter()
    prune_versions(weights_root, keep_versions)
    return weight_version, PublishTimings(written - started, announced - written)


def prune_versions(weights_root: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` version folders; returns what was removed. The newest removed version's
    blob stays as the root's spare when no worker links it, so the next publish writes into its pages."""
    versions = sorted(path for path in Path(weights_root).glob("v*") if path.is_dir() and path.name[1:].isdigit())
    removed = versions[:-keep] if keep > 0 else versions
    if removed:
        keep_spare_blob(removed[-1])
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

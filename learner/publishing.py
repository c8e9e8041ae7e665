"""Publish the policy as weight version N: save_pretrained, hash + atomic copy, announce on Redis, prune old."""

from __future__ import annotations

import json
import shutil
import time
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
) -> tuple[WeightVersion, PublishTimings]:
    """Save the model (+ processor files, so vLLM loads the folder) as version `version` and announce it.

    dtype: what the published tensors are cast to (the checkpoint's own dtype when the learner trains fp32
    master weights for a bf16 checkpoint); None keeps the model's.
    """
    started = time.perf_counter()
    shutil.rmtree(staging, ignore_errors=True)
    state_dict = None
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        state_dict = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                      for name, tensor in model.state_dict().items()}
    model.save_pretrained(staging, state_dict=state_dict)
    if state_dict is not None:  # save_pretrained writes the model's own dtype; say what the files hold
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = str(dtype).removeprefix("torch.")
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

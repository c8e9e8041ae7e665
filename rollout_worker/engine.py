"""What the worker needs from a generation engine; the vLLM implementation lives in rollout_worker.vllm_engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from services.schemas import Rollout, RolloutRequest


class TaskInputError(ValueError):
    """A task's own input (image, keep set, prompt) cannot be run; it is dead-lettered, the batch goes on."""


@dataclass(frozen=True)
class PreparedRollout:
    """A rollout request with its image already opened (the worker validates paths before the engine)."""

    request: RolloutRequest
    image: Image.Image


class RolloutEngine(Protocol):
    """Scores visual tokens, applies each request's budget and generates, all under one policy version."""

    def generate(self, prepared: Sequence[PreparedRollout], policy_version: int) -> list[Rollout]:
        """One Rollout per prepared request, in order; raises TaskInputError naming a bad task."""
        ...

    def load_weights(self, folder: Path) -> None:
        """Swap in the weights of a verified HF folder, for both the scorer and the generator."""
        ...

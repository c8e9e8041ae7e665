"""The SFT recipes' learning-rate schedule: pure arithmetic, no optimizer."""

from __future__ import annotations

import math


def warmup_cosine(step: int, peak: float, warmup_steps: int, steps: int) -> float:
    """Learning rate of 0-based ``step``: linear warm-up to ``peak``, then cosine decay to 5% of it at ``steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

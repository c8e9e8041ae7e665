"""The efficiency reward: the share of visual tokens the rollout pruned away."""

from __future__ import annotations


class TokenCountError(ValueError):
    """Visual-token counts that no rollout can have (kept > total, negative, NaN, total < 1)."""


def efficiency_reward(visual_tokens_kept: int, visual_tokens_total: int) -> float:
    """Achieved reduction ratio 1 - kept/total, in [0, 1]; raise TokenCountError on impossible counts."""
    # Written so that NaN fails every comparison and lands in the error branch.
    if not (visual_tokens_total >= 1 and 0 <= visual_tokens_kept <= visual_tokens_total):
        raise TokenCountError(
            f"visual token counts kept={visual_tokens_kept}, total={visual_tokens_total} must satisfy "
            "0 <= kept <= total and total >= 1"
        )
    return 1.0 - visual_tokens_kept / visual_tokens_total

"""Pure evaluation math for `sf-eval`: budget strings, the Wilson interval and per-budget summaries.

No torch, no vLLM: everything here takes plain numbers, so it is tested directly.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from services.schemas.models import Budget

_BUDGET_KINDS = {"r": "keep_ratio", "tau": "mass_threshold"}
Z_95 = 1.959963984540054  # two-sided 95% normal quantile


class BudgetParseError(ValueError):
    """A budget string that is not `r=<ratio>` or `tau=<mass>` with a value in (0, 1]."""


def parse_budget(text: str) -> Budget:
    """'r=0.25' -> keep_ratio 0.25, 'tau=0.975' -> mass_threshold 0.975; the error names the bad string."""
    name, sep, raw = text.strip().partition("=")
    kind = _BUDGET_KINDS.get(name.strip().lower())
    if not sep or kind is None:
        raise BudgetParseError(f"budget {text!r} must look like r=<keep ratio> or tau=<mass threshold>")
    try:
        value = float(raw)
    except ValueError:
        raise BudgetParseError(f"budget {text!r}: {raw.strip()!r} is not a number") from None
    try:
        return Budget(kind=kind, value=value)
    except ValidationError:
        raise BudgetParseError(f"budget {text!r}: the value must lie in (0, 1], got {value!r}") from None


def parse_budgets(text: str) -> list[Budget]:
    """A comma-separated budget list, in the given order; refuses an empty list and repeats."""
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise BudgetParseError(f"budget list {text!r} is empty; e.g. r=1,r=0.5,tau=0.975")
    budgets = [parse_budget(part) for part in parts]
    labels = [budget.label for budget in budgets]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise BudgetParseError(f"budget list {text!r} repeats {', '.join(repeated)}")
    return budgets


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); stays inside [0, 1]."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must lie in [0, {trials}], got {successes}")
    p = successes / trials
    z2 = z * z
    denominator = 1.0 + z2 / trials
    center = (p + z2 / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    # At p = 0 (or 1) the bound is exactly 0 (or 1); float cancellation would leave it a hair off.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == trials else min(1.0, center + half)
    return low, high


def mean_interval(scores: Sequence[float], z: float = Z_95) -> tuple[float, float]:
    """95% CI of a mean credit: Wilson when every score is 0 or 1, else the normal interval clipped to [0, 1]."""
    if not scores:
        raise ValueError("no scores to take the interval of")
    if all(score in (0.0, 1.0) for score in scores):
        return wilson_interval(round(sum(scores)), len(scores), z)
    mean = statistics.fmean(scores)
    half = z * statistics.pstdev(scores) / math.sqrt(len(scores))
    return max(0.0, mean - half), min(1.0, mean + half)


@dataclass(frozen=True)
class ItemOutcome:
    """One (item, budget) result: correctness, how much was pruned, and the tokens the request held."""

    correct: bool
    visual_tokens_kept: int
    visual_tokens_total: int
    engine_prompt_tokens: int  # the prompt as vLLM ran it: kept placeholders + text
    completion_tokens: int
    score: float | None = None  # the checker's credit where it grades ('vqa'); None: 1 when correct, else 0

    @property
    def credit(self) -> float:
        """The item's credit in [0, 1]: its graded score, else 1 when correct and 0 when not."""
        if self.score is not None:
            return self.score
        return 1.0 if self.correct else 0.0

    @property
    def reduction_ratio(self) -> float:
        """Share of visual tokens pruned away: 1 - kept/total."""
        return 1.0 - self.visual_tokens_kept / self.visual_tokens_total

    @property
    def kv_entries(self) -> int:
        """Token positions the request's KV cache holds: prompt as run plus completion."""
        return self.engine_prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class BatchTiming:
    """Wall times of one budget's batch run max_tokens=1 (prefill) and full length (medians of repeats)."""

    requests: int
    prefill_s: float
    full_s: float
    full_completion_tokens: int  # all completion tokens of one full-length run
    repeats: int = 1


def decode_tokens_per_s(timing: BatchTiming) -> float | None:
    """Tokens generated after the first per second of extra time over the prefill-only run.

    None when the difference is not measurable (no token after the first, or no extra time).
    """
    extra_tokens = timing.full_completion_tokens - timing.requests
    extra_s = timing.full_s - timing.prefill_s
    if extra_tokens <= 0 or extra_s <= 0:
        return None
    return extra_tokens / extra_s


def summarize_budget(
    budget: Budget, outcomes: Sequence[ItemOutcome], timing: BatchTiming | None = None
) -> dict[str, object]:
    """One table row: accuracy (mean credit) with its 95% CI (mean_interval), reduction mean/std/min/max, KV entries, speed."""
    if not outcomes:
        raise ValueError(f"budget {budget.label} has no outcomes to summarize")
    correct = sum(outcome.correct for outcome in outcomes)
    credits = [outcome.credit for outcome in outcomes]
    reductions = [outcome.reduction_ratio for outcome in outcomes]
    low, high = mean_interval(credits)
    row: dict[str, object] = {
        "budget": budget.label,
        "kind": budget.kind,
        "value": budget.value,
        "items": len(outcomes),
        "correct": correct,  # full credit
        "accuracy": statistics.fmean(credits),  # correct / items, or the mean graded credit ('vqa')
        "accuracy_ci95": [low, high],
        "reduction_mean": statistics.fmean(reductions),
        "reduction_std": statistics.pstdev(reductions),
        "reduction_min": min(reductions),
        "reduction_max": max(reductions),
        "visual_tokens_kept_mean": statistics.fmean(o.visual_tokens_kept for o in outcomes),
        "kv_entries_mean": statistics.fmean(o.kv_entries for o in outcomes),
        "completion_tokens_mean": statistics.fmean(o.completion_tokens for o in outcomes),
        "speed": None,
    }
    if timing is not None:
        row["speed"] = {
            "requests": timing.requests,
            "repeats": timing.repeats,
            "prefill_batch_s": timing.prefill_s,
            "prefill_ms_per_request": 1000.0 * timing.prefill_s / timing.requests,
            "full_batch_s": timing.full_s,
            "decode_tokens_per_s": decode_tokens_per_s(timing),
        }
    return row

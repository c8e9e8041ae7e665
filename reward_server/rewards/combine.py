"""The combined reward r = w_acc*acc + lambda*eff*credit + mu*format, with every component kept.

credit is the best accuracy in the rollout's group (efficiency_gate 'group', the paper's gate and the default: C = 1
when any rollout is correct) or the answer's own accuracy ('rollout': pruning never pays for being wrong).
"""

from __future__ import annotations

from collections.abc import Sequence

from reward_server.rewards.checkers import InvalidReferenceError, check_answer
from reward_server.rewards.efficiency import TokenCountError, efficiency_reward
from reward_server.rewards.formats import FormatPatternError, format_reward
from services.schemas.models import MAX_ANSWER_CHARS, RewardBreakdown, ScoreItem
from services.settings.models import RewardSettings


class ItemError(ValueError):
    """One item of a batch cannot be scored; `index` and `field` say which and where."""

    def __init__(self, index: int, field: str, message: str) -> None:
        super().__init__(f"items.{index}.{field}: {message}")
        self.index = index
        self.field = field
        self.message = message


def combine_reward(
    accuracy: float, efficiency: float, format_score: float, weights: RewardSettings,
    efficiency_credit: float | None = None,
) -> float:
    """Total reward; the efficiency reward is scaled by efficiency_credit, by default the answer's own credit (a
    bool counts as 0 or 1), so a wrong answer earns none of it and pruning never pays for being wrong."""
    accuracy = float(accuracy)
    credit = accuracy if efficiency_credit is None else float(efficiency_credit)
    return (
        weights.accuracy_weight * accuracy
        + weights.efficiency_weight * efficiency * credit
        + weights.format_weight * format_score
    )


def efficiency_credits(accuracies: Sequence[float], groups: Sequence[str | None], gate: str) -> list[float]:
    """Each item's efficiency credit: its own accuracy ('rollout'), or the best accuracy among the items of its
    group ('group'; an item without a group is a group of its own)."""
    if gate == "rollout":
        return [float(accuracy) for accuracy in accuracies]
    best: dict[str, float] = {}
    for accuracy, group in zip(accuracies, groups, strict=True):
        if group is not None:
            best[group] = max(best.get(group, 0.0), float(accuracy))
    return [float(accuracy) if group is None else best[group] for accuracy, group in zip(accuracies, groups)]


def score_item(item: ScoreItem, weights: RewardSettings) -> RewardBreakdown:
    """Score one rollout on its own (efficiency credit: its own answer): check the answer, measure its reduction
    ratio and format, and combine them."""
    check = check_answer(
        item.completion_text,
        item.answer,
        item.answer_type,
        item.choices,
        weights.number_rel_tolerance,
        weights.number_abs_tolerance,
        item.answers,
    )
    efficiency = efficiency_reward(item.visual_tokens_kept, item.visual_tokens_total)
    format_score = format_reward(item.completion_text, item.required_format, weights.format_timeout_s)
    return RewardBreakdown(
        correct=check.correct,
        accuracy=check.score,
        efficiency=efficiency,
        format=format_score,
        total=combine_reward(check.score, efficiency, format_score, weights),
        parsed_answer=None if check.parsed_answer is None else check.parsed_answer[:MAX_ANSWER_CHARS],
    )


def score_items(items: Sequence[ScoreItem], weights: RewardSettings) -> list[RewardBreakdown]:
    """Score a batch in order (under efficiency_gate 'group', items sharing ScoreItem.group share their best
    credit); raise ItemError naming the first item and field that cannot be scored."""
    results = []
    for index, item in enumerate(items):
        try:
            results.append(score_item(item, weights))
        except InvalidReferenceError as error:
            raise ItemError(index, error.field, str(error)) from error
        except FormatPatternError as error:
            raise ItemError(index, "required_format", str(error)) from error
        except TokenCountError as error:  # reachable only when ScoreItem validation was bypassed
            raise ItemError(index, "visual_tokens_kept", str(error)) from error
    if weights.efficiency_gate == "rollout":
        return results
    credits = efficiency_credits([result.accuracy for result in results], [item.group for item in items],
                                 weights.efficiency_gate)
    return [
        result.model_copy(update={"total": combine_reward(result.accuracy, result.efficiency, result.format,
                                                          weights, credit)})
        for result, credit in zip(results, credits)
    ]

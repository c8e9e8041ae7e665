"""The one judge of every evaluation: a completion against its task's reference, by the reward server's checkers.

sf-eval, the base model's eval report (learner/base_eval.py), the SFT recipe's progress evaluations and
bench/fidelity.py all judge through `judge`, so "3.0" against "3" or "(B)" against "B" counts the same
everywhere, and the same as the reward the RL trains on (reward_server.rewards.check_answer).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import regex

from learner.eval_metrics import wilson_interval
from services.data.loader import DatasetItem
from services.data.scenes import COLOURS, SHAPES
from services.settings.models import RewardSettings

if TYPE_CHECKING:
    from reward_server.rewards import CheckResult

_DEFAULT_REWARDS = RewardSettings()


class EvaluationError(RuntimeError):
    """An evaluation that cannot go on (e.g. a task whose reference answer cannot be checked)."""


def judge_item(
    item: DatasetItem, completion: str, rel_tol: float = _DEFAULT_REWARDS.number_rel_tolerance,
    abs_tol: float = _DEFAULT_REWARDS.number_abs_tolerance,
) -> CheckResult:
    """The reward server checker's verdict: correct, what it read, and the credit in [0, 1] (`.score`;
    fractional for answer_type 'vqa', whose human answers it passes on)."""
    from reward_server.rewards import InvalidReferenceError, check_answer

    task = item.task
    try:
        return check_answer(completion, task.answer, task.answer_type, task.choices, rel_tol, abs_tol, task.answers)
    except InvalidReferenceError as error:
        raise EvaluationError(f"task {task.id}: {error.field}: {error}") from error


def judge(
    item: DatasetItem, completion: str, rel_tol: float = _DEFAULT_REWARDS.number_rel_tolerance,
    abs_tol: float = _DEFAULT_REWARDS.number_abs_tolerance,
) -> tuple[bool, str | None]:
    """Whether a completion answers the item correctly, by the reward server's checker; and what it read."""
    result = judge_item(item, completion, rel_tol, abs_tol)
    return result.correct, result.parsed_answer


_VARIABLE_WORDS = regex.compile(r"\b(" + "|".join([*COLOURS, *SHAPES]) + r")s?\b|\b\d+\b")


def question_kind(item: DatasetItem) -> str:
    """The question's template, for per-kind accuracy: colour, shape and number words become '…'."""
    return _VARIABLE_WORDS.sub("…", item.task.question)


def judged_summary(
    items: Sequence[DatasetItem], completions: Sequence[str], rel_tol: float = _DEFAULT_REWARDS.number_rel_tolerance,
    abs_tol: float = _DEFAULT_REWARDS.number_abs_tolerance, max_mistakes: int = 10,
) -> dict[str, Any]:
    """Accuracy (Wilson 95% CI) of completions judged against their items, overall and per question kind,
    with the first mistakes."""
    if len(items) != len(completions) or not items:
        raise ValueError(f"need one completion per item and at least one item, got {len(completions)} for {len(items)}")
    by_kind: dict[str, list[bool]] = defaultdict(list)
    mistakes: list[dict[str, str | None]] = []
    for item, completion in zip(items, completions, strict=True):
        correct, parsed = judge(item, completion, rel_tol, abs_tol)
        by_kind[question_kind(item)].append(correct)
        if not correct and len(mistakes) < max_mistakes:
            mistakes.append({"id": item.task.id, "expected": item.task.answer, "got": completion, "parsed": parsed})
    flat = [correct for values in by_kind.values() for correct in values]
    return {
        "items": len(flat), "correct": sum(flat), "accuracy": sum(flat) / len(flat),
        "accuracy_ci95": list(wilson_interval(sum(flat), len(flat))),
        "by_kind": {kind: sum(values) / len(values) for kind, values in sorted(by_kind.items())},
        "mistakes": mistakes,
    }

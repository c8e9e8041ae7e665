"""Efficiency, format and combined rewards, and batch scoring with per-item errors."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reward_server.rewards import (
    FormatPatternError,
    ItemError,
    combine_reward,
    efficiency_reward,
    format_reward,
    score_item,
    score_items,
)
from reward_server.rewards.formats import expansion_bound
from services.schemas.models import AnswerType, ScoreItem
from services.settings.models import RewardSettings


@given(st.integers(min_value=1, max_value=10**6), st.data())
def test_efficiency_is_the_reduction_ratio_in_unit_interval(total: int, data: st.DataObject) -> None:
    kept = data.draw(st.integers(min_value=0, max_value=total))
    value = efficiency_reward(kept, total)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(1 - kept / total)


@pytest.mark.parametrize(("kept", "total"), [(5, 4), (-1, 4), (0, 0), (math.nan, 4), (1, math.nan)])
def test_efficiency_refuses_impossible_counts(kept: float, total: float) -> None:
    with pytest.raises(ValueError, match="kept="):
        efficiency_reward(kept, total)  # type: ignore[arg-type]


@given(st.booleans(), st.floats(0, 1), st.floats(0, 1), st.floats(0, 5), st.floats(0, 5), st.floats(0, 5))
def test_combined_reward_formula(
    correct: bool, efficiency: float, fmt: float, w_acc: float, lam: float, mu: float
) -> None:
    weights = RewardSettings(accuracy_weight=w_acc, efficiency_weight=lam, format_weight=mu)
    total = combine_reward(correct, efficiency, fmt, weights)
    expected = w_acc * correct + lam * efficiency * correct + mu * fmt
    assert total == pytest.approx(expected)
    if not correct:
        assert total == pytest.approx(mu * fmt)  # a wrong answer earns no efficiency reward


def test_format_reward() -> None:
    pattern = r"^<think>.*</think>\s*<answer>.*</answer>$"
    assert format_reward("<think>hm</think> <answer>B</answer>", pattern, 0.05) == 1.0
    assert format_reward("B", pattern, 0.05) == 0.0
    assert format_reward("anything", None, 0.05) == 0.0
    with pytest.raises(FormatPatternError, match="not a valid regular expression"):
        format_reward("x", "(unclosed", 0.05)


def test_catastrophic_format_pattern_times_out() -> None:
    with pytest.raises(FormatPatternError, match="ran longer than"):
        format_reward("x" * 5000, r"(x+x+)+y", 0.01)


@pytest.mark.parametrize(
    ("pattern", "bound"),
    [
        ("abc", 3),
        ("a{3}", 4 * 4),
        ("a{2,5}", 6 * 6),
        ("a{2,}", 5 * 3),
        ("(?:a{10}){10}", 13 * 11 * 11),
        (r"\{ 7 }", 6 * 8),  # counted even where the parser reads a literal: over-counting is the safe side
        ("x{e<=1}", 7),
    ],
)
def test_expansion_bound(pattern: str, bound: int) -> None:
    assert expansion_bound(pattern) == bound


@pytest.mark.parametrize(
    "pattern",
    [
        "a{1000000000}",
        "(?:(?:a{100}){100}){100}",
        "a{99999999999999999999}",
        "\\N{{1000000000}",
        "a{" + "9" * 5000 + "}",
    ],
)
def test_patterns_that_unroll_to_gigabytes_are_refused_before_compiling(pattern: str) -> None:
    with pytest.raises(FormatPatternError, match="too large"):
        format_reward("a", pattern, 0.05)


def _item(**overrides: object) -> ScoreItem:
    fields = {
        "completion_text": "The answer is B.",
        "answer": "B",
        "answer_type": AnswerType.CHOICE,
        "choices": ["red", "blue"],
        "visual_tokens_kept": 16,
        "visual_tokens_total": 64,
    }
    return ScoreItem(**{**fields, **overrides})


def test_score_item_returns_every_component() -> None:
    weights = RewardSettings(efficiency_weight=0.5, format_weight=0.2)
    result = score_item(_item(required_format=r"answer is [A-Z]"), weights)
    assert (result.correct, result.accuracy, result.efficiency, result.format) == (True, 1.0, 0.75, 1.0)
    assert result.total == pytest.approx(1.0 + 0.5 * 0.75 + 0.2)
    assert result.parsed_answer == "B"
    wrong = score_item(_item(completion_text="A"), weights)
    assert (wrong.correct, wrong.efficiency, wrong.total) == (False, 0.75, 0.0)


def test_score_items_names_the_failing_item_and_field() -> None:
    items = [_item(), _item(answer="Z"), _item()]
    with pytest.raises(ItemError) as raised:
        score_items(items, RewardSettings())
    assert (raised.value.index, raised.value.field) == (1, "answer")
    with pytest.raises(ItemError) as raised:
        score_items([_item(required_format="(")], RewardSettings())
    assert (raised.value.index, raised.value.field) == (0, "required_format")


def _yes_no_item(completion: str, kept: int, group: str | None) -> ScoreItem:
    return ScoreItem(completion_text=completion, answer="yes", answer_type=AnswerType.YES_NO,
                     visual_tokens_kept=kept, visual_tokens_total=100, group=group)


def test_group_gate_pays_efficiency_to_wrong_rollouts_of_a_group_with_a_correct_one() -> None:
    assert RewardSettings().efficiency_gate == "group"  # the default since bench/ablation.py measured it better
    weights = RewardSettings(efficiency_weight=0.5)
    items = [_yes_no_item("yes", 50, "g1"), _yes_no_item("no", 20, "g1"),  # g1: one right -> C = 1 for both
             _yes_no_item("no", 20, "g2"), _yes_no_item("no", 10, "g2"),   # g2: none right -> C = 0
             _yes_no_item("no", 20, None)]                                 # no group: its own credit
    totals = [result.total for result in score_items(items, weights)]
    assert totals == pytest.approx([1.0 + 0.5 * 0.5, 0.0 + 0.5 * 0.8, 0.0, 0.0, 0.0])


def test_rollout_gate_pays_efficiency_only_to_correct_answers_whatever_the_group() -> None:
    weights = RewardSettings(efficiency_weight=0.5, efficiency_gate="rollout")
    items = [_yes_no_item("yes", 50, "g1"), _yes_no_item("no", 20, "g1")]
    assert [result.total for result in score_items(items, weights)] == pytest.approx([1.25, 0.0])
    assert [result.total for result in score_items(items, weights)] == [score_item(item, weights).total
                                                                        for item in items]

"""VQA accuracy, ChartQA relaxed accuracy and their fractional rewards, against hand-computed values."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from reward_server.rewards import InvalidReferenceError, check_answer, score_item
from reward_server.rewards.relaxed import relaxed_float, relaxed_match
from reward_server.rewards.vqa import normalize_vqa_answer, vqa_accuracy
from services.schemas.models import AnswerType, ScoreItem, Task
from services.settings.models import RewardSettings

HUMANS = ["coca cola"] * 4 + ["coke"] * 3 + ["pepsi"] * 2 + ["Coca-Cola"]


def _leave_one_out_by_hand(given_answer: str, humans: list[str]) -> float:
    """The official loop, written out: for each human answer, min(1, matches among the others / 3)."""
    prediction = normalize_vqa_answer(given_answer)
    normalized = [normalize_vqa_answer(answer) for answer in humans]
    credits = []
    for left_out in range(len(normalized)):
        others = normalized[:left_out] + normalized[left_out + 1 :]
        credits.append(min(1.0, sum(other == prediction for other in others) / 3))
    return sum(credits) / len(credits)


@pytest.mark.parametrize(("matches", "credit"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_of_ten_answers_by_number_of_matches(matches: int, credit: float) -> None:
    humans = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", humans) == pytest.approx(credit)


def test_partial_credit_through_the_checker() -> None:
    assert check_answer("coke", "coca cola", AnswerType.VQA, answers=HUMANS).score == pytest.approx(0.9)
    assert check_answer("Pepsi.", "coca cola", AnswerType.VQA, answers=HUMANS).score == pytest.approx(0.6)
    full = check_answer("<answer>Coca-Cola</answer>", "coca cola", AnswerType.VQA, answers=HUMANS)
    assert (full.correct, full.score, full.parsed_answer) == (True, 1.0, "coca cola")
    assert not check_answer("coke", "coca cola", AnswerType.VQA, answers=HUMANS).correct


@given(st.lists(st.sampled_from(["cat", "a cat", "dog", "two", "2", "Cat!"]), min_size=2, max_size=12),
       st.sampled_from(["cat", "dog", "2", "bird"]))
def test_closed_form_equals_the_official_loop(humans: list[str], answer: str) -> None:
    assert vqa_accuracy(answer, humans) == pytest.approx(_leave_one_out_by_hand(answer, humans))


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two dogs.", "2 dogs"),
        ("the Nike", "nike"),
        ("yes, it is", "yes it is"),  # a comma before a space is removed
        ("black-and-white", "black and white"),  # a hyphen inside a word becomes a space
        ("1,000 - 2,000", "1000 2000"),  # digit-comma-digit: every mark is removed
        ("3.5", "3.5"),
        ("end.", "end"),
        ("isnt it", "isn't it"),
        ("  None\n", "0"),
        ("what's up?", "what's up"),
    ],
)
def test_vqa_normalisation(raw: str, normalized: str) -> None:
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_without_human_answers_scores_the_reference_alone() -> None:
    one = check_answer("Two.", "2", AnswerType.VQA, answers=["2"])
    assert (one.correct, one.score) == (True, 1.0)
    assert check_answer("3", "2", AnswerType.VQA, answers=["2"]).score == 0.0
    assert check_answer("the Coke", "coke", AnswerType.VQA).score == 1.0  # no answers: the reference
    Task(id="t", image="a.png", question="q?", answer="cat", answer_type="vqa")  # valid without answers
    with pytest.raises(InvalidReferenceError) as raised:
        check_answer("cat", "the", AnswerType.VQA)
    assert raised.value.field == "answer"
    with pytest.raises(ValidationError):
        ScoreItem(completion_text="cat", answer="cat", answer_type="vqa", answers=[""],
                  visual_tokens_kept=1, visual_tokens_total=2)


def test_fractional_reward_scales_the_efficiency_term() -> None:
    weights = RewardSettings(accuracy_weight=1.0, efficiency_weight=0.5, format_weight=0.0)
    item = ScoreItem(completion_text="coke", answer="coca cola", answer_type="vqa", answers=HUMANS,
                     visual_tokens_kept=25, visual_tokens_total=100)
    reward = score_item(item, weights)
    assert (reward.correct, reward.accuracy, reward.efficiency) == (False, pytest.approx(0.9), 0.75)
    assert reward.total == pytest.approx(0.9 + 0.5 * 0.75 * 0.9)


@pytest.mark.parametrize(
    ("text", "value"),
    [("12.5", 12.5), ("1,234", 1234.0), ("-3", -3.0), ("40%", 0.4), ("7.", 7.0), (".5", 0.5),
     ("12 apples", None), ("1,23", None), ("%", None), ("", None), ("abc", None)],
)
def test_relaxed_float_reads_only_a_whole_number(text: str, value: float | None) -> None:
    assert relaxed_float(text) == (None if value is None else pytest.approx(value))


@pytest.mark.parametrize(
    ("given_answer", "reference", "right"),
    [("105", "100", True), ("95", "100", True), ("105.01", "100", False), ("94.9", "100", False),
     ("-104", "-100", True), ("0", "0", True), ("0.0001", "0", False), ("Yes", "yes", True), ("No", "yes", False)],
)
def test_relaxed_match_boundaries(given_answer: str, reference: str, right: bool) -> None:
    assert relaxed_match(given_answer, reference) is right

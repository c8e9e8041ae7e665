"""Answer checkers beyond the documented table: reference errors, tolerances, properties over many inputs."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reward_server.rewards.checkers import (
    InvalidReferenceError,
    check_answer,
    check_choice,
    check_exact,
    check_number,
    check_yes_no,
    resolve_choice_reference,
)
from reward_server.rewards.text import extract_answer_span, normalize_text
from services.schemas.models import AnswerType

CHOICES = ["red circle", "blue square", "green triangle", "yellow star"]


@pytest.mark.parametrize(
    ("reference", "answer_type", "choices", "field"),
    [
        ("abc", AnswerType.NUMBER, None, "answer"),
        ("3 or 4", AnswerType.NUMBER, None, "answer"),
        ("maybe", AnswerType.YES_NO, None, "answer"),
        ("F", AnswerType.CHOICE, CHOICES, "answer"),
        ("purple hexagon", AnswerType.CHOICE, CHOICES, "answer"),
        ("B", AnswerType.CHOICE, None, "choices"),
        ("B", AnswerType.CHOICE, [], "choices"),
        ("...", AnswerType.EXACT, None, "answer"),
    ],
)
def test_unusable_references_name_their_field(
    reference: str, answer_type: AnswerType, choices: list[str] | None, field: str
) -> None:
    with pytest.raises(InvalidReferenceError) as raised:
        check_answer("B", reference, answer_type, choices)
    assert raised.value.field == field
    assert reference in str(raised.value) or field == "choices"


def test_number_tolerances_come_from_the_caller() -> None:
    assert not check_number("3.001", "3", rel_tol=1e-6, abs_tol=1e-9).correct
    assert check_number("3.001", "3", rel_tol=1e-3, abs_tol=0).correct
    assert check_number("3.001", "3", rel_tol=0, abs_tol=0.01).correct
    assert not check_number("3.02", "3", rel_tol=0, abs_tol=0.01).correct


def test_choice_reference_resolves_letters_and_texts() -> None:
    assert resolve_choice_reference("(C)", CHOICES) == 2
    assert resolve_choice_reference("c", CHOICES) == 2
    assert resolve_choice_reference("Yellow Star", CHOICES) == 3


def test_answer_span_priority() -> None:
    text = "The answer is 4.\n\\boxed{5}\n<answer>6</answer>\nso 7"
    assert extract_answer_span(text).text == "6"
    assert extract_answer_span(text.replace("<answer>6</answer>", "")).text == "5"
    assert extract_answer_span("Answer: 4\nmore text").text == "4"
    assert extract_answer_span("Question: what is the answer? Answer: B. Red.").text == "B"
    assert extract_answer_span("first\n\nlast\n").source == "last_line"
    assert extract_answer_span("The answer is not A, the answer is B").text == "B"
    assert extract_answer_span("<answer>x</answer> <ANSWER>y</Answer>").text == "y"
    assert extract_answer_span("<answer>open <answer>inner</answer>").text == "inner"
    assert extract_answer_span("The answer is\n\n42").text == "42"


@pytest.mark.parametrize(
    "completion",
    [
        "<answer>" * 8000,
        "</answer>" * 7000,
        "\\boxed{" * 9000,
        "answer is " * 6500,
        "1," * 32000,
        "one hundred and " * 4000,
        "minus " * 10000,
        " " * 65000,
        "(B) " * 16000,
        "yes " * 16000,
    ],
)
def test_pathological_long_completions_are_read_without_error(completion: str) -> None:
    for answer_type, reference in [
        (AnswerType.EXACT, "red"),
        (AnswerType.NUMBER, "3"),
        (AnswerType.CHOICE, "B"),
        (AnswerType.YES_NO, "yes"),
    ]:
        result = check_answer(completion[:65_536], reference, answer_type, CHOICES)
        assert isinstance(result.correct, bool)


def test_unicode_normalization() -> None:
    assert normalize_text("ＲＥＤ") == "red"  # fullwidth letters (NFKC)
    assert normalize_text("Café’s «menu»") == "cafés menu"
    assert check_exact("Éclair!", "éclair").correct


_TRICKY = st.sampled_from(
    [
        "3",
        "1,000",
        "three",
        "-",
        ".",
        "/",
        "0",
        "(B)",
        "yes",
        "no",
        "answer is ",
        "\n",
        "<answer>",
        "</answer>",
        "\\boxed{",
        "}",
        "\u0663",
        "\u017f",
        "\U0001e5f1",
        "e9",
    ]
)


@settings(max_examples=400)
@given(st.lists(st.one_of(st.text(max_size=20), _TRICKY), max_size=20).map("".join))
def test_checkers_never_crash_on_any_completion(completion: str) -> None:
    for result in (
        check_exact(completion, "red"),
        check_number(completion, "3", 1e-6, 1e-9),
        check_choice(completion, "B", CHOICES),
        check_yes_no(completion, "no"),
    ):
        assert isinstance(result.correct, bool)


@given(st.text(max_size=200))
def test_normalization_is_idempotent(text: str) -> None:
    once = normalize_text(text)
    assert normalize_text(once) == once


@given(
    st.text(alphabet=string.ascii_letters + " ", min_size=1, max_size=40).filter(lambda t: normalize_text(t)),
    st.sampled_from(["", ".", "!", " ", "  "]),
)
def test_exact_ignores_case_whitespace_and_punctuation(words: str, trailing: str) -> None:
    assert check_exact(f"  {words.upper()}{trailing}", words).correct
    assert check_exact(f"The answer is {words.swapcase()}{trailing}", words).correct


@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_integers_read_in_every_notation(value: int) -> None:
    for written in (str(value), f"{value:,}", f"{value}.0", f"The answer is {value:,}."):
        result = check_number(written, str(value), 1e-9, 1e-9)
        assert result.correct, written
        assert result.parsed_answer == str(value)


@given(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_floats_round_trip(value: float) -> None:
    assert check_number(repr(value), repr(value), 1e-9, 1e-12).correct


@given(
    st.integers(min_value=0, max_value=3),
    st.sampled_from(["{}", "({})", "{}.", "[{}]", "Option {}", "The answer is {}", "{})"]),
)
def test_choice_letter_forms(index: int, template: str) -> None:
    letter = "ABCD"[index]
    for reference in (letter, CHOICES[index]):
        assert check_choice(template.format(letter), reference, CHOICES).correct
        wrong = "ABCD"[(index + 1) % 4]
        assert not check_choice(template.format(wrong), reference, CHOICES).correct


@given(st.permutations(["A", "B", "C", "D"]))
def test_listing_several_letters_never_earns_credit(letters: list[str]) -> None:
    for joiner in (" or ", ", ", " and "):
        hedge = joiner.join(f"({letter})" for letter in letters[:2])
        assert not check_choice(hedge, letters[0], CHOICES).correct

"""Reading numbers from text: digits, separators, fractions and English words."""

from __future__ import annotations

import pytest

from reward_server.rewards.numbers import (
    NumberParseError,
    find_numbers,
    first_number,
    last_number,
    parse_number,
    words_value,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", [3.0]),
        ("3.0", [3.0]),
        ("-2.5", [-2.5]),
        (".5", [0.5]),
        ("1e3", [1000.0]),
        ("1,000", [1000.0]),
        ("1,234,567.5", [1234567.5]),
        ("1,2", [1.0, 2.0]),
        ("2-3", [2.0, 3.0]),
        ("3/4", [0.75]),
        ("50%", [50.0]),
        ("x=5.", [5.0]),
        ("1/0", []),
        ("three", [3.0]),
        ("Twenty-One", [21.0]),
        ("one hundred and five", [105.0]),
        ("one thousand two hundred", [1200.0]),
        ("minus three", [-3.0]),
        ("two million", [2_000_000.0]),
        ("3 cats and 2 dogs", [3.0, 2.0]),
        ("(-3)", [-3.0]),
        ("x-3", [3.0]),
        ("-.5", [-0.5]),
        ("1.-2", [1.0, 2.0]),
        ("hundred " * 4000, []),  # grows past 1e18: refused, not an OverflowError (regression: a 500)
        ("\U0001e5f1 \u0663", []),  # digits of other scripts (regression: float() refused one, a 500)
        ("someone often done", []),
        ("tenth", []),
        ("", []),
    ],
)
def test_find_numbers(text: str, expected: list[float]) -> None:
    assert find_numbers(text) == expected


def test_parse_number_needs_exactly_one() -> None:
    assert parse_number("1,000") == 1000.0
    with pytest.raises(NumberParseError, match="no number"):
        parse_number("many")
    with pytest.raises(NumberParseError, match="2 numbers"):
        parse_number("3 or 4")


def test_words_value_refuses_non_number_words() -> None:
    with pytest.raises(NumberParseError, match="'apple'"):
        words_value("three apple")


def test_first_and_last_number() -> None:
    text = "I see 2 circles, then three squares; 1/0 and 1e999 are no numbers"
    assert first_number(text) == 2.0
    assert last_number(text) == 3.0
    assert first_number("none here") is None and last_number("") is None

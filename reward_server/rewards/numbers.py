"""Read numbers written as digits ("3", "3.0", "1,000", "-2.5", "3/4", "1e3") or English words ("three")."""

from __future__ import annotations

import math

import regex

_UNITS = {
    word: value
    for value, word in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
        ]
    )
}
_TENS = {
    word: 10 * (index + 2)
    for index, word in enumerate(
        ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
    )
}
_SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_NUMBER_WORDS = set(_UNITS) | set(_TENS) | set(_SCALES)

# ASCII digits only: `\d` would match digits of other scripts that float() cannot read.
# Thousands groups only when well formed ("1,000", not "1,2"), so a list "1,2" reads as two numbers.
_DIGITS = (
    r"(?:(?<![\w.])-)?"
    r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
    r"(?:[eE][-+]?[0-9]+)?"
    r"(?:/[0-9]+(?:\.[0-9]+)?)?"
)
_WORD = r"(?:" + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)) + r")"
# A run of number words, joined by spaces, hyphens or "and" ("one hundred and twenty-one").
_WORDS = rf"(?:(?<!\w)minus\s+)?\b{_WORD}\b(?:(?:\s+and\s+|[\s-]+){_WORD}\b)*"
_NUMBER = regex.compile(rf"(?P<digits>{_DIGITS})|(?P<words>{_WORDS})", regex.I)


class NumberParseError(ValueError):
    """A string does not hold exactly the one number it should."""


def _digits_value(token: str) -> float:
    numerator, _, denominator = token.replace(",", "").partition("/")
    value = float(numerator)
    if denominator:
        divisor = float(denominator)
        if divisor == 0:
            return math.nan
        value /= divisor
    return value


def words_value(phrase: str) -> float:
    """Value of an English number phrase such as 'one hundred and twenty-one' or 'minus three'."""
    words = regex.split(r"[\s-]+", phrase.casefold().strip())
    sign = 1.0
    if words and words[0] == "minus":
        sign, words = -1.0, words[1:]
    total, current = 0, 0
    for word in words:
        if word == "and":
            continue
        if word in _UNITS:
            current += _UNITS[word]
        elif word in _TENS:
            current += _TENS[word]
        elif word == "hundred":
            current = max(current, 1) * 100
        elif word in _SCALES:
            total += max(current, 1) * _SCALES[word]
            current = 0
        else:
            raise NumberParseError(f"{word!r} is not a number word")
    return sign * (total + current)


def find_numbers(text: str) -> list[float]:
    """Every number in text, in order of appearance; non-finite values (1/0, 1e999) are left out."""
    values = []
    for match in _NUMBER.finditer(text):
        digits = match.group("digits")
        try:
            value = _digits_value(digits) if digits is not None else words_value(match.group("words"))
        except ValueError:  # e.g. a Unicode look-alike that matched case-insensitively; not a number to us
            continue
        if math.isfinite(value):
            values.append(value)
    return values


def parse_number(text: str) -> float:
    """The one number a reference answer holds ('1,000', 'three', '2.5%'); raise if none or several."""
    values = find_numbers(text)
    if len(values) != 1:
        found = "no number" if not values else f"{len(values)} numbers"
        raise NumberParseError(f"{text!r} holds {found}; a number answer needs exactly one")
    return values[0]


def numbers_match(value: float, reference: float, rel_tol: float, abs_tol: float) -> bool:
    """Whether value equals reference within the relative or absolute tolerance."""
    return math.isclose(value, reference, rel_tol=rel_tol, abs_tol=abs_tol)

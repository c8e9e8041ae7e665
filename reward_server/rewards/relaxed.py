"""ChartQA's relaxed accuracy (Masry et al. 2022; the Pix2Struct evaluation's relaxed_correctness).

A numeric answer is right when it lies within 5% of the reference (relative); any other answer must equal
the reference once both are normalised like `exact` answers (case, punctuation, articles, whitespace;
the reference implementation compares lowercased strings). Numbers are read only when the whole answer is one number: digits with an
optional sign, decimal part, thousands commas ('1,234') and a trailing '%' (which divides by 100, on both
sides alike, as in the reference implementation).
"""

from __future__ import annotations

import regex

from reward_server.rewards.text import normalize_text

MAX_RELATIVE_CHANGE = 0.05
_WHOLE_NUMBER = regex.compile(r"^[-+]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)?(?:\.[0-9]+)?(%?)$")


def relaxed_float(text: str) -> float | None:
    """The value of text when it is exactly one number ('12.5', '1,234', '-3', '40%' = 0.4), else None."""
    stripped = text.strip().rstrip(".").strip()
    match = _WHOLE_NUMBER.match(stripped)
    if match is None or not any(char.isdigit() for char in stripped):
        return None
    value = float(stripped.rstrip("%").replace(",", ""))
    return value / 100.0 if match.group(1) else value


def relaxed_match(given: str, reference: str, max_relative_change: float = MAX_RELATIVE_CHANGE) -> bool:
    """ChartQA relaxed correctness: numbers within max_relative_change of the reference, else equal strings.

    A zero reference admits only zero (the reference implementation falls back to string equality there,
    which would refuse '0.0' for '0').
    """
    given_value, reference_value = relaxed_float(given), relaxed_float(reference)
    if given_value is not None and reference_value is not None:
        if reference_value == 0:
            return given_value == 0
        return abs(given_value - reference_value) / abs(reference_value) <= max_relative_change
    expected = normalize_text(reference)
    return bool(expected) and normalize_text(given) == expected

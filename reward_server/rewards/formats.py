"""The optional format reward: does the completion match the pattern the task asks for?

Patterns come from requests, so both ways a regex can hurt a server are bounded: matching time (the `regex`
module's timeout stops catastrophic backtracking) and compile size (the `regex` module unrolls counted
repetitions, so `a{1000000000}` would allocate gigabytes; such patterns are refused before compiling).
"""

from __future__ import annotations

from functools import lru_cache

import regex

MAX_EXPANSION = 200_000  # measured: patterns near this bound compile in < 10 ms and a few MB
# Any brace pair holding numbers, anywhere (even where the parser would read it as a literal): over-counting
# is safe, under-counting is not, and regex's own parser has corners a scanner here could misread.
_COUNTED_REPEAT = regex.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


class FormatPatternError(ValueError):
    """A required_format pattern does not compile, is too large once expanded, or takes too long to run."""


def expansion_bound(pattern: str) -> int:
    """Upper bound on pattern's size once counted repetitions are expanded: its length times every count."""
    bound = len(pattern)
    for low, high in _COUNTED_REPEAT.findall(pattern):
        if len(low) > 9 or len(high) > 9:
            return MAX_EXPANSION + 1  # and int() never sees a huge digit string
        bound *= max(int(low or 0), int(high or 0)) + 1
        if bound > MAX_EXPANSION:
            return bound
    return bound


@lru_cache(maxsize=256)
def _compile(pattern: str) -> regex.Pattern:
    bound = expansion_bound(pattern)
    if bound > MAX_EXPANSION:
        raise FormatPatternError(
            f"{pattern!r} is too large once its counted repetitions are expanded (bound {bound} > {MAX_EXPANSION})"
        )
    try:
        return regex.compile(pattern)
    except (regex.error, OverflowError, RecursionError) as error:
        raise FormatPatternError(f"{pattern!r} is not a valid regular expression: {error}") from error


def format_reward(completion: str, required_format: str | None, timeout_s: float) -> float:
    """1.0 when required_format (a regex, `search` semantics) matches the completion, else 0.0."""
    if required_format is None:
        return 0.0
    pattern = _compile(required_format)
    try:
        return 1.0 if pattern.search(completion, timeout=timeout_s) is not None else 0.0
    except TimeoutError as error:
        raise FormatPatternError(
            f"{required_format!r} ran longer than {timeout_s}s on a {len(completion)}-character completion"
        ) from error

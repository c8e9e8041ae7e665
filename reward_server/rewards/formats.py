"""The optional format reward: does the completion match the pattern the task asks for?"""

from __future__ import annotations

from functools import lru_cache

import regex


class FormatPatternError(ValueError):
    """A required_format pattern does not compile, or takes too long on a completion."""


@lru_cache(maxsize=256)
def _compile(pattern: str) -> regex.Pattern:
    try:
        return regex.compile(pattern)
    except regex.error as error:
        raise FormatPatternError(f"{pattern!r} is not a valid regular expression: {error}") from error


def format_reward(completion: str, required_format: str | None, timeout_s: float) -> float:
    """1.0 when required_format (a regex, `search` semantics) matches the completion, else 0.0."""
    if required_format is None:
        return 0.0
    pattern = _compile(required_format)
    try:
        # The `regex` module's timeout bounds catastrophic backtracking, since patterns come from requests.
        return 1.0 if pattern.search(completion, timeout=timeout_s) is not None else 0.0
    except TimeoutError as error:
        raise FormatPatternError(
            f"{required_format!r} ran longer than {timeout_s}s on a {len(completion)}-character completion"
        ) from error

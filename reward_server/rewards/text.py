"""Text normalization and answer-span extraction shared by the answer checkers."""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, wraps
from typing import Literal

import regex

SpanSource = Literal["tag", "boxed", "marker", "last_line"]

# SQuAD-style normalization (Rajpurkar et al. 2016): case, punctuation, articles, whitespace.
_APOSTROPHES = regex.compile(r"['\u2019`]")
_PUNCT_OR_SYMBOL = regex.compile(r"[\p{P}\p{S}]+")
_ARTICLES = frozenset({"a", "an", "the"})
# ASCII punctuation/symbols (string.punctuation = ASCII \p{P} and \p{S}) become spaces; apostrophes vanish.
_ASCII_PUNCTUATION = str.maketrans({**{char: " " for char in string.punctuation}, "'": None, "`": None})

# Where a completion states its answer, most explicit first; the last occurrence of each wins.
# Each pattern matches a short stretch, so finding the last occurrence stays linear on a 64 KiB completion
# (a lazy "<answer>(.*?)</answer>" is quadratic when a completion holds many openings and no closing).
_TAG_OPEN = regex.compile(r"<answer>", regex.I)
_TAG_CLOSE = regex.compile(r"</answer>", regex.I)
_BOXED = regex.compile(r"\\boxed\{([^{}]*)\}")
_MARKER = regex.compile(r"\banswer\s*(?:is|:|=)\s*:?[ \t]*", regex.I)
# A marker span ends at the first sentence end, so "The answer is B. Red is..." reads "B".
_SENTENCE_END = regex.compile(r"[.!?;](?:\s|$)|\n")


@dataclass(frozen=True, slots=True)
class AnswerSpan:
    """The part of a completion that states the answer, and how it was found."""

    text: str
    source: SpanSource


_CACHED_MAX_CHARS = 256  # references, choices and short answers repeat across a GRPO group; long text doesn't


def cache_short_inputs(normalize: Callable[[str], str]) -> Callable[[str], str]:
    """Memoise a text normaliser on inputs of at most 256 characters; long completions would only evict them."""
    cached = lru_cache(maxsize=16_384)(normalize)

    @wraps(normalize)
    def normalize_maybe_cached(text: str) -> str:
        return cached(text) if len(text) <= _CACHED_MAX_CHARS else normalize(text)

    return normalize_maybe_cached


@cache_short_inputs
def normalize_text(text: str) -> str:
    """Casefold, turn punctuation/symbols into spaces, drop articles (a/an/the), collapse whitespace."""
    if text.isascii():  # the common case, an order of magnitude faster than the Unicode path
        text = text.lower().translate(_ASCII_PUNCTUATION)
    else:
        text = unicodedata.normalize("NFKC", text).casefold()
        text = _APOSTROPHES.sub("", text)
        text = _PUNCT_OR_SYMBOL.sub(" ", text)
    words = text.split()
    # An answer that is only an article ("A", the letter) keeps it rather than vanishing.
    return " ".join([word for word in words if word not in _ARTICLES] or words)


def _last_match(pattern: regex.Pattern, text: str, endpos: int | None = None) -> regex.Match | None:
    last = None
    for match in pattern.finditer(text, 0, len(text) if endpos is None else endpos):
        last = match
    return last


def _tagged(completion: str) -> str | None:
    """The text inside the last <answer>...</answer> pair."""
    closing = _last_match(_TAG_CLOSE, completion)
    opening = None if closing is None else _last_match(_TAG_OPEN, completion, closing.start())
    return None if opening is None or closing is None else completion[opening.end() : closing.start()]


def _after_marker(completion: str) -> str | None:
    """The rest of the line after the last 'answer is' / 'answer:' / 'answer =', up to its sentence end."""
    marker = _last_match(_MARKER, completion)
    if marker is None:
        return None
    line_end = completion.find("\n", marker.end())
    rest = completion[marker.end() : len(completion) if line_end == -1 else line_end]
    end = _SENTENCE_END.search(rest)
    return rest if end is None else rest[: end.start()]


def extract_answer_span(completion: str) -> AnswerSpan:
    """The answer part of a completion: <answer> tag, \\boxed{}, 'answer is/:', else the last line."""
    tagged = _tagged(completion)
    if tagged is not None:
        return AnswerSpan(tagged.strip(), "tag")
    boxed = _last_match(_BOXED, completion)
    if boxed is not None:
        return AnswerSpan(boxed.group(1).strip(), "boxed")
    marked = _after_marker(completion)
    if marked is not None and marked.strip():
        return AnswerSpan(marked.strip(), "marker")
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    return AnswerSpan(lines[-1] if lines else "", "last_line")

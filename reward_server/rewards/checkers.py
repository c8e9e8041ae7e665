"""Answer checkers, one per answer_type: read the answer a completion gives and compare it with the reference.

Each checker looks at the answer span first (see text.extract_answer_span), so a completion gets one guess:
listing several candidates never earns credit. The accepted/rejected table is in docs/answer_checking.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from string import ascii_uppercase

import regex

from reward_server.rewards.numbers import (
    NumberParseError,
    first_number,
    last_number,
    numbers_match,
    parse_number,
)
from reward_server.rewards.relaxed import relaxed_float, relaxed_match
from reward_server.rewards.text import AnswerSpan, extract_answer_span, normalize_text
from reward_server.rewards.vqa import normalize_vqa_answer, vqa_accuracy
from services.schemas.models import AnswerType

_POLARITY = {"yes": True, "true": True, "y": True, "no": False, "false": False, "n": False}
# Inside a sentence only whole words count; single letters are too ambiguous there.
_POLARITY_IN_TEXT = {"yes": True, "true": True, "no": False, "false": False}

# "B", "(B)", "[B]", "B.", "B)", "b:", "Option B", "choice (c)".
# Case-insensitive only around the words: under IGNORECASE [A-Za-z] would also match "İ", "ſ" or "K" (Kelvin).
_BARE_LETTER = regex.compile(r"^(?:(?i:option|choice))?\s*[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:)]?$")
# A letter that opens the span and is followed by more text: "(B) red circle", "B. red", "B because ...".
_LEADING_LETTER = regex.compile(
    r"^(?:(?i:option|choice)\s*)?(?:[(\[]([A-Za-z])[)\]]|([A-Z])(?:[.:)]|\s)|([a-z])[.:)])\s*(.*)$", regex.S
)
_NAMED_LETTER = regex.compile(r"(?:\b(?i:option|choice)\s*[(\[]?([A-Z])\b|\(([A-Z])\))")
# "B. <text of choice C>" names two different choices: it earns nothing, whatever the reference.
_SELF_CONTRADICTORY = "?"
# "yes or no", "no and yes": a hedge, not an answer.
_HEDGE = regex.compile(r"^(?:yes|no|true|false) (?:or|and) (?:yes|no|true|false)\b")


class InvalidReferenceError(ValueError):
    """The reference answer (or its choices) cannot be checked against; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Whether a completion's answer is correct, and the answer the checker read (None if it found none).

    partial_credit is set by checkers that grade (answer_type 'vqa'); `correct` then means full credit.
    """

    correct: bool
    parsed_answer: str | None
    partial_credit: float | None = None

    @property
    def score(self) -> float:
        """Credit in [0, 1]: the partial credit where the checker grades, else 1 when correct and 0 when not."""
        if self.partial_credit is not None:
            return self.partial_credit
        return 1.0 if self.correct else 0.0


def check_exact(completion: str, reference: str) -> CheckResult:
    """Correct when the answer span equals the reference up to case, whitespace, punctuation and articles."""
    expected = normalize_text(reference)
    if not expected:
        raise InvalidReferenceError("answer", f"{reference!r} is empty once normalized")
    given = normalize_text(extract_answer_span(completion).text)
    return CheckResult(given == expected, given or None)


def _format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def check_number(completion: str, reference: str, rel_tol: float, abs_tol: float) -> CheckResult:
    """Correct when the number the completion states equals the reference within tolerance."""
    try:
        expected = parse_number(reference)
    except NumberParseError as error:
        raise InvalidReferenceError("answer", str(error)) from error
    span = extract_answer_span(completion)
    # After "the answer is" the number comes first; elsewhere the conclusion is the last number.
    given = first_number(span.text) if span.source == "marker" else last_number(span.text)
    if given is None and span.source == "last_line":
        given = last_number(completion)
    if given is None:
        return CheckResult(False, None)
    return CheckResult(numbers_match(given, expected, rel_tol, abs_tol), _format_number(given))


def _polarity_of(text: str) -> bool | None:
    normalized = normalize_text(text)
    words = normalized.split()
    if not words or _HEDGE.match(normalized):
        return None
    if words[0] in _POLARITY:
        return _POLARITY[words[0]]
    found = {_POLARITY_IN_TEXT[word] for word in words if word in _POLARITY_IN_TEXT}
    return found.pop() if len(found) == 1 else None


def _candidate_texts(completion: str, span: AnswerSpan) -> list[str]:
    """The span, then (for an unmarked completion) its first line: answers often lead, then explain."""
    candidates = [span.text]
    if span.source == "last_line":
        first = completion.strip().split("\n", 1)[0].strip()
        if first and first != span.text:
            candidates.append(first)
    return candidates


def check_yes_no(completion: str, reference: str) -> CheckResult:
    """Correct when the completion answers with the reference's polarity (yes/true vs no/false)."""
    expected = _POLARITY.get(normalize_text(reference))
    if expected is None:
        raise InvalidReferenceError("answer", f"{reference!r} is not a yes/no answer (yes, no, true, false)")
    for text in _candidate_texts(completion, extract_answer_span(completion)):
        given = _polarity_of(text)
        if given is not None:
            return CheckResult(given == expected, "yes" if given else "no")
    return CheckResult(False, None)


def _choice_by_text(text: str, normalized_choices: Sequence[str]) -> int | None:
    matches = [index for index, choice in enumerate(normalized_choices) if choice and choice == text]
    return matches[0] if len(matches) == 1 else None


def _choice_mentioned(text: str, normalized_choices: Sequence[str]) -> int | None:
    """The one choice whose text appears in text as whole words (a longer choice hides those it contains)."""
    padded = f" {text} "
    found = [index for index, choice in enumerate(normalized_choices) if choice and f" {choice} " in padded]
    kept = [
        i for i in found if not any(j != i and normalized_choices[i] in normalized_choices[j] for j in found)
    ]
    return kept[0] if len(kept) == 1 else None


def _letter_of(text: str, normalized_choices: Sequence[str]) -> str | None:
    """The choice letter a piece of text names; None when it names none or several."""
    stripped = text.strip()
    bare = _BARE_LETTER.match(stripped)
    if bare:
        return bare.group(1).upper()
    leading = _LEADING_LETTER.match(stripped)
    if leading:
        letter = next(group for group in leading.groups()[:3] if group)
        rest = normalize_text(leading.group(4))
        named_other = _choice_by_text(rest, normalized_choices)
        is_english_word = letter in "AI" and leading.group(2) is not None
        if not is_english_word:
            named_letters = {a or b for a, b in _NAMED_LETTER.findall(leading.group(4))}
            if named_letters - {letter.upper()} or (
                named_other is not None and ascii_uppercase[named_other] != letter.upper()
            ):
                return _SELF_CONTRADICTORY
            return letter.upper()
    named = {a or b for a, b in _NAMED_LETTER.findall(stripped)}
    return named.pop() if len(named) == 1 else None


@lru_cache(maxsize=4096)
def _normalized_choices(choices: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(normalize_text(choice) for choice in choices)


def resolve_choice_reference(reference: str, choices: Sequence[str]) -> int:
    """Index of the reference answer among choices: given as a letter ('B', '(B)') or as the choice text."""
    normalized = _normalized_choices(tuple(choices))
    bare = _BARE_LETTER.match(reference.strip())
    if bare and ascii_uppercase.index(bare.group(1).upper()) < len(choices):
        return ascii_uppercase.index(bare.group(1).upper())
    by_text = _choice_by_text(normalize_text(reference), normalized)
    if by_text is None:
        last = ascii_uppercase[len(choices) - 1]
        raise InvalidReferenceError(
            "answer", f"{reference!r} is neither a letter A-{last} nor the text of exactly one choice"
        )
    return by_text


def check_choice(completion: str, reference: str, choices: Sequence[str] | None) -> CheckResult:
    """Correct when the completion picks the reference choice, by letter or by the choice's text."""
    if not choices:
        raise InvalidReferenceError("choices", "answer_type 'choice' needs a non-empty choices list")
    expected = resolve_choice_reference(reference, choices)
    normalized = _normalized_choices(tuple(choices))
    span = extract_answer_span(completion)
    for text in _candidate_texts(completion, span):
        index = _choice_by_text(normalize_text(text), normalized)
        letter = ascii_uppercase[index] if index is not None else _letter_of(text, normalized)
        if letter is None:
            index = _choice_mentioned(normalize_text(text), normalized)
            letter = ascii_uppercase[index] if index is not None else None
        if letter == _SELF_CONTRADICTORY:
            return CheckResult(False, None)
        if letter is not None:
            return CheckResult(letter == ascii_uppercase[expected], letter)
    return CheckResult(False, None)


def check_vqa(completion: str, reference: str, human_answers: Sequence[str] | None) -> CheckResult:
    """VQA accuracy of the answer span against the human answers (partial credit; correct = full credit);
    without human answers, against the reference alone (credit 0 or 1)."""
    humans = list(human_answers) if human_answers else [reference]
    if not any(normalize_vqa_answer(answer) for answer in humans):
        field = "answers" if human_answers else "answer"
        raise InvalidReferenceError(field, f"every {field} entry is empty once normalized")
    span = extract_answer_span(completion).text
    given = normalize_vqa_answer(span)
    if not given:
        return CheckResult(False, None, 0.0)
    score = vqa_accuracy(span, humans)
    return CheckResult(score >= 1.0, given, score)


def check_relaxed(completion: str, reference: str) -> CheckResult:
    """ChartQA relaxed accuracy of the answer span: numbers within 5% relative, other answers exact."""
    if not normalize_text(reference) and relaxed_float(reference) is None:
        raise InvalidReferenceError("answer", f"{reference!r} is empty once normalized")
    span = extract_answer_span(completion).text
    value = relaxed_float(span)
    read = _format_number(value) if value is not None else normalize_text(span)
    return CheckResult(relaxed_match(span, reference), read or None)


def check_answer(
    completion: str,
    reference: str,
    answer_type: AnswerType,
    choices: Sequence[str] | None = None,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    answers: Sequence[str] | None = None,
) -> CheckResult:
    """Dispatch to the checker of answer_type (`answers`: the human answers of a 'vqa' item)."""
    if answer_type is AnswerType.EXACT:
        return check_exact(completion, reference)
    if answer_type is AnswerType.NUMBER:
        return check_number(completion, reference, rel_tol, abs_tol)
    if answer_type is AnswerType.CHOICE:
        return check_choice(completion, reference, choices)
    if answer_type is AnswerType.YES_NO:
        return check_yes_no(completion, reference)
    if answer_type is AnswerType.VQA:
        return check_vqa(completion, reference, answers)
    if answer_type is AnswerType.RELAXED:
        return check_relaxed(completion, reference)
    raise InvalidReferenceError("answer_type", f"unknown answer_type {answer_type!r}")

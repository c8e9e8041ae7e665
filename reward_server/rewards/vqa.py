"""VQA accuracy (Antol et al. 2015; TextVQA, Singh et al. 2019): partial credit from ten human answers.

The answer normalisation follows the VQA challenge's evaluation script (vqaEval.py): punctuation is
removed or turned into spaces, periods not followed by a digit vanish, number words up to ten become
digits, articles are dropped and apostrophe-less contractions get their apostrophes back. It is applied to
the prediction and to every human answer alike.

The score is the official one: the mean, over the n leave-one-out subsets of the n human answers, of
min(#matches in the subset / 3, 1). With ten answers of which m match, that is 1 for m >= 4, 0.9 for m = 3,
0.6 for m = 2, 0.3 for m = 1 and 0 for m = 0; the often quoted min(m / 3, 1) is its rounded form.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import regex

from reward_server.rewards.text import cache_short_inputs

# The characters vqaEval.py treats as punctuation (a period is handled apart; apostrophes and colons stay).
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_COMMA_BETWEEN_DIGITS = regex.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = regex.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# The contractions of vqaEval.py's table (its capitalised I'm/I've/I'd've keys never match lowercased text,
# so they are left out). Every spelling with some apostrophes missing maps back to the full form.
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "isn't", "it'd",
    "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't",
    "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "she's", "should've", "shouldn't",
    "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've",
    "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've",
    "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't", "we'd've",
    "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've",
    "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've", "wouldn't",
    "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)
FULL_CREDIT_MATCHES = 3  # "an answer is deemed 100% accurate if at least 3 workers provided that exact answer"


def _apostrophe_variants(word: str) -> list[str]:
    """Every spelling of `word` with a non-empty subset of its apostrophes left out."""
    parts = word.split("'")
    variants = []
    for keep in itertools.product((True, False), repeat=len(parts) - 1):
        if all(keep):
            continue
        joined = parts[0] + "".join(("'" if kept else "") + part for kept, part in zip(keep, parts[1:]))
        variants.append(joined)
    return variants


_RESTORE_APOSTROPHES = {variant: word for word in _CONTRACTIONS for variant in _apostrophe_variants(word)}


def _strip_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a mark next to a space (or any mark in text with '1,000') is removed,
    any other becomes a space; then every period not followed by a digit is removed."""
    remove_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if remove_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


@cache_short_inputs  # human answers repeat across a GRPO group and an eval
def normalize_vqa_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation: case, punctuation, number words, articles, contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    words = [_NUMBER_WORDS.get(word, word) for word in _strip_punctuation(text).split()]
    return " ".join(_RESTORE_APOSTROPHES.get(word, word) for word in words if word not in _ARTICLES)


def vqa_accuracy(given: str, human_answers: Sequence[str]) -> float:
    """Official VQA accuracy of one answer: mean over leave-one-out subsets of min(matches / 3, 1).

    Both the answer and the human answers are normalised first (normalize_vqa_answer). With a single human
    answer no leave-one-out subset is left: the credit is 1 when it matches, else 0.
    """
    if not human_answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    prediction = normalize_vqa_answer(given)
    matches = sum(normalize_vqa_answer(answer) == prediction for answer in human_answers)
    total = len(human_answers)
    if total == 1:
        return float(matches)
    # Leaving out a matching answer leaves matches-1 matches; leaving out another one leaves all of them.
    left_out_match = matches * min((matches - 1) / FULL_CREDIT_MATCHES, 1.0)
    left_out_other = (total - matches) * min(matches / FULL_CREDIT_MATCHES, 1.0)
    return (left_out_match + left_out_other) / total

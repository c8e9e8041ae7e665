"""Validation shared by the task generators' question mixes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def check_question_mix(question_mix: Mapping[str, float], kinds: Sequence[str]) -> None:
    """Refuse unknown question kinds, negative weights, and a mix with no positive weight."""
    unknown = set(question_mix) - set(kinds)
    if unknown or not any(weight > 0 for weight in question_mix.values()):
        raise ValueError(f"question_mix={dict(question_mix)} needs positive weights over {tuple(kinds)}")
    if any(weight < 0 for weight in question_mix.values()):
        raise ValueError(f"question_mix={dict(question_mix)} has a negative weight")

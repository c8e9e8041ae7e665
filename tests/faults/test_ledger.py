"""The fault table's ledger counts what it must: lost, trained twice and valid tasks never trained."""

from __future__ import annotations

from collections import Counter

import pytest
from fault_harness import Ledger

pytestmark = pytest.mark.faults


def test_a_valid_task_dead_lettered_as_stale_is_not_trained() -> None:
    ledger = Ledger(["a", "b", "c"], Counter({"a": 1, "b": 1}), {"c": "stale after 2 fresh attempts"})
    assert ledger.lost == [] and ledger.trained_twice == []
    assert ledger.valid_not_trained == ["c"]
    assert ledger.row("stale", None)["valid_not_trained"] == 1


def test_a_bad_line_dead_lettered_on_purpose_counts_as_accounted_for() -> None:
    ledger = Ledger(["a", "bad"], Counter({"a": 1}), {"bad": "missing image"}, invalid=frozenset({"bad"}))
    assert ledger.lost == [] and ledger.valid_not_trained == []


def test_trimmed_dead_letters_stand_for_bad_lines_only() -> None:
    tasks = ["a", "bad-1", "bad-2", "bad-3"]
    bad = frozenset(tasks[1:])
    kept_one = Ledger(tasks, Counter({"a": 1}), {"bad-3": "missing image"}, invalid=bad, trimmed=2)
    assert kept_one.lost == [] and kept_one.row("flood", None)["dead_lettered"] == 3
    too_few_trimmed = Ledger(tasks, Counter({"a": 1}), {"bad-3": "missing image"}, invalid=bad, trimmed=1)
    assert too_few_trimmed.lost == ["bad-2"]
    valid_missing = Ledger(tasks, Counter(), {"bad-3": "missing image"}, invalid=bad, trimmed=5)
    assert valid_missing.lost == ["a"] and valid_missing.valid_not_trained == ["a"]


def test_a_task_trained_twice_or_trained_and_dead_lettered_is_flagged() -> None:
    ledger = Ledger(["a", "b"], Counter({"a": 2, "b": 1}), {"b": "poison"})
    assert ledger.trained_twice == ["a", "b"]

"""The SFT recipes' warm-up then cosine learning-rate schedule."""

from __future__ import annotations

from itertools import pairwise

import pytest

from learner.lr_schedule import warmup_cosine


def test_warm_up_is_linear_to_the_peak_then_the_cosine_ends_at_five_percent() -> None:
    rates = [warmup_cosine(step, 1e-3, 4, 104) for step in range(110)]
    assert rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert rates[4] == pytest.approx(1e-3)  # the decay starts at the peak
    assert rates[54] == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))  # halfway down
    assert rates[104] == pytest.approx(5e-5) and rates[109] == pytest.approx(5e-5)  # held at the floor
    assert all(a >= b for a, b in pairwise(rates[4:]))


def test_no_warm_up_starts_at_the_peak() -> None:
    assert warmup_cosine(0, 2.0, 0, 10) == pytest.approx(2.0)

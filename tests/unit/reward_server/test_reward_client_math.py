"""The client's retry timing: Retry-After parsing and jittered exponential backoff."""

from __future__ import annotations

import itertools
import random
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

from hypothesis import given
from hypothesis import strategies as st

from reward_server.client import MAX_RETRY_AFTER_S, backoff_delay, parse_retry_after


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("100000") == MAX_RETRY_AFTER_S
    assert parse_retry_after(format_datetime(now + timedelta(seconds=7), usegmt=True), now) == 7.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=7), usegmt=True), now) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("") is None


@given(st.integers(min_value=0, max_value=30), st.floats(0.01, 1), st.floats(0.1, 10), st.integers(0, 2**32))
def test_backoff_is_bounded_by_the_cap(attempt: int, base: float, cap: float, seed: int) -> None:
    delay = backoff_delay(attempt, base, cap, None, random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2**attempt)


def test_retry_after_wins_over_backoff() -> None:
    delay = backoff_delay(0, 0.1, 5.0, 2.0, random.Random(0))
    assert 2.0 <= delay <= 2.1


def test_backoff_grows_on_average() -> None:
    rng = random.Random(1)
    means = [sum(backoff_delay(a, 0.1, 100, None, rng) for _ in range(2000)) / 2000 for a in range(5)]
    assert all(later > earlier for earlier, later in itertools.pairwise(means))

"""The background publisher: in order, at most one publish at a time, errors surface on the next call."""

from __future__ import annotations

import threading
import time

import pytest

from learner.publishing import BackgroundPublisher


def test_publishes_run_in_order_one_at_a_time_and_submit_returns_at_once() -> None:
    publisher = BackgroundPublisher()
    running, finished, overlap = threading.Event(), [], []

    def publish(version: int) -> int:
        if running.is_set():
            overlap.append(version)
        running.set()
        time.sleep(0.05)
        finished.append(version)
        running.clear()
        return version

    started = time.perf_counter()
    assert publisher.submit(lambda: publish(1)) < 0.01  # nothing to wait for: the step goes on at once
    assert time.perf_counter() - started < 0.04
    waited = publisher.submit(lambda: publish(2))  # the first is still running: this one waits for it
    assert waited > 0.01 and finished == [1]
    assert publisher.wait()[0] == 2 and finished == [1, 2] and overlap == []
    assert publisher.wait() == (None, pytest.approx(0.0, abs=0.01))
    publisher.close()


def test_a_failed_publish_raises_on_the_next_call() -> None:
    publisher = BackgroundPublisher()

    def broken() -> None:
        raise OSError("disk full")

    publisher.submit(broken)
    with pytest.raises(OSError, match="disk full"):
        publisher.submit(lambda: None)
    publisher.close()

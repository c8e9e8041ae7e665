"""Rejections go to Redis in batches bounded by count and by payload bytes, in order, none dropped."""

from services.queues import Rejection
from services.queues.streams import REJECT_BATCH, REJECT_BATCH_BYTES, _batches


def rejections(sizes: list[int]) -> list[Rejection]:
    return [Rejection(b"x" * size, "bad", f"f:{n}", f"k:{n}") for n, size in enumerate(sizes)]


def test_batches_hold_at_most_reject_batch_rejections_in_order() -> None:
    flood = rejections([10] * (2 * REJECT_BATCH + 3))
    batches = _batches(flood)
    assert [len(batch) for batch in batches] == [REJECT_BATCH, REJECT_BATCH, 3]
    assert [r for batch in batches for r in batch] == flood


def test_long_payloads_make_smaller_batches_and_one_longer_than_the_limit_goes_alone() -> None:
    half = REJECT_BATCH_BYTES // 2
    batches = _batches(rejections([half, half, 1, 3 * REJECT_BATCH_BYTES, 5]))
    assert [[len(r.payload) for r in batch] for batch in batches] == [[half, half], [1], [3 * REJECT_BATCH_BYTES],
                                                                        [5]]
    assert _batches([]) == []

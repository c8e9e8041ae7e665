"""Dead-letter streams are bounded against a real redis-server: a flood of bad entries trims the oldest dead
letters, the stream stays near queues.dead_letter_max_length, and sf_queue_dead_letters_trimmed counts each
dropped one."""

from __future__ import annotations

import re

from services.queues import Rejection, StreamQueue, connect_redis
from services.queues.streams import REJECT_BATCH
from services.settings import QueueSettings, RedisSettings
from services.telemetry import Telemetry

STREAM = "sf:bound"
BOUND = 300
# MAXLEN ~ drops whole stream nodes only; a node holds up to stream-node-max-entries (Redis default 100) entries.
NODE_ENTRIES = 100


def trimmed_total(telemetry: Telemetry, stream: str) -> float:
    """sf_queue_dead_letters_trimmed_total{stream=...} from the registry's exposition (0 when absent)."""
    text = telemetry.exposition().decode()
    sample = rf'^sf_queue_dead_letters_trimmed_total{{stream="{re.escape(stream)}"}} (\S+)$'
    match = re.search(sample, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def make_queue(redis_settings: RedisSettings, telemetry: Telemetry) -> StreamQueue:
    return StreamQueue(
        connect_redis(redis_settings), STREAM, QueueSettings(dead_letter_max_length=BOUND, block_ms=50),
        consumer="c", metrics=telemetry.queue,
    )


def test_a_flood_of_rejected_lines_keeps_the_dead_letter_stream_bounded(redis_settings: RedisSettings) -> None:
    telemetry = Telemetry("test")
    queue = make_queue(redis_settings, telemetry)
    flood = 20 * BOUND  # e.g. a dataset whose lines are all bad
    for line in range(flood):
        queue.reject(b'{"id": ' + str(line).encode(), "bad task line: invalid JSON", f"f:{line}", f"run:f:{line}")
    kept = queue.client.xlen(queue.dead_stream)
    assert BOUND <= kept <= BOUND + NODE_ENTRIES, kept
    assert trimmed_total(telemetry, STREAM) == flood - kept
    # The oldest were dropped: the newest dead letter is still there to inspect.
    ((_newest_id, fields),) = queue.client.xrevrange(queue.dead_stream, count=1)
    assert fields[b"source_id"] == f"f:{flood - 1}".encode()
    # A rejected key stays rejected once its dead letter is trimmed: a restarted producer adds nothing.
    assert queue.reject(b'{"id": 0', "bad task line: invalid JSON", "f:0", "run:f:0") is None
    assert trimmed_total(telemetry, STREAM) == flood - kept


def test_dead_lettered_entries_keep_the_stream_bounded_and_are_counted(redis_settings: RedisSettings) -> None:
    telemetry = Telemetry("test")
    queue = make_queue(redis_settings, telemetry)
    dead = 0
    for _round in range(8):
        queue.put_many([f"poison-{dead + index}".encode() for index in range(BOUND)])
        entries = queue.consume(BOUND, block_ms=50)
        assert len(entries) == BOUND
        for entry in entries:
            queue.dead_letter(entry, "DecodeError: not a valid TaskMessage")
        dead += len(entries)
    kept = queue.client.xlen(queue.dead_stream)
    assert BOUND <= kept <= BOUND + NODE_ENTRIES, kept
    assert trimmed_total(telemetry, STREAM) == dead - kept
    assert queue.depth() == 0 and queue.pending() == 0  # every entry left the work stream as before
    oldest_kept = queue.dead_letters(count=1)[0].payload
    assert oldest_kept == f"poison-{dead - kept}".encode()


def test_a_flood_rejected_in_batches_is_bounded_counted_and_kept_once(redis_settings: RedisSettings) -> None:
    telemetry = Telemetry("test")
    queue = make_queue(redis_settings, telemetry)
    keys_before = queue.client.dbsize()
    flood = [Rejection(b'{"id": ' + str(line).encode(), "bad task line: invalid JSON", f"f:{line}", f"run:f:{line}")
             for line in range(REJECT_BATCH * 5 // 2)]  # three batches, the last one partial
    assert queue.reject_many(flood) == len(flood)
    kept = queue.client.xlen(queue.dead_stream)
    assert BOUND <= kept <= BOUND + NODE_ENTRIES, kept
    assert trimmed_total(telemetry, STREAM) == len(flood) - kept
    ((_newest_id, fields),) = queue.client.xrevrange(queue.dead_stream, count=1)
    assert fields[b"source_id"] == f"f:{len(flood) - 1}".encode() and fields[b"reason"] == b"bad task line: invalid JSON"
    # What stays in Redis is bounded too: the stream and one key per batch, not one per line.
    assert queue.client.dbsize() - keys_before <= 1 + 3
    # A restarted producer that meets the same lines adds nothing, trimmed or not.
    assert queue.reject_many(flood) == 0
    assert queue.client.xlen(queue.dead_stream) == kept and trimmed_total(telemetry, STREAM) == len(flood) - kept

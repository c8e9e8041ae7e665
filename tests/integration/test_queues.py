"""The Redis Streams queue against a real redis-server: reclaim, backpressure, dead-letter, restarts."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from services.queues import QueueFull, StreamQueue, connect_redis
from services.settings import QueueSettings, RedisSettings
from services.telemetry import Telemetry

REPO = Path(__file__).resolve().parents[2]


def make_queue(redis_settings: RedisSettings, consumer: str, **queue_knobs) -> StreamQueue:
    knobs = {"claim_idle_ms": 300, "block_ms": 100, "backpressure_timeout_s": 1.0, **queue_knobs}
    return StreamQueue(
        connect_redis(redis_settings), "sf:test", QueueSettings(**knobs), consumer=consumer,
        metrics=Telemetry("test").queue,
    )


def drain(queue: StreamQueue, deadline_s: float = 5.0) -> list:
    """Consume until nothing new arrives for a while; returns every entry delivered."""
    delivered, quiet_since = [], time.monotonic()
    while time.monotonic() - quiet_since < deadline_s:
        batch = queue.consume(16, block_ms=100)
        if batch:
            delivered.extend(batch)
            queue.ack(batch)
            quiet_since = time.monotonic()
        elif delivered and queue.depth() == 0:
            break
    return delivered


def test_entries_flow_in_order_and_are_gone_after_ack(redis_settings: RedisSettings) -> None:
    queue = make_queue(redis_settings, "a")
    payloads = [f"item-{index}".encode() for index in range(50)]
    queue.put_many(payloads)
    delivered = drain(queue, 1.0)
    assert [entry.payload for entry in delivered] == payloads
    assert queue.depth() == 0 and queue.pending() == 0
    assert queue.consume(10, block_ms=50) == []


CONSUMER_THAT_DIES = textwrap.dedent(
    """
    import os, sys, time
    from pydantic import SecretStr
    from services.queues import StreamQueue, connect_redis
    from services.settings import QueueSettings, RedisSettings
    settings = RedisSettings(url=sys.argv[1], password=SecretStr(sys.argv[2]))
    queue = StreamQueue(connect_redis(settings), "sf:test", QueueSettings(claim_idle_ms=300), consumer="doomed")
    entries = queue.consume(int(sys.argv[3]), block_ms=2000)
    print(len(entries), flush=True)
    time.sleep(3600)  # killed here: read, never acked
    """
)


def test_a_killed_consumers_entries_are_reclaimed_once(redis_settings: RedisSettings, redis_server) -> None:
    survivor = make_queue(redis_settings, "survivor")
    survivor.ensure_group()
    survivor.put_many([f"job-{index}".encode() for index in range(20)])
    doomed = subprocess.Popen(
        [sys.executable, "-c", CONSUMER_THAT_DIES, redis_server.url, redis_server.password, "8"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    assert doomed.stdout.readline().strip() == "8"
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=10)
    assert survivor.pending() == 8

    delivered = drain(survivor)
    payloads = sorted(entry.payload.decode() for entry in delivered)
    assert payloads == sorted(f"job-{index}" for index in range(20))  # nothing lost, nothing twice
    assert sum(entry.deliveries == 2 for entry in delivered) == 8  # the killed consumer's 8, redelivered
    assert survivor.depth() == 0 and survivor.pending() == 0
    assert survivor.consume(10, block_ms=400) == []


def test_backpressure_engages_at_the_bound_and_releases(redis_settings: RedisSettings) -> None:
    queue = make_queue(redis_settings, "a", max_length=10, backpressure_timeout_s=0.3)
    queue.put_many([b"x"] * 10)
    with pytest.raises(QueueFull, match="max_length=10"):
        queue.put(b"overflow")
    with pytest.raises(QueueFull):
        queue.put_many([b"y"] * 2)  # all-or-nothing: no partial batch lands
    assert queue.depth() == 10
    with pytest.raises(ValueError, match="can never fit"):
        queue.put_many([b"z"] * 11)

    def consume_later() -> None:
        time.sleep(0.2)
        queue.ack(queue.consume(5))

    consumer = threading.Thread(target=consume_later)
    consumer.start()
    queue.put_many([b"late"] * 3, timeout_s=5.0)  # blocks until the consumer makes room
    consumer.join()
    assert queue.depth() == 8


def test_producers_outrunning_the_consumers_keep_redis_memory_under_the_bound(redis_settings, redis_server) -> None:
    entry, bound = b"x" * 65_536, 100  # 64 KiB entries (a large trajectory group), 6.4 MiB of them at most
    used_before = redis_server.client().info("memory")["used_memory"]
    refused: list[int] = []

    def producer() -> None:  # each with its own connection, as separate workers would be
        queue = make_queue(redis_settings, "producer", max_length=bound)
        for _ in range(60):
            try:
                queue.put(entry, timeout_s=0.02)
            except QueueFull:
                refused.append(1)

    producers = [threading.Thread(target=producer) for _ in range(4)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join()
    queue = make_queue(redis_settings, "consumer", max_length=bound)
    grown = redis_server.client().info("memory")["used_memory"] - used_before
    assert queue.depth() == bound and len(refused) == 4 * 60 - bound  # every put past the bound was refused
    assert grown < bound * len(entry) * 1.25 + 2**21, f"{grown} bytes for {bound} entries of {len(entry)}"


def test_a_poison_entry_is_dead_lettered_after_max_deliveries(redis_settings: RedisSettings) -> None:
    queue = make_queue(redis_settings, "a", max_deliveries=3, claim_idle_ms=100)
    queue.put(b"poison")
    deliveries = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not queue.dead_letters():
        for entry in queue.consume(1, block_ms=50):
            deliveries.append(entry.deliveries)  # the handler crashes: never acked
        time.sleep(0.05)
    assert deliveries == [1, 2, 3]
    (dead,) = queue.dead_letters()
    assert dead.payload == b"poison" and dead.deliveries == 4 and "without an ack" in dead.reason
    assert queue.depth() == 0 and queue.pending() == 0


def test_explicit_dead_letter_keeps_the_reason(redis_settings: RedisSettings) -> None:
    queue = make_queue(redis_settings, "a")
    queue.put(b"not-a-task")
    (entry,) = queue.consume(1)
    queue.dead_letter(entry, "DecodeError: not a valid TaskMessage")
    (dead,) = queue.dead_letters()
    assert dead.reason.startswith("DecodeError") and dead.source_id == entry.id
    assert queue.depth() == 0


def test_put_unique_publishes_once_per_key(redis_settings: RedisSettings) -> None:
    queue = make_queue(redis_settings, "a")
    first = queue.put_unique(b"group-1", "task-1:epoch-0")
    assert first is not None
    assert queue.put_unique(b"group-1 again", "task-1:epoch-0") is None
    assert queue.put_unique(b"group-2", "task-2:epoch-0") is not None
    assert [entry.payload for entry in drain(queue, 1.0)] == [b"group-1", b"group-2"]


def test_redis_restart_mid_stream_loses_no_pending_or_waiting_entry(redis_settings, redis_server) -> None:
    queue = make_queue(redis_settings, "a", claim_idle_ms=200)
    queue.put_many([f"e{index}".encode() for index in range(30)])
    first = queue.consume(10)
    queue.ack(first[:5])  # 5 acked, 5 pending, 20 waiting
    redis_server.kill()  # a crash, not a clean shutdown: AOF (fsync always) must hold everything
    redis_server.start()

    time.sleep(0.3)  # let the 5 pending entries go idle past claim_idle_ms
    rest = drain(queue)  # the same client object reconnects through its retry policy
    got = sorted(entry.payload.decode() for entry in rest)
    assert got == sorted(f"e{index}" for index in range(5, 30))
    assert queue.depth() == 0 and queue.pending() == 0


def test_queue_metrics_follow_the_stream(redis_settings: RedisSettings) -> None:
    telemetry = Telemetry("test")
    queue = StreamQueue(
        connect_redis(redis_settings), "sf:test", QueueSettings(block_ms=50), metrics=telemetry.queue
    )
    queue.put_many([b"1", b"2", b"3"])
    queue.ack(queue.consume(1))
    queue.consume(1)
    queue.update_gauges()

    def sample(name: str) -> float | None:
        return telemetry.registry.get_sample_value(name, {"stream": "sf:test"})

    assert (sample("sf_queue_depth"), sample("sf_queue_pending")) == (2.0, 1.0)
    assert (sample("sf_queue_entries_put_total"), sample("sf_queue_entries_acked_total")) == (3.0, 1.0)



def test_a_restarted_consumer_takes_its_own_pending_entries_back_at_once(redis_settings: RedisSettings) -> None:
    first = make_queue(redis_settings, "learner-run", claim_idle_ms=60_000)
    first.put_many([b"g1", b"g2", b"g3"])
    held = first.consume(2)  # read, then the process dies before acking
    restarted = make_queue(redis_settings, "learner-run", claim_idle_ms=60_000)
    recovered = restarted.own_pending()
    assert [entry.payload for entry in recovered] == [b"g1", b"g2"] and all(e.deliveries == 2 for e in recovered)
    assert make_queue(redis_settings, "other").own_pending() == []  # only the consumer's own

    time.sleep(0.4)
    restarted.touch(held)  # still ours: the idle clock restarts, the delivery count does not move
    thief = make_queue(redis_settings, "thief", claim_idle_ms=300)
    assert [entry.payload for entry in thief.consume(5, block_ms=50)] == [b"g3"]
    assert [entry.deliveries for entry in restarted.own_pending()] == [3, 3]  # two history reads, no claims


def test_a_rejected_payload_is_dead_lettered_once_per_key(redis_settings: RedisSettings) -> None:
    queue = make_queue(redis_settings, "learner")
    assert queue.reject(b'{"id": 1', "bad task line f.jsonl:3: invalid JSON", "f.jsonl:3", "run:f.jsonl:3")
    assert queue.reject(b'{"id": 1', "bad task line f.jsonl:3: invalid JSON", "f.jsonl:3", "run:f.jsonl:3") is None
    (dead,) = queue.dead_letters()
    assert (dead.payload, dead.source_id, dead.deliveries) == (b'{"id": 1', "f.jsonl:3", 0)
    assert dead.reason.endswith("invalid JSON") and queue.depth() == 0

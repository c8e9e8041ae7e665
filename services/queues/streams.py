"""A bounded work queue on a Redis Stream with a consumer group: at-least-once, reclaim, dead-letter."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis
from redis.exceptions import ResponseError

from services.settings.models import QueueSettings
from services.telemetry.metrics import QueueMetrics

log = logging.getLogger(__name__)

PAYLOAD_FIELD = b"p"

# Check-and-add in one step so that concurrent producers can never push a stream past its bound.
_PUT_MANY_IF_ROOM = """
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1])
if room < #ARGV - 1 then return false end
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'p', ARGV[i]) end
return ids
"""

# Publish at most once per dedup key: a retried or replayed publish of the same key is a no-op.
_PUT_UNIQUE_IF_ROOM = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
local id = redis.call('XADD', KEYS[1], '*', 'p', ARGV[2])
redis.call('SET', KEYS[2], id, 'EX', tonumber(ARGV[3]))
return id
"""

# Dead-letter something that never reached the stream (a bad dataset line) once per key, so a restarted
# producer that meets the same bad line again adds no second dead letter. Returns {id, entries trimmed}.
_REJECT_UNIQUE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local before = redis.call('XLEN', KEYS[1])
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*',
                      'p', ARGV[1], 'reason', ARGV[2], 'source_id', ARGV[3], 'deliveries', 0)
redis.call('SET', KEYS[2], id, 'EX', tonumber(ARGV[4]))
return {id, before + 1 - redis.call('XLEN', KEYS[1])}
"""

# The same for a whole batch under one key: ARGV = ttl, max length, then (payload, reason, source) per entry.
# One key per batch, not per line: a flood of bad lines leaves about lines / REJECT_BATCH keys in Redis, where
# a key per line would grow it by ~290 bytes a line (28 MB for 100,000). Returns {added, entries trimmed}.
_REJECT_BATCH_ONCE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local before = redis.call('XLEN', KEYS[1])
local added = 0
for i = 3, #ARGV, 3 do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*',
             'p', ARGV[i], 'reason', ARGV[i + 1], 'source_id', ARGV[i + 2], 'deliveries', 0)
  added = added + 1
end
redis.call('SET', KEYS[2], added, 'EX', tonumber(ARGV[1]))
return {added, before + added - redis.call('XLEN', KEYS[1])}
"""


# Rejections in one script call: one round trip and, with `appendfsync always`, one AOF fsync per batch, not
# per line, so a flood of 100,000 bad dataset lines takes seconds instead of minutes.
REJECT_BATCH = 1000
REJECT_BATCH_BYTES = 8 * 2**20  # ...and at most about this many payload bytes (bad lines can be long)


def _batches(rejections: Sequence[Rejection]) -> list[Sequence[Rejection]]:
    """Consecutive runs of at most REJECT_BATCH rejections and about REJECT_BATCH_BYTES payload bytes."""
    batches, start, size = [], 0, 0
    for index, rejection in enumerate(rejections):
        if index > start and (index - start == REJECT_BATCH or size + len(rejection.payload) > REJECT_BATCH_BYTES):
            batches.append(rejections[start:index])
            start, size = index, 0
        size += len(rejection.payload)
    if start < len(rejections):
        batches.append(rejections[start:])
    return batches


class QueueFull(RuntimeError):
    """The stream stayed at its bound for the whole backpressure timeout; nothing was added."""


@dataclass(frozen=True)
class Entry:
    """One delivered stream entry: its id, payload bytes, and how often it has been delivered."""

    id: str
    payload: bytes
    deliveries: int


@dataclass(frozen=True)
class Rejection:
    """A payload that never reached the stream: why, where it came from, and the key that makes it once-only."""

    payload: bytes
    reason: str
    source: str
    dedup_key: str


@dataclass(frozen=True)
class DeadLetter:
    """An entry moved aside, with why and from where."""

    id: str
    payload: bytes
    reason: str
    source_id: str
    deliveries: int


class StreamQueue:
    """Producer and consumer side of one stream, read through one consumer group."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        settings: QueueSettings,
        *,
        group: str = "workers",
        consumer: str = "consumer-0",
        metrics: QueueMetrics | None = None,
    ) -> None:
        self.client = client
        self.stream = stream
        self.dead_stream = stream + settings.dead_letter_suffix
        self.settings = settings
        self.group = group
        self.consumer = consumer
        self.metrics = metrics
        self._put_many_script = client.register_script(_PUT_MANY_IF_ROOM)
        self._put_unique_script = client.register_script(_PUT_UNIQUE_IF_ROOM)
        self._reject_script = client.register_script(_REJECT_UNIQUE)
        self._reject_batch_script = client.register_script(_REJECT_BATCH_ONCE)
        self._next_reclaim_at = 0.0
        self._group_ready = False

    # ----------------------------------------------------------------------------------- producing
    def put(self, payload: bytes, *, timeout_s: float | None = None) -> str:
        """Append one entry, waiting (up to the backpressure timeout) while the stream is full."""
        return self.put_many([payload], timeout_s=timeout_s)[0]

    def put_many(self, payloads: Sequence[bytes], *, timeout_s: float | None = None) -> list[str]:
        """Append entries all-or-nothing, waiting while the stream lacks room; raise QueueFull on timeout."""
        if not payloads:
            return []
        if len(payloads) > self.settings.max_length:
            raise ValueError(
                f"a batch of {len(payloads)} can never fit {self.stream} (max_length={self.settings.max_length})"
            )
        ids = self._with_backpressure(
            lambda: self._put_many_script(keys=[self.stream], args=[self.settings.max_length, *payloads]),
            timeout_s,
        )
        if self.metrics:
            self.metrics.put.labels(self.stream).inc(len(ids))
        return [entry_id.decode() for entry_id in ids]

    def put_unique(
        self, payload: bytes, dedup_key: str, *, ttl_s: int = 7 * 24 * 3600, timeout_s: float | None = None
    ) -> str | None:
        """Append once per dedup_key (atomically); returns None when that key was already published."""
        key = f"{self.stream}:published:{dedup_key}"
        result = self._with_backpressure(
            lambda: self._put_unique_script(
                keys=[self.stream, key], args=[self.settings.max_length, payload, ttl_s]
            ),
            timeout_s,
        )
        if result == 0:
            return None
        if self.metrics:
            self.metrics.put.labels(self.stream).inc()
        return result.decode()

    def _with_backpressure(self, attempt, timeout_s: float | None):
        """Run attempt until it returns non-None; a None means 'full', so back off and retry."""
        timeout = self.settings.backpressure_timeout_s if timeout_s is None else timeout_s
        started = time.monotonic()
        sleep_s = 0.005
        while True:
            result = attempt()
            if result is not None:
                break
            waited = time.monotonic() - started
            if waited >= timeout:
                raise QueueFull(
                    f"{self.stream} stayed full at max_length={self.settings.max_length} for {waited:.1f}s; "
                    "consumers are not keeping up"
                )
            time.sleep(min(sleep_s, max(timeout - waited, 0.0)))
            sleep_s = min(sleep_s * 2, 0.5)
        if self.metrics and time.monotonic() - started > 0.001:
            self.metrics.backpressure_wait.labels(self.stream).inc(time.monotonic() - started)
        return result

    # ----------------------------------------------------------------------------------- consuming
    def ensure_group(self) -> None:
        """Create the stream and its consumer group if they do not exist yet."""
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._group_ready = True

    def consume(self, count: int = 1, *, block_ms: int | None = None) -> list[Entry]:
        """Deliver up to count entries: first stale ones reclaimed from dead consumers, then new ones."""
        if not self._group_ready:
            self.ensure_group()
        entries = self._reclaim_stale(count)
        wanted = count - len(entries)
        if wanted > 0:
            block = None if entries else (self.settings.block_ms if block_ms is None else block_ms)
            try:
                response = self.client.xreadgroup(
                    self.group, self.consumer, {self.stream: ">"}, count=wanted, block=block
                )
            except ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise
                self.ensure_group()  # the stream was deleted (or Redis lost it): recreate and read next time
                response = []
            for _stream, messages in response or []:
                entries.extend(
                    Entry(message_id.decode(), fields[PAYLOAD_FIELD], 1) for message_id, fields in messages
                )
        return entries

    def _reclaim_stale(self, count: int) -> list[Entry]:
        """XAUTOCLAIM entries idle past claim_idle_ms; dead-letter those delivered too often."""
        now = time.monotonic()
        if now < self._next_reclaim_at:
            return []
        self._next_reclaim_at = now + min(self.settings.claim_idle_ms / 2000.0, 5.0)
        _cursor, claimed, _deleted = self.client.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=self.settings.claim_idle_ms,
            start_id="0-0", count=count,
        )
        if not claimed:
            return []
        deliveries = self._delivery_counts([message_id for message_id, _fields in claimed])
        entries: list[Entry] = []
        for message_id, fields in claimed:
            entry = Entry(message_id.decode(), fields[PAYLOAD_FIELD], deliveries.get(message_id.decode(), 1))
            if entry.deliveries > self.settings.max_deliveries:
                self.dead_letter(entry, f"delivered {entry.deliveries - 1} times without an ack")
            else:
                entries.append(entry)
        if self.metrics and entries:
            self.metrics.reclaimed.labels(self.stream).inc(len(entries))
        if entries:
            log.warning("reclaimed stale entries", extra={"stream": self.stream, "count": len(entries)})
        return entries

    def _delivery_counts(self, message_ids: Sequence[bytes]) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        for message_id in message_ids:
            pipe.xpending_range(self.stream, self.group, min=message_id, max=message_id, count=1)
        counts: dict[str, int] = {}
        for rows in pipe.execute():
            for row in rows:
                counts[row["message_id"].decode()] = int(row["times_delivered"])
        return counts

    def own_pending(self, count: int = 1000) -> list[Entry]:
        """Entries delivered to this consumer name and never acked, e.g. by a previous incarnation that
        crashed: a restarted consumer with the same name takes them back at once instead of waiting
        claim_idle_ms for XAUTOCLAIM."""
        if not self._group_ready:
            self.ensure_group()
        response = self.client.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=count)
        messages = [(message_id, fields) for _stream, rows in response or [] for message_id, fields in rows
                    if fields]  # an entry deleted after delivery comes back with no fields
        deliveries = self._delivery_counts([message_id for message_id, _fields in messages])
        return [Entry(message_id.decode(), fields[PAYLOAD_FIELD], deliveries.get(message_id.decode(), 1))
                for message_id, fields in messages]

    def touch(self, entries: Sequence[Entry | str]) -> None:
        """Reset the idle time of entries this consumer still holds (XCLAIM JUSTID, which leaves the
        delivery count alone), so that no XAUTOCLAIM, this consumer's own included, takes them back."""
        ids = [entry.id if isinstance(entry, Entry) else entry for entry in entries]
        if ids:
            self.client.xclaim(self.stream, self.group, self.consumer, 0, ids, justid=True)

    def ack(self, entries: Sequence[Entry | str]) -> int:
        """Acknowledge and delete entries, so they are never delivered again; returns how many."""
        ids = [entry.id if isinstance(entry, Entry) else entry for entry in entries]
        if not ids:
            return 0
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *ids)
        pipe.xdel(self.stream, *ids)
        acked, _deleted = pipe.execute()
        if self.metrics:
            self.metrics.acked.labels(self.stream).inc(acked)
        return int(acked)

    def dead_letter(self, entry: Entry, reason: str) -> str:
        """Move an entry to the dead-letter stream with its reason, atomically with its ack; the dead-letter
        stream keeps about dead_letter_max_length entries, dropping (and counting) the oldest."""
        pipe = self.client.pipeline(transaction=True)
        # XADD does not say how many entries MAXLEN trimmed: XLEN on both sides, in the same MULTI, does.
        pipe.xlen(self.dead_stream)
        pipe.xadd(
            self.dead_stream,
            {"p": entry.payload, "reason": reason[:2000], "source_id": entry.id, "deliveries": entry.deliveries},
            maxlen=self.settings.dead_letter_max_length,
            approximate=True,
        )
        pipe.xlen(self.dead_stream)
        pipe.xack(self.stream, self.group, entry.id)
        pipe.xdel(self.stream, entry.id)
        before, dead_id, after, _acked, _deleted = pipe.execute()
        self._count_trimmed(before + 1 - after)
        if self.metrics:
            self.metrics.dead_lettered.labels(self.stream, reason.split(":")[0][:60]).inc()
        log.error("dead-lettered entry", extra={"stream": self.stream, "entry": entry.id, "reason": reason})
        return dead_id.decode()

    def reject(self, payload: bytes, reason: str, source: str, dedup_key: str, *, ttl_s: int = 7 * 24 * 3600) -> str | None:
        """Dead-letter a payload that never reached the stream (e.g. a bad dataset line), once per dedup_key;
        returns the dead letter's id, or None when that key was already rejected."""
        key = f"{self.dead_stream}:rejected:{dedup_key}"
        added = self._reject_script(
            keys=[self.dead_stream, key],
            args=[payload, reason[:2000], source, ttl_s, self.settings.dead_letter_max_length],
        )
        if added == 0:
            return None
        dead_id, trimmed = added
        self._count_trimmed(int(trimmed))
        self._log_rejected([Rejection(payload, reason, source, dedup_key)])
        return dead_id.decode()

    def reject_many(self, rejections: Sequence[Rejection], *, ttl_s: int = 7 * 24 * 3600) -> int:
        """Dead-letter many payloads, each batch (REJECT_BATCH, fewer when long) once, in one script call.

        A batch's key is a hash of its dedup keys, so a restarted producer that meets the same rejections in
        the same order adds nothing. Returns how many were added.
        """
        added = 0
        for batch in _batches(rejections):
            batch_hash = hashlib.sha256("\n".join(r.dedup_key for r in batch).encode()).hexdigest()
            args: list[bytes | str | int] = [ttl_s, self.settings.dead_letter_max_length]
            for rejection in batch:
                args += [rejection.payload, rejection.reason[:2000], rejection.source]
            result = self._reject_batch_script(keys=[self.dead_stream, f"{self.dead_stream}:rejected:{batch_hash}"],
                                               args=args)
            if result == 0:
                continue
            self._count_trimmed(int(result[1]))
            self._log_rejected(batch)
            added += int(result[0])
        return added

    def _log_rejected(self, rejections: Sequence[Rejection]) -> None:
        """Count and log each rejection (the log keeps the reason of a dead letter the bound trims later)."""
        for rejection in rejections:
            if self.metrics:
                self.metrics.dead_lettered.labels(self.stream, rejection.reason.split(":")[0][:60]).inc()
            log.error("rejected payload", extra={"stream": self.stream, "source": rejection.source,
                                                 "reason": rejection.reason})

    def _count_trimmed(self, trimmed: int) -> None:
        """Count dead letters that MAXLEN dropped; a trim means a flood, so it is logged too."""
        if trimmed <= 0:
            return
        if self.metrics:
            self.metrics.dead_letters_trimmed.labels(self.stream).inc(trimmed)
        log.warning(
            "dead-letter stream full: oldest entries trimmed",
            extra={"stream": self.dead_stream, "trimmed": trimmed, "max_length": self.settings.dead_letter_max_length},
        )

    # ----------------------------------------------------------------------------------- inspecting
    def depth(self) -> int:
        """Entries in the stream: waiting plus delivered-but-unacked."""
        return int(self.client.xlen(self.stream))

    def pending(self) -> int:
        """Entries delivered to some consumer and not yet acked."""
        if not self._group_ready:
            self.ensure_group()
        return int(self.client.xpending(self.stream, self.group)["pending"])

    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The oldest dead-lettered entries, for inspection or replay."""
        rows = self.client.xrange(self.dead_stream, count=count)
        return [
            DeadLetter(
                id=dead_id.decode(),
                payload=fields[b"p"],
                reason=fields[b"reason"].decode(),
                source_id=fields[b"source_id"].decode(),
                deliveries=int(fields[b"deliveries"]),
            )
            for dead_id, fields in rows
        ]

    def update_gauges(self) -> None:
        """Refresh the depth and pending gauges from Redis."""
        if self.metrics:
            self.metrics.depth.labels(self.stream).set(self.depth())
            self.metrics.pending.labels(self.stream).set(self.pending())

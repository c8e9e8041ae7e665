"""Keep the tasks stream fed with prompts from the datasets, for E epochs, resumable from a saved position.

Each epoch visits every task once in an order drawn from (seed, epoch), so a resumed run continues the
same order. Tasks are enqueued with `put_unique` keyed by (run id, epoch, task id): a learner that
crashed after enqueueing but before its checkpoint re-enqueues nothing twice when it resumes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.data.build import require_dataset
from services.data.loader import DatasetError, DatasetItem, load_dataset, parse_line
from services.queues import QueueFull, StreamQueue
from services.schemas import TaskMessage, encode

log = logging.getLogger(__name__)


class FeederPosition(BaseModel):
    """Where the feeder stands: the epoch and the index into that epoch's shuffled order."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = Field(0, ge=0)
    index: int = Field(0, ge=0)
    enqueued: int = Field(0, ge=0, description="Tasks put on the stream so far, over all epochs.")


def epoch_order(num_tasks: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch `epoch` visits task indices 0..num_tasks-1 (a seeded permutation)."""
    return np.random.default_rng([seed, epoch]).permutation(num_tasks).tolist()


@dataclass(frozen=True)
class BadLine:
    """A dataset line that cannot become a task: where it is ('file:line'), its raw bytes, and why."""

    where: str
    raw: bytes
    reason: str


def _scan_lines(path: Path, seen: dict[str, Path]) -> tuple[list[DatasetItem], list[BadLine]]:
    """Every line of a JSONL file parsed on its own: the good items and each bad line with its reason."""
    items: list[DatasetItem] = []
    bad: list[BadLine] = []
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            item = parse_line(raw.decode("utf-8"), Path(path).parent)
        except UnicodeDecodeError as error:
            bad.append(BadLine(where, raw, f"not UTF-8 text (byte {error.start} is {raw[error.start]:#04x})"))
            continue
        except ValueError as error:
            bad.append(BadLine(where, raw, str(error)))
            continue
        if item.task.id in seen:
            first = seen[item.task.id]
            clash = "repeats an earlier line" if first == Path(path) else f"appears in both {first} and {path}"
            bad.append(BadLine(where, raw, f"task id {item.task.id!r} {clash}"))
            continue
        seen[item.task.id] = Path(path)
        items.append(item)
    return items, bad


def load_tasks(paths: Sequence[Path], bad_lines: list[BadLine] | None = None) -> list[tuple[DatasetItem, str]]:
    """Every task of every dataset file, with the folder its image path is relative to.

    A missing file raises MissingDataset, naming the command that builds it. A bad line (unparseable, failing
    the Task schema, not UTF-8, a missing or escaping image, a repeated id) raises, naming every bad line as
    file:line, unless `bad_lines` is given: then each is appended there with its reason (for the caller to
    dead-letter) and the good lines are returned.
    """
    tasks: list[tuple[DatasetItem, str]] = []
    first_seen: dict[str, Path] = {}
    for path in paths:
        root = str(Path(path).resolve().parent)
        # Read only: a missing file is an error naming its build command, never generated here.
        path = require_dataset(path)
        try:
            items: list[DatasetItem] | None = load_dataset(path)
        except (DatasetError, UnicodeDecodeError):  # load_dataset stops at a non-UTF-8 byte, naming no line
            items = None
        # Trajectory groups name their task by id alone, so ids must be unique across datasets too.
        if items is None or any(item.task.id in first_seen for item in items):
            items, bad = _scan_lines(path, first_seen)
            if bad_lines is None or not items:
                reasons = [f"{line.where}: {line.reason}" for line in bad] or [f"{path}:0: the file holds no tasks"]
                raise DatasetError(Path(path), reasons)
            bad_lines.extend(bad)
        else:
            first_seen.update({item.task.id: Path(path) for item in items})
        tasks.extend((item, root) for item in items)
    return tasks


def run_ahead_limit(max_groups_in_flight: int | None, groups_per_step: int, max_staleness: int) -> int:
    """Most groups fed but not yet trained: the setting, or groups_per_step x max(1, max_staleness)."""
    return max_groups_in_flight or groups_per_step * max(1, max_staleness)


def fill_target(limit: int, task_queue_fill: int, untrained_groups: int) -> int:
    """How many entries the tasks stream may hold now: within task_queue_fill and what the limit leaves.

    untrained_groups: groups generated and waiting for the learner. The tasks stream's own entries (waiting or
    in a worker's hands) count against the limit through the stream's depth, which `TaskFeeder.fill` subtracts.
    """
    return max(0, min(task_queue_fill, limit - untrained_groups))


class TaskFeeder:
    """Produce TaskMessages epoch by epoch and top the tasks stream up to a fill level."""

    def __init__(
        self, tasks: Sequence[tuple[DatasetItem, str]], epochs: int, seed: int, run_id: str,
        position: FeederPosition | None = None,
    ) -> None:
        if not tasks:
            raise ValueError("the feeder needs at least one task")
        self.tasks = list(tasks)
        self.epochs = epochs
        self.seed = seed
        self.run_id = run_id
        self.position = position.model_copy() if position else FeederPosition()
        self._order_epoch = -1
        self._order: list[int] = []

    @property
    def total(self) -> int:
        """Tasks over all epochs."""
        return len(self.tasks) * self.epochs

    @property
    def exhausted(self) -> bool:
        """True once every task of every epoch has been enqueued."""
        return self.position.epoch >= self.epochs

    def _current_order(self) -> list[int]:
        if self._order_epoch != self.position.epoch:
            self._order = epoch_order(len(self.tasks), self.seed, self.position.epoch)
            self._order_epoch = self.position.epoch
        return self._order

    def peek(self) -> TaskMessage:
        """The next task message, without advancing."""
        item, root = self.tasks[self._current_order()[self.position.index]]
        return TaskMessage(task=item.task, dataset_root=root, epoch=self.position.epoch)

    def advance(self) -> None:
        """Move past the current task (into the next epoch at the end of one)."""
        self.position.index += 1
        self.position.enqueued += 1
        if self.position.index >= len(self.tasks):
            self.position = FeederPosition(epoch=self.position.epoch + 1, index=0, enqueued=self.position.enqueued)

    def fill(self, queue: StreamQueue, target: int, codec: str = "msgpack") -> int:
        """Enqueue tasks until the stream holds `target` entries or the epochs run out; returns how many."""
        room = target - queue.depth()
        added = 0
        while room > 0 and not self.exhausted:
            message = self.peek()
            key = f"{self.run_id}:{message.epoch}:{message.task.id}"
            try:
                published = queue.put_unique(encode(message, codec), key, timeout_s=0.0)
            except QueueFull:
                break  # another producer took the room; try again on the next fill
            if published is not None:
                added += 1
                room -= 1
            self.advance()
        if added:
            log.debug("fed tasks", extra={"added": added, "epoch": self.position.epoch})
        return added

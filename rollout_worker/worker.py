"""The rollout worker's batch loop: tasks in, G budgeted rollouts per task, rewards, trajectory groups out.

Delivery: a task is acked only after its group is published (at-least-once), and the group is published
with put_unique keyed by group id, so a redelivered task (after a crash between publish and ack)
produces no second group. Weights change only between batches, so a group never mixes versions. A reward
server outage, or a trajectories stream that stays full (backpressure from a learner that is behind or
down), stalls the batch (its tasks stay pending, held by this worker) until it clears.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from reward_server.client import RETRYABLE_STATUSES, RewardClient, RewardServerError
from rollout_worker.budgets import assign_group_budgets
from rollout_worker.engine import PreparedRollout, RolloutEngine, TaskInputError
from rollout_worker.weights import WeightWatcher
from services.data.loader import resolve_image
from services.data.video import Video, load_video
from services.queues import Entry, QueueFull, StreamQueue
from services.schemas import (
    Budget,
    DecodeError,
    RewardBreakdown,
    Rollout,
    RolloutRequest,
    ScoreItem,
    TaskMessage,
    TrajectoryGroup,
    decode,
    encode,
)
from services.settings import RolloutSettings
from services.telemetry import RolloutMetrics

log = logging.getLogger(__name__)


@dataclass
class BatchReport:
    """What one batch did, for logs, tests and the benchmark."""

    tasks: int = 0
    rollouts: int = 0
    groups_published: int = 0
    duplicate_groups: int = 0
    dead_lettered: int = 0
    policy_version: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _AcceptedTask:
    entry: Entry
    message: TaskMessage
    group_id: str
    prepared: list[PreparedRollout]


def group_id_for(message: TaskMessage) -> str:
    """A group's id: one per task, epoch and attempt, so replays of the same message deduplicate while a task
    sent back for fresh rollouts (its earlier group went stale) gets a group of its own."""
    return f"{message.task.id}@e{message.epoch}" + (f"#a{message.attempt}" if message.attempt else "")


def check_dataset_root(root: Path, allowed: Sequence[Path]) -> Path:
    """The task's dataset folder, refused when it lies outside the configured roots: a TaskMessage names
    its own folder, so without a bound any producer could point the worker at any file it can read."""
    if allowed and not any(root.resolve().is_relative_to(Path(base).resolve()) for base in allowed):
        raise ValueError(f"dataset_root={str(root)!r} is outside rollout.dataset_roots={[str(b) for b in allowed]}")
    return root


def open_task_video(path: Path, max_pixels: int) -> Video:
    """The task's video (a frame folder or a file); one whose frames are above max_pixels each is refused."""
    video = load_video(path)
    height, width = video.frames.shape[1:3]
    if width * height > max_pixels:
        raise ValueError(f"video {path} has {width}x{height} = {width * height:,}-pixel frames, above "
                         f"rollout.max_image_pixels={max_pixels:,}")
    return video


def open_task_image(path: Path, max_pixels: int) -> Image.Image:
    """The task's image as RGB. An empty file, an image without pixels or one above max_pixels is refused
    with a clear reason before its pixels are decoded (PIL reads the size from the header)."""
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"image {path} is an empty file")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height == 0:
                raise ValueError(f"image {path} is {width}x{height}: it has no pixels")
            if width * height > max_pixels:
                raise ValueError(f"image {path} is {width}x{height} = {width * height:,} pixels, above "
                                 f"rollout.max_image_pixels={max_pixels:,}")
            return image.convert("RGB")
    except Image.DecompressionBombError as error:  # not an OSError: it would otherwise end the worker
        raise ValueError(f"image {path}: {error}") from None


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


class RolloutWorker:
    """One consumer of the tasks stream and producer of the trajectories stream."""

    def __init__(
        self,
        *,
        settings: RolloutSettings,
        budget_set: Sequence[Budget],
        engine: RolloutEngine,
        reward_client: RewardClient,
        tasks: StreamQueue,
        trajectories: StreamQueue,
        worker_id: str,
        watcher: WeightWatcher | None = None,
        metrics: RolloutMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.budget_set = list(budget_set)
        self.engine = engine
        self.reward_client = reward_client
        self.tasks = tasks
        self.trajectories = trajectories
        self.worker_id = worker_id
        self.watcher = watcher
        self.metrics = metrics
        self.stopping = threading.Event()  # set by a signal handler: give up waiting, leave tasks pending
        self._loop = asyncio.new_event_loop()

    @property
    def policy_version(self) -> int:
        """The weight version the engine runs now."""
        return self.watcher.version if self.watcher else 0

    def close(self) -> None:
        """Release the event loop and the reward client's connections."""
        self._loop.run_until_complete(self.reward_client.aclose())
        self._loop.close()

    def run_batch(self, block_ms: int | None = None) -> BatchReport:
        """Reload weights if a new version is out, then run one batch of tasks end to end."""
        report = BatchReport()
        with _timed(report, "weights"):
            if self.watcher:
                self.watcher.maybe_update()
        report.policy_version = self.policy_version
        with _timed(report, "consume"):
            entries = self.tasks.consume(self.settings.tasks_per_batch, block_ms=block_ms)
        if not entries:
            return report
        with _timed(report, "prepare"):
            accepted = [task for entry in entries if (task := self._accept(entry, report)) is not None]
        with _timed(report, "generate"):
            rollouts = self._generate(accepted, report)
        if not accepted:
            return report
        with _timed(report, "reward"):
            rewards = self._score(accepted, rollouts, report)
        if rewards is None:
            return report
        with _timed(report, "publish"):
            self._publish(accepted, rollouts, rewards, report)
        self._observe(rollouts, rewards, report)
        return report

    # ------------------------------------------------------------------------------------ stages
    def _accept(self, entry: Entry, report: BatchReport) -> _AcceptedTask | None:
        """Decode a task entry and open its image or video; dead-letter it with the reason when either fails."""
        try:
            message = decode(TaskMessage, entry.payload, self.tasks.settings.codec)
            root = check_dataset_root(Path(message.dataset_root), self.settings.dataset_roots)
            path = resolve_image(root, message.task.media)
            if message.task.is_video:
                image = open_task_video(path, self.settings.max_image_pixels)
            else:
                image = open_task_image(path, self.settings.max_image_pixels)
        except (DecodeError, ValueError, OSError) as error:
            self._dead_letter(entry, f"{type(error).__name__}: {error}", report)
            return None
        group_id = group_id_for(message)
        budgets = assign_group_budgets(
            self.budget_set, self.settings.group_size, self.settings.budget_assignment,
            group_index=_stable_int(group_id), seed=self.settings.seed,
        )
        prepared = [
            PreparedRollout(
                RolloutRequest(
                    task=message.task, dataset_root=message.dataset_root, budget=budget, group_id=group_id,
                    rollout_index=index, seed=_stable_int(f"{self.settings.seed}:{group_id}:{index}"),
                ),
                image,
            )
            for index, budget in enumerate(budgets)
        ]
        return _AcceptedTask(entry, message, group_id, prepared)

    def _generate(self, accepted: list[_AcceptedTask], report: BatchReport) -> list[list[Rollout]]:
        """All tasks' rollouts in one engine call; when the engine refuses the batch, each task runs alone and
        exactly the tasks that fail alone are dead-lettered (removed from `accepted`)."""
        if not accepted:
            return []
        flat = [prepared for task in accepted for prepared in task.prepared]
        try:
            generated = self.engine.generate(flat, self.policy_version)
        except TaskInputError as error:
            # An engine error does not reliably say which request it came from (matching a task id in its
            # text blames "task-1" for "task-11"), and any one of a task's G requests may be the bad one.
            log.warning("engine refused the batch; running its tasks one at a time",
                        extra={"error": str(error), "tasks": len(accepted)})
            return self._generate_one_by_one(accepted, report)
        per_task, start = [], 0
        for task in accepted:
            per_task.append(generated[start : start + len(task.prepared)])
            start += len(task.prepared)
        return per_task

    def _generate_one_by_one(self, accepted: list[_AcceptedTask], report: BatchReport) -> list[list[Rollout]]:
        """Each task's G rollouts in an engine call of its own: a task refused alone is dead-lettered with the
        engine's reason, the others keep these rollouts (same weights, so nothing is generated twice)."""
        per_task = []
        for task in list(accepted):
            try:
                per_task.append(self.engine.generate(task.prepared, self.policy_version))
            except TaskInputError as error:
                accepted.remove(task)
                self._dead_letter(task.entry, f"TaskInputError: {error}", report)
        return per_task

    def _score(
        self, accepted: list[_AcceptedTask], rollouts: list[list[Rollout]], report: BatchReport
    ) -> list[RewardBreakdown] | None:
        """The batch's rewards, waiting out a reward-server outage while holding its tasks (touched, so no
        other worker reclaims them). A refusal no retry can fix (a 4xx) dead-letters the batch's tasks with
        the server's reason. None when the batch did not get rewards (refused, or the worker is stopping)."""
        items = self._score_items(accepted, rollouts)
        delay = self.reward_client.settings.client_backoff_s
        while True:
            try:
                return self._loop.run_until_complete(self.reward_client.score(items))
            except RewardServerError as error:
                if error.status is not None and error.status not in RETRYABLE_STATUSES:
                    for task in accepted:
                        self._dead_letter(task.entry, f"RewardServerError: {error}", report)
                    return None
                log.warning("reward server unavailable; holding the batch", extra={"error": str(error),
                                                                                   "retry_in_s": delay})
            if not self._hold(accepted, delay):
                return None
            delay = min(delay * 2, self.reward_client.settings.client_backoff_cap_s)

    def _hold(self, held: list[_AcceptedTask], delay_s: float) -> bool:
        """Wait delay_s holding these tasks (touched, so that no other worker reclaims them meanwhile); False
        when the worker is stopping instead: the tasks then stay pending for a restarted worker."""
        if self.stopping.wait(delay_s):
            return False
        self.tasks.touch([task.entry for task in held])
        return True

    def _publish_group(self, group: TrajectoryGroup, held: list[_AcceptedTask]) -> bool | None:
        """put_unique the group, holding the batch while the trajectories stream stays full (the learner is
        behind or down); True when published, False when it already was, None when stopping first."""
        delay = self.reward_client.settings.client_backoff_s
        while True:
            try:
                return self.trajectories.put_unique(encode(group, self.trajectories.settings.codec),
                                                    group.group_id) is not None
            except QueueFull as error:
                log.warning("trajectories stream full; holding the batch", extra={"error": str(error)})
            if not self._hold(held, delay):
                return None
            delay = min(delay * 2, self.reward_client.settings.client_backoff_cap_s)

    def _score_items(self, accepted: list[_AcceptedTask], rollouts: list[list[Rollout]]) -> list[ScoreItem]:
        return [
            ScoreItem(
                completion_text=rollout.completion_text, answer=task.message.task.answer,
                answer_type=task.message.task.answer_type, choices=task.message.task.choices,
                answers=task.message.task.answers,
                visual_tokens_kept=rollout.visual_tokens_kept, visual_tokens_total=rollout.visual_tokens_total,
                group=task.message.task.id,  # a batch holds one group per task
            )
            for task, group in zip(accepted, rollouts)
            for rollout in group
        ]

    def _publish(
        self,
        accepted: list[_AcceptedTask],
        rollouts: list[list[Rollout]],
        rewards: list[RewardBreakdown],
        report: BatchReport,
    ) -> None:
        """Publish each task's group (once per group id), then ack its task entry."""
        offset = 0
        for index, (task, group_rollouts) in enumerate(zip(accepted, rollouts)):
            group_rewards = rewards[offset : offset + len(group_rollouts)]
            offset += len(group_rollouts)
            group = TrajectoryGroup(
                group_id=task.group_id, task=task.message.task, epoch=task.message.epoch,
                attempt=task.message.attempt, rollouts=group_rollouts, rewards=group_rewards, policy_version=self.policy_version,
                worker_id=self.worker_id,
            )
            published = self._publish_group(group, accepted[index:])
            if published is None:
                return  # stopping: this task and the later ones stay pending
            if not published:
                report.duplicate_groups += 1
                log.warning("group already published; acking the redelivered task", extra={"group": task.group_id})
            else:
                report.groups_published += 1
            self.tasks.ack([task.entry])
            report.tasks += 1
            report.rollouts += len(group_rollouts)

    def _dead_letter(self, entry: Entry, reason: str, report: BatchReport) -> None:
        self.tasks.dead_letter(entry, reason)
        report.dead_lettered += 1
        if self.metrics:
            self.metrics.task_failures.labels(reason.split(":")[0][:40]).inc()

    def _observe(self, rollouts: list[list[Rollout]], rewards: list[RewardBreakdown], report: BatchReport) -> None:
        if not self.metrics:
            return
        flat = [rollout for group in rollouts for rollout in group]
        for rollout in flat:
            label = rollout.budget.label
            self.metrics.rollouts.labels(label).inc()
            self.metrics.generated_tokens.inc(len(rollout.completion_token_ids))
            self.metrics.visual_tokens_kept.inc(rollout.visual_tokens_kept)
            self.metrics.visual_tokens_seen.inc(rollout.visual_tokens_total)
            self.metrics.reduction_ratio.labels(label).observe(rollout.reduction_ratio)
        for reward in rewards:
            for component in ("accuracy", "efficiency", "format", "total"):
                self.metrics.reward.labels(component).observe(getattr(reward, component))
        for phase, seconds in report.phase_seconds.items():
            self.metrics.batch_phase_seconds.labels(phase).observe(seconds)
        self.tasks.update_gauges()
        self.trajectories.update_gauges()



@contextmanager
def _timed(report: BatchReport, phase: str) -> Iterator[None]:
    """Add the wall time of the block to report.phase_seconds[phase]."""
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        report.phase_seconds[phase] = report.phase_seconds.get(phase, 0.0) + elapsed

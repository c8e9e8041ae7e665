"""The learner's loop: feed tasks, collect trajectory groups, take GRPO steps, publish weights, checkpoint.

Orchestration only (torchtune's recipe style): the math is `learner.algorithms` + `learner.step`, the
model code `services.modeling`, the transport `services.queues` / `services.weights`.

Delivery: a trained group's id joins the trained set that every checkpoint stores, and its stream entry
is acked only once that checkpoint is on disk (offsets commit with the state). A learner that crashes
takes its unacked entries back when it restarts (same consumer name) and trains each group whose step the
checkpoint lost exactly once more; a redelivered or replayed group whose id the checkpoint holds is never
trained twice. Every group ends trained, or dead-lettered with its reason (stale, unusable, undecodable).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import get_scheduler

from learner.algorithms import LossConfig, filter_stale
from learner.batching import rollout_statistics
from learner.checkpoint import (
    TrainingState,
    latest_checkpoint,
    load_training_state,
    restore_rng_states,
    save_checkpoint,
)
from learner.feeder import BadLine, TaskFeeder, fill_target, load_tasks, run_ahead_limit
from learner.progress import format_step
from learner.publishing import BackgroundPublisher, publish_policy, weights_snapshot
from learner.sharding import (
    SHARDED_DIR,
    full_state_dict,
    load_full_optimizer_state,
    load_sharded,
    shard_policy,
)
from learner.step import PixelCache, PixelInputs, StepConfig, grpo_step
from services.data.loader import open_image, resolve_image
from services.data.video import load_video
from services.modeling import load_model_and_processor
from services.modeling.loading import checkpoint_dtype
from services.modeling.pruned_forward import (
    image_inputs,
    placeholder_token_id,
    video_inputs,
    visual_tokens_per_image,
)
from services.queues import Entry, Rejection, StreamQueue, connect_redis
from services.schemas import DecodeError, TaskMessage, TrajectoryGroup, WeightVersion, decode, encode
from services.settings.models import Settings
from services.sparsity.scorers import build_scorer
from services.telemetry import Telemetry
from services.weights import latest_weight_version

log = logging.getLogger("learner")

SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def configure_determinism(seed: int, deterministic: bool) -> None:
    """Seed python/numpy/torch and ask torch for deterministic kernels (bit-exact CPU resume)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # warn_only: a few CUDA ops have no deterministic kernel; on the CPU every op we use has one.
        torch.use_deterministic_algorithms(True, warn_only=True)


def step_config(settings: Settings) -> StepConfig:
    """The step and loss knobs of the learner settings."""
    cfg = settings.learner
    loss = LossConfig(
        clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high, dual_clip_c=cfg.dual_clip_c, beta=cfg.beta,
        kl_ratio_weighted=cfg.kl_ratio_weighted, normalization=cfg.normalization, tis_cap=cfg.tis_cap,
        max_completion_len=settings.rollout.max_new_tokens,
    )
    return StepConfig(
        loss=loss, micro_batch_groups=cfg.micro_batch_groups, micro_batch_tokens=cfg.micro_batch_tokens,
        grad_clip=cfg.grad_clip, adv_std=cfg.adv_std, adv_eps=cfg.adv_eps, drop_zero_variance=cfg.drop_zero_variance,
        old_logprobs=cfg.old_logprobs, kept_mass_weight=cfg.kept_mass_weight,
        scorer=build_scorer(settings.sparsity.scorer, settings.sparsity.scorer_layer),
        compute_dtype=getattr(torch, cfg.dtype),
        reference_overlap=(cfg.device == "cpu") if cfg.reference_overlap is None else cfg.reference_overlap,
        share_prompts=cfg.share_prompts,
    )


@dataclass
class Batch:
    """Groups admitted for one step, the stream entries to ack after it, and what was turned away."""

    groups: list[TrajectoryGroup] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    turned_away: Counter = field(default_factory=Counter)


class Trainer:
    """Owns the policy, the frozen reference, the optimizer and the run's streams, checkpoints and log."""

    def __init__(
        self, settings: Settings, *, resume: bool = False, telemetry: Telemetry | None = None,
        on_step: Callable[[dict[str, object]], None] | None = None, rank: int = 0, world_size: int = 1,
    ) -> None:
        self.settings, self.cfg = settings, settings.learner
        self.on_step = on_step
        # Sharded (Ray Train, W > 1): every rank holds its shards of the policy (learner.sharding) and steps; only
        # rank 0 talks to the streams, writes the published weights and the checkpoint's files, and logs. Publishing
        # and checkpointing gather or save shards, so every rank takes part in them.
        self.rank, self.world_size, self.is_leader = rank, world_size, rank == 0
        cfg = self.cfg
        self.run_dir = Path(cfg.run_dir or Path("runs") / settings.run_name)
        # Absolute: the announced uri must resolve in workers that run elsewhere.
        self.weights_root = Path(cfg.weights_root or self.run_dir / "weights").resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        configure_determinism(cfg.seed, cfg.deterministic)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        checkpoint, torch_state = self._restore(resume)
        base = Path(self.state.base_model_path)
        sharded_checkpoint = checkpoint is not None and (checkpoint / SHARDED_DIR).is_dir()
        # A sharded checkpoint holds the weights as DCP shards (loaded below); the architecture comes from the base.
        load_from = checkpoint if checkpoint is not None and not sharded_checkpoint else base
        self.publish_dtype = checkpoint_dtype(base)  # what workers load: the checkpoint's own dtype
        self.policy, self.processor = load_model_and_processor(
            load_from, getattr(torch, cfg.master_dtype), cfg.device, cfg.vision_attention
        )
        if cfg.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.policy.train()  # HF checkpoints only in training mode; Qwen2.5-VL has no dropout to turn on
        if world_size > 1:
            shard_policy(self.policy)
        self.reference = None
        if cfg.beta > 0:
            self.reference, _ = load_model_and_processor(base, getattr(torch, cfg.dtype), cfg.device,
                                                         cfg.vision_attention)
            self.reference.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad], lr=cfg.learning_rate,
            betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
        )
        bad_lines: list[BadLine] = []
        tasks = load_tasks(cfg.datasets, bad_lines if cfg.bad_task_lines == "dead_letter" else None)
        self.image_roots = {item.task.id: root for item, root in tasks}
        self.feeder = TaskFeeder(tasks, cfg.epochs, cfg.seed, self.state.run_id, self.state.feeder)
        total_steps = cfg.max_steps or max(1, math.ceil(self.feeder.total / cfg.groups_per_step))
        self.scheduler = get_scheduler(SCHEDULES[cfg.lr_schedule], self.optimizer, cfg.warmup_steps, total_steps)
        if sharded_checkpoint:
            load_sharded(checkpoint / SHARDED_DIR, self.policy, self.optimizer, torch_state["optimizer"]["param_groups"])
        elif checkpoint is not None and world_size > 1:
            load_full_optimizer_state(self.policy, self.optimizer, torch_state["optimizer"])
        elif checkpoint is not None:
            self.optimizer.load_state_dict(torch_state["optimizer"])
        if checkpoint is not None:
            self.scheduler.load_state_dict(torch_state["scheduler"])
            restore_rng_states(torch_state["rng"])
        self.trained_ids = dict(self.state.trained_groups)  # group id -> the version that made it
        self.pixels = PixelCache(self._pixel_inputs)
        self.step_config = step_config(settings)
        self.telemetry = telemetry or Telemetry("learner")
        self.client = connect_redis(settings.redis)
        queues = settings.queues
        self.tasks_queue = StreamQueue(self.client, queues.tasks_stream, queues, metrics=self.telemetry.queue)
        self.trajectories = StreamQueue(
            self.client, queues.trajectories_stream, queues, group="learner",
            consumer=f"learner-{settings.run_name}", metrics=self.telemetry.queue,
        )
        self.publisher = BackgroundPublisher()
        self.attempts_key = f"sf:{settings.run_name}:learner:step-attempts"  # trajectory entry id -> unfinished steps
        self.log_path = self.run_dir / "metrics.jsonl"
        self._checkpointed_step = self.state.step if checkpoint is not None else -1
        self.held: list[Entry] = []  # trained entries, acked once a checkpoint holds their step
        self.recovered: list[Entry] = []  # a crashed predecessor's unacked entries, admitted first
        if self.is_leader:
            self.tasks_queue.reject_many([
                Rejection(line.raw, f"bad task line {line.where}: {line.reason}", line.where,
                          f"{self.state.run_id}:{line.where}")
                for line in bad_lines
            ])
            self.recovered = self.trajectories.own_pending()
            if checkpoint is not None:
                self._roll_back_log()
        self._catch_up_version()
        self.telemetry.weights.policy_version.labels("learner").set(self.state.policy_version)
        self.run_ahead_limit = run_ahead_limit(cfg.max_groups_in_flight, cfg.groups_per_step, cfg.max_staleness)
        self.telemetry.learner.groups_in_flight_limit.set(self.run_ahead_limit)

    def _restore(self, resume: bool) -> tuple[Path | None, dict]:
        """Set self.state from the latest checkpoint (when resuming and there is one) or afresh."""
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if checkpoint is not None:
            self.state, torch_state = load_training_state(checkpoint)
            return checkpoint, torch_state
        if resume:
            log.warning("no checkpoint to resume from; starting fresh", extra={"run_dir": str(self.run_dir)})
        base = Path(self.cfg.model_path or self.settings.rollout.model_path)
        self.state = TrainingState(run_id=uuid.uuid4().hex, base_model_path=str(base.resolve()))
        return None, {}

    def _roll_back_log(self) -> None:
        """Move the step records past the checkpoint (their steps are redone) to metrics.rolled-back.jsonl,
        so metrics.jsonl always tells the history the weights went through."""
        if not self.log_path.is_file():
            return
        kept, rolled_back = [], []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                (kept if json.loads(line).get("step", 0) <= self.state.step else rolled_back).append(line)
        if rolled_back:
            with (self.run_dir / "metrics.rolled-back.jsonl").open("a", encoding="utf-8") as handle:
                handle.write("\n".join(rolled_back) + "\n")
            staging = self.log_path.with_name(self.log_path.name + ".tmp")
            staging.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            staging.replace(self.log_path)
            log.warning("rolled back step records past the checkpoint",
                        extra={"checkpoint_step": self.state.step, "records": len(rolled_back)})

    def _catch_up_version(self) -> None:
        """Publish the policy as a version above the run's announced one when that is ahead of ours.

        After a crash the checkpoint can be older than the last published version, which workers already
        run; going on from the checkpoint's number would make their groups look like they came from the
        future. Re-publishing the checkpoint's weights under the next number rolls the workers back to them.
        """
        announced = latest_weight_version(self.client, self.settings.run_name) if self.is_leader else None
        if self.world_size > 1:  # publishing gathers shards: every rank must take the same decision
            import torch.distributed as dist

            holder: list[object] = [announced]
            dist.broadcast_object_list(holder, src=0)
            announced = holder[0]
        if announced is not None and announced.version > self.state.policy_version:
            log.warning("announced weights are ahead of the checkpoint; republishing it as the next version",
                        extra={"announced": announced.version, "checkpoint_version": self.state.policy_version})
            self.state.policy_version = announced.version
            self.publish()
            self.publisher.wait()  # announced before training resumes, so workers roll back first

    # ------------------------------------------------------------------------------------------ inputs
    def _pixel_inputs(self, group: TrajectoryGroup) -> PixelInputs:
        """Pixel values and grid of the group's task image (a video: also its seconds per temporal slot), from the
        model's own processor."""
        path = resolve_image(Path(self.image_roots[group.task.id]), group.task.media)
        if group.task.is_video:
            return video_inputs(self.processor, load_video(path))
        return image_inputs(self.processor, open_image(path))  # CPU; the step moves each vision chunk once

    def _group_problem(self, group: TrajectoryGroup) -> str | None:
        """Why a group cannot be replayed on this model, or None when it can."""
        if group.task.id not in self.image_roots:
            return f"unknown task {group.task.id!r}: not in learner.datasets"
        if len(group.rollouts) < 2:
            return f"group {group.group_id!r} has {len(group.rollouts)} rollout(s); GRPO needs >= 2"
        total = sum(visual_tokens_per_image(self.policy, self.pixels.get(group)[1]))
        placeholder = placeholder_token_id(self.policy, video=group.task.is_video)
        for rollout in group.rollouts:
            placeholders = rollout.prompt_token_ids.count(placeholder)
            if rollout.visual_tokens_total != total or placeholders not in (total, rollout.visual_tokens_kept):
                return (f"rollout {rollout.rollout_index}: visual_tokens_total={rollout.visual_tokens_total} and "
                        f"{placeholders} placeholders do not fit the image's {total} visual tokens")
        return None

    # ------------------------------------------------------------------------------------------ collecting
    def _feed(self) -> None:
        """Top the tasks stream up, but never past the run-ahead limit of groups fed and not yet trained."""
        untrained = max(0, self.trajectories.depth() - len(self.held))  # held entries are trained, unacked
        target = fill_target(self.run_ahead_limit, self.cfg.task_queue_fill, untrained)
        self.feeder.fill(self.tasks_queue, target, self.settings.queues.codec)
        self.telemetry.learner.groups_in_flight.set(self.tasks_queue.depth() + untrained)

    def _drained(self, batch: Batch) -> bool:
        """Every task of every epoch is enqueued, none is waiting or in a worker's hands (each became a group
        or a dead letter), and the trajectories stream holds no group beyond the ones this learner holds."""
        if not self.feeder.exhausted or self.tasks_queue.depth() > 0:
            return False
        # Read after the tasks stream: a worker publishes a task's group before it acks the task.
        return self.trajectories.depth() <= len(self.held) + len(batch.entries)

    def _admit(self, entry: Entry, batch: Batch) -> None:
        if any(entry.id == held.id for held in (*self.held, *batch.entries)):
            return  # our own entry, redelivered: it is trained (or about to be) and acked with a checkpoint
        # Poison is an entry that was in max_deliveries steps that never finished. The delivery count alone would
        # also count this learner's own restarts, which re-read their pending entries (and raise the count).
        attempts = int(self.client.hget(self.attempts_key, entry.id) or 0)
        if attempts >= self.settings.queues.max_deliveries:
            self.trajectories.dead_letter(entry, f"in {attempts} learner steps that never finished")
            self.client.hdel(self.attempts_key, entry.id)
            batch.turned_away["poison"] += 1
            return
        try:
            group = decode(TrajectoryGroup, entry.payload, self.settings.queues.codec)
        except DecodeError as error:
            self.trajectories.dead_letter(entry, f"undecodable: {error}")
            batch.turned_away["undecodable"] += 1
            return
        if group.group_id in self.trained_ids or any(g.group_id == group.group_id for g in batch.groups):
            self.trajectories.ack([entry])
            batch.turned_away["duplicate"] += 1
            return
        try:
            fresh = bool(filter_stale(torch.tensor([group.policy_version]), self.state.policy_version,
                                      self.cfg.max_staleness)[0])
            problem = self._group_problem(group)
        except (ValueError, OSError) as error:
            fresh, problem = True, str(error)
        if problem is not None:
            self.trajectories.dead_letter(entry, f"unusable group: {problem}")
            batch.turned_away["unusable"] += 1
        elif not fresh:
            self._turn_away_stale(entry, group, batch)
        else:
            batch.groups.append(group)
            batch.entries.append(entry)

    def _turn_away_stale(self, entry: Entry, group: TrajectoryGroup, batch: Batch) -> None:
        """Send a stale group's task back for fresh rollouts, or dead-letter it once its retries are spent.

        A valid task must end trained: the group is replaced, not dropped, up to learner.stale_retries times.
        """
        why = (f"group {group.group_id!r} made by v{group.policy_version}, learner at v{self.state.policy_version}, "
               f"max_staleness={self.cfg.max_staleness}")
        self.telemetry.learner.stale_groups_dropped.inc()
        batch.turned_away["stale"] += 1
        if group.attempt < self.cfg.stale_retries:
            attempt = group.attempt + 1
            message = TaskMessage(task=group.task, dataset_root=self.image_roots[group.task.id], epoch=group.epoch,
                                  attempt=attempt)
            key = f"{self.state.run_id}:{group.epoch}:{group.task.id}:a{attempt}"
            self.tasks_queue.put_unique(encode(message, self.settings.queues.codec), key)
            self.trajectories.ack([entry])  # replaced by the fresh attempt, which carries the task from here
            log.info("stale group sent back for fresh rollouts", extra={"why": why, "attempt": attempt})
            return
        # Dead-lettered, not just dropped: the task is accounted for, and can be replayed.
        self.trajectories.dead_letter(entry, f"stale after {group.attempt} fresh attempts: {why}")
        self.state.groups_done += 1

    def collect_batch(self) -> Batch:
        """Block until groups_per_step usable groups arrive (fewer at the end of the data or on idle timeout)."""
        batch, idle_since = Batch(), time.monotonic()
        while len(batch.groups) < self.cfg.groups_per_step:
            self._feed()
            self.trajectories.touch([*self.held, *batch.entries])  # ours: no XAUTOCLAIM may take them back
            wanted = self.cfg.groups_per_step - len(batch.groups)
            entries, self.recovered = self.recovered[:wanted], self.recovered[wanted:]
            entries = entries or self.trajectories.consume(wanted)
            if entries:
                idle_since = time.monotonic()
                for entry in entries:
                    self._admit(entry, batch)
                continue
            if self._drained(batch):
                break
            if self.cfg.idle_timeout_s and time.monotonic() - idle_since > self.cfg.idle_timeout_s:
                log.warning("no trajectory groups arrived", extra={"idle_s": self.cfg.idle_timeout_s})
                break
        return batch

    # ------------------------------------------------------------------------------------------ stepping
    def train_on(self, batch: Batch) -> dict[str, object]:
        """One optimizer step on the batch; ack it, publish and checkpoint on cadence; return the log record."""
        lags = [self.state.policy_version - group.policy_version for group in batch.groups]
        ids = [entry.id for entry in batch.entries]
        if self.is_leader and ids:  # counts only if the step never finishes (see _admit)
            pipe = self.client.pipeline(transaction=False)
            for entry_id in ids:
                pipe.hincrby(self.attempts_key, entry_id, 1)
            pipe.execute()
        started = time.perf_counter()
        metrics = grpo_step(self.policy, self.reference, self.optimizer, self.scheduler, batch.groups,
                            self.pixels, self.step_config, rank=self.rank, world_size=self.world_size)
        step_s = time.perf_counter() - started
        if not self.is_leader:
            return self._follow(batch)
        if ids:
            self.client.hdel(self.attempts_key, *ids)
        self.held.extend(batch.entries)
        self.state.step += 1
        self.state.groups_done += len(batch.groups)
        self.state.groups_trained += len(batch.groups)
        self.trained_ids.update({group.group_id: group.policy_version for group in batch.groups})
        record: dict[str, object] = {
            "step": self.state.step, "time": time.time(), "step_seconds": step_s, **metrics,
            **rollout_statistics(batch.groups), "staleness_mean": sum(lags) / len(lags), "staleness_max": max(lags),
            "turned_away": dict(batch.turned_away), "epoch": self.feeder.position.epoch,
            "group_ids": [group.group_id for group in batch.groups],
        }
        if self.state.step % self.cfg.publish_every == 0:
            record["publish_seconds"] = self.publish()
        if self.state.step % self.cfg.checkpoint_every == 0:
            record["checkpoint_seconds"] = self.checkpoint()
        record["policy_version"] = self.state.policy_version
        self._forget_stale_ids()
        self._report(record, lags)
        return record

    def _follow(self, batch: Batch) -> dict[str, object]:
        """A follower rank's bookkeeping after a step: the counters the leader keeps, without the I/O."""
        self.state.step += 1
        self.state.groups_trained += len(batch.groups)
        if self.state.step % self.cfg.publish_every == 0:
            self.publish()  # takes part in gathering the full state dict; rank 0 writes and announces
        if self.state.step % self.cfg.checkpoint_every == 0:
            self.checkpoint()
        return {"step": self.state.step}

    def _broadcast_groups(self, groups: list[TrajectoryGroup]) -> list[TrajectoryGroup]:
        """Rank 0's groups on every rank."""
        import torch.distributed as dist

        holder: list[object] = [groups if self.is_leader else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def _forget_stale_ids(self) -> None:
        # A redelivered group this old is dropped as stale anyway, so dedup needs only the fresh ids: the set
        # stays bounded by max_staleness versions' worth of groups however long the run.
        oldest = self.state.policy_version - self.cfg.max_staleness
        self.trained_ids = {gid: version for gid, version in self.trained_ids.items() if version >= oldest}

    def publish(self) -> float:
        """Hand a snapshot of the policy to the background publisher as the next weight version.

        Returns the seconds the step spent on it: the snapshot, plus waiting for the previous publish if that
        is still running. The version counts from here (the next groups' staleness is measured against it);
        workers see it once its bytes are written, hashed and announced.
        """
        started = time.perf_counter()
        version, step = self.state.policy_version + 1, self.state.step
        if self.world_size > 1:
            snapshot = full_state_dict(self.policy, self.publish_dtype)  # a collective; None on other ranks
            if snapshot is None:
                self.state.policy_version = version
                return time.perf_counter() - started
        else:
            snapshot = weights_snapshot(self.policy, self.publish_dtype)

        def write_and_announce() -> WeightVersion:
            weight_version, _timings = publish_policy(
                self.policy, self.processor,
                weights_root=self.weights_root, dtype=self.publish_dtype, state_dict=snapshot, version=version,
                learner_step=step, client=self.client, run_name=self.settings.run_name,
                keep_versions=self.cfg.keep_weight_versions,
            )
            self.telemetry.weights.bytes_published.inc(weight_version.num_bytes)
            return weight_version

        self.publisher.submit(write_and_announce)
        self.state.policy_version = version
        self.telemetry.weights.policy_version.labels("learner").set(version)
        return time.perf_counter() - started

    def checkpoint(self, final: bool = False) -> float:
        """Write a checkpoint of the current step; returns the seconds it took. Sharded, every rank writes its
        shards and only the final checkpoint gathers the HF weights (save_pretrained)."""
        started = time.perf_counter()
        self.state.feeder = self.feeder.position.model_copy()
        self.state.trained_groups = dict(self.trained_ids)
        save_checkpoint(self.run_dir, self.policy, self.processor, self.optimizer, self.scheduler, self.state,
                        keep=self.cfg.keep_checkpoints, rank=self.rank, world_size=self.world_size,
                        hf_weights=final or self.world_size == 1)
        self._checkpointed_step = self.state.step
        if not self.is_leader:
            return time.perf_counter() - started
        self.trajectories.ack(self.held)  # the checkpoint holds these groups' ids now
        self.held.clear()
        return time.perf_counter() - started

    def _report(self, record: dict[str, object], lags: list[int]) -> None:
        with self.log_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        learner = self.telemetry.learner
        learner.steps.inc()
        learner.step_seconds.observe(float(record["step_seconds"]))
        for part in ("loss", "policy_loss", "kl_penalty", "kept_mass_loss"):
            if part in record:
                learner.loss.labels(part).set(float(record[part]))
        learner.kl.set(float(record.get("kl_mean", 0.0)))
        learner.clip_fraction.set(float(record["clip_fraction"]))
        learner.grad_norm.set(float(record["grad_norm"]))
        learner.zero_variance_groups.inc(float(record["zero_variance_groups"]))
        for budget, value in record["accuracy_by_budget"].items():
            learner.accuracy.labels(budget).set(value)
        for budget, value in record["reduction_ratio_by_budget"].items():
            learner.reduction_ratio.labels(budget).set(value)
        for lag in lags:
            learner.policy_version_lag.observe(lag)
        log.info(format_step(record))
        if self.on_step is not None:
            self.on_step(record)

    # ------------------------------------------------------------------------------------------ the run
    def run(self) -> dict[str, object]:
        """Train until max_steps, the end of the epochs, or the idle timeout; checkpoint at the end."""
        records: list[dict[str, object]] = []
        while self.cfg.max_steps is None or self.state.step < self.cfg.max_steps:
            batch = self.collect_batch() if self.is_leader else Batch()
            if self.world_size > 1:
                batch.groups = self._broadcast_groups(batch.groups)
            if not batch.groups:
                break
            records.append(self.train_on(batch))
        self.publisher.wait()  # the last version is announced before the run reports it
        if self.state.step > 0 and (self.state.step != self._checkpointed_step or self.world_size > 1):
            self.checkpoint(final=True)  # sharded: rewritten with the HF weights even when the step has one
        summary = {"steps": self.state.step, "policy_version": self.state.policy_version,
                   "groups_trained": self.state.groups_trained, "run_dir": str(self.run_dir),
                   "losses": [record["loss"] for record in records if "loss" in record], "rank": self.rank}
        log.info("training finished", extra=summary | {"losses": None})
        return summary

    def close(self) -> None:
        """Finish the running publish and release the Redis connection."""
        try:
            self.publisher.close()
        finally:
            self.client.close()

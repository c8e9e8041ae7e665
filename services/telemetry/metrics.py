"""Every Prometheus metric the services export, defined once. Grafana dashboards use these names."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATIO_BUCKETS = tuple(round(0.05 * step, 2) for step in range(1, 21))
REWARD_BUCKETS = (-1, -0.5, 0, 0.1, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2)


@dataclass(frozen=True)
class QueueMetrics:
    depth: Gauge
    pending: Gauge
    put: Counter
    acked: Counter
    reclaimed: Counter
    dead_lettered: Counter
    dead_letters_trimmed: Counter
    backpressure_wait: Counter
    redis_errors: Counter


@dataclass(frozen=True)
class RolloutMetrics:
    rollouts: Counter
    generated_tokens: Counter
    visual_tokens_kept: Counter
    visual_tokens_seen: Counter
    reduction_ratio: Histogram
    reward: Histogram
    batch_phase_seconds: Histogram
    task_failures: Counter


@dataclass(frozen=True)
class RewardServerMetrics:
    requests: Counter
    request_seconds: Histogram
    items_scored: Counter
    errors: Counter
    inflight: Gauge
    reward: Histogram


@dataclass(frozen=True)
class LearnerMetrics:
    steps: Counter
    step_seconds: Histogram
    loss: Gauge
    kl: Gauge
    clip_fraction: Gauge
    grad_norm: Gauge
    accuracy: Gauge
    reduction_ratio: Gauge
    policy_version_lag: Histogram
    zero_variance_groups: Counter
    stale_groups_dropped: Counter
    groups_in_flight: Gauge
    groups_in_flight_limit: Gauge


@dataclass(frozen=True)
class WeightSyncMetrics:
    policy_version: Gauge
    sync_seconds: Histogram
    sync_failures: Counter
    bytes_published: Counter


class Telemetry:
    """One process's metric registry; each metric group is created on first use, once."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry if registry is not None else CollectorRegistry()

    def define(self, *groups: str) -> Telemetry:
        """Create the named metric groups now, so /metrics lists them before their first sample."""
        for group in groups:
            getattr(self, group)
        return self

    def exposition(self) -> bytes:
        """The registry in Prometheus text format, as /metrics serves it."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> int:
        """Start a /metrics HTTP endpoint in a thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])

    @cached_property
    def queue(self) -> QueueMetrics:
        r, lbl = self.registry, ["stream"]
        return QueueMetrics(
            depth=Gauge("sf_queue_depth", "Entries in a stream (waiting + pending).", lbl, registry=r),
            pending=Gauge("sf_queue_pending", "Delivered but not yet acked entries.", lbl, registry=r),
            put=Counter("sf_queue_entries_put", "Entries added to a stream.", lbl, registry=r),
            acked=Counter("sf_queue_entries_acked", "Entries acknowledged.", lbl, registry=r),
            reclaimed=Counter("sf_queue_reclaimed", "Entries reclaimed from idle consumers.", lbl, registry=r),
            dead_lettered=Counter(
                "sf_queue_dead_lettered", "Entries moved to the dead-letter stream.", ["stream", "reason"],
                registry=r,
            ),
            dead_letters_trimmed=Counter(
                "sf_queue_dead_letters_trimmed",
                "Oldest dead letters dropped to keep a dead-letter stream at queues.dead_letter_max_length.",
                lbl, registry=r,
            ),
            backpressure_wait=Counter(
                "sf_queue_backpressure_wait_seconds", "Time producers waited on a full stream.", lbl, registry=r
            ),
            redis_errors=Counter("sf_queue_redis_errors", "Redis errors seen (then retried).", lbl, registry=r),
        )

    @cached_property
    def rollout(self) -> RolloutMetrics:
        r = self.registry
        return RolloutMetrics(
            rollouts=Counter("sf_rollouts", "Rollouts generated.", ["budget"], registry=r),
            generated_tokens=Counter("sf_generated_tokens", "Completion tokens generated.", registry=r),
            visual_tokens_kept=Counter("sf_visual_tokens_kept", "Visual tokens kept by pruning.", registry=r),
            visual_tokens_seen=Counter("sf_visual_tokens_seen", "Visual tokens before pruning.", registry=r),
            reduction_ratio=Histogram(
                "sf_reduction_ratio", "Achieved reduction ratio per rollout.", ["budget"],
                buckets=RATIO_BUCKETS, registry=r,
            ),
            reward=Histogram(
                "sf_rollout_reward", "Reward of each rollout, by component.", ["component"],
                buckets=REWARD_BUCKETS, registry=r,
            ),
            batch_phase_seconds=Histogram(
                "sf_rollout_batch_phase_seconds", "Time of one worker batch, by phase.", ["phase"],
                buckets=LATENCY_BUCKETS, registry=r,
            ),
            task_failures=Counter("sf_rollout_task_failures", "Tasks that failed, by reason.", ["reason"],
                                  registry=r),
        )

    @cached_property
    def reward_server(self) -> RewardServerMetrics:
        r = self.registry
        return RewardServerMetrics(
            requests=Counter("sf_reward_server_requests", "Requests by status code.", ["status"], registry=r),
            request_seconds=Histogram(
                "sf_reward_server_request_seconds", "Request latency.", buckets=LATENCY_BUCKETS, registry=r
            ),
            items_scored=Counter("sf_reward_server_items_scored", "Rollouts scored.", registry=r),
            errors=Counter("sf_reward_server_errors", "Rejected or failed requests by kind.", ["kind"],
                           registry=r),
            inflight=Gauge("sf_reward_server_inflight_requests", "Requests being handled.", registry=r),
            reward=Histogram(
                "sf_reward", "Reward of each scored rollout, by component.", ["component"],
                buckets=REWARD_BUCKETS, registry=r,
            ),
        )

    @cached_property
    def learner(self) -> LearnerMetrics:
        r = self.registry
        return LearnerMetrics(
            steps=Counter("sf_learner_steps", "Optimizer steps taken.", registry=r),
            step_seconds=Histogram("sf_learner_step_seconds", "Wall time of one learner step.",
                                   buckets=LATENCY_BUCKETS, registry=r),
            loss=Gauge("sf_learner_loss", "Last step's loss, by part.", ["part"], registry=r),
            kl=Gauge("sf_kl", "Mean KL(policy || reference), k3 estimator.", registry=r),
            clip_fraction=Gauge("sf_clip_fraction", "Share of tokens whose ratio was clipped.", registry=r),
            grad_norm=Gauge("sf_grad_norm", "Gradient norm before clipping.", registry=r),
            accuracy=Gauge("sf_accuracy", "Accuracy of the last step's rollouts, by budget.", ["budget"],
                           registry=r),
            reduction_ratio=Gauge("sf_learner_reduction_ratio", "Mean reduction ratio, by budget.",
                                  ["budget"], registry=r),
            policy_version_lag=Histogram(
                "sf_policy_version_lag", "Learner version minus the version that made a group.",
                buckets=(0, 1, 2, 3, 4, 6, 8, 16), registry=r,
            ),
            zero_variance_groups=Counter("sf_zero_variance_groups", "Groups whose rewards were all equal.",
                                         registry=r),
            stale_groups_dropped=Counter("sf_stale_groups_dropped", "Groups turned away as too stale (their task is "
                                         "sent back for fresh rollouts, or dead-lettered once retries are spent).",
                                         registry=r),
            groups_in_flight=Gauge("sf_learner_groups_in_flight", "Tasks fed and not yet trained: waiting, in a "
                                   "worker's hands, or generated and waiting for the learner.", registry=r),
            groups_in_flight_limit=Gauge("sf_learner_groups_in_flight_limit", "The run-ahead bound on "
                                         "sf_learner_groups_in_flight (learner.max_groups_in_flight).", registry=r),
        )

    @cached_property
    def weights(self) -> WeightSyncMetrics:
        r = self.registry
        return WeightSyncMetrics(
            policy_version=Gauge("sf_policy_version", "Policy version this process runs.", ["service"],
                                 registry=r),
            sync_seconds=Histogram("sf_weight_sync_seconds", "Time to load a published weight version.",
                                   buckets=LATENCY_BUCKETS, registry=r),
            sync_failures=Counter("sf_weight_sync_failures", "Weight loads refused or failed, by reason.",
                                  ["reason"], registry=r),
            bytes_published=Counter("sf_weight_bytes_published", "Bytes of weights published.", registry=r),
        )

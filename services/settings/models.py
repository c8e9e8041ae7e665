"""Typed settings for every service: one model tree, each knob with a default and a description."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from services.schemas.models import Budget


class StrictModel(BaseModel):
    """A settings section that refuses unknown keys, so a typo fails loudly."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RedisSettings(StrictModel):
    url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL (redis:// or rediss:// for TLS).")
    password: SecretStr | None = Field(None, description="Redis password (AUTH); required unless insecure_local.")
    username: str | None = Field(None, description="Redis ACL user name, when ACLs are used.")
    tls: bool = Field(False, description="Use TLS even when the URL says redis://.")
    tls_ca_cert: Path | None = Field(None, description="CA bundle that signs the Redis server certificate.")
    insecure_local: bool = Field(
        False, description="Allow a Redis without a password; only accepted for a loopback host."
    )
    socket_timeout_s: float = Field(10.0, gt=0, description="Socket read/write timeout for Redis calls.")
    connect_retries: int = Field(8, ge=0, description="Retries with exponential backoff on connection loss.")
    retry_backoff_cap_s: float = Field(5.0, gt=0, description="Upper bound of one backoff sleep.")


class QueueSettings(StrictModel):
    tasks_stream: str = Field("sf:tasks", description="Stream the learner feeds with prompts.")
    trajectories_stream: str = Field("sf:trajectories", description="Stream the workers publish groups to.")
    dead_letter_suffix: str = Field(":dead", description="Suffix of each stream's dead-letter stream.")
    dead_letter_max_length: int = Field(
        100_000, ge=1,
        description="Entries a dead-letter stream keeps (about: trimmed by whole stream nodes); older ones are "
        "dropped and counted, so a flood of bad tasks cannot fill Redis.",
    )
    max_length: int = Field(10_000, ge=1, description="Entries (waiting + pending) a stream may hold.")
    claim_idle_ms: int = Field(
        120_000, ge=1, description="A pending entry idle this long is reclaimed from its (dead) consumer."
    )
    max_deliveries: int = Field(3, ge=1, description="Deliveries before an entry is dead-lettered.")
    block_ms: int = Field(1_000, ge=0, description="How long consume() blocks waiting for new entries.")
    backpressure_timeout_s: float = Field(
        60.0, ge=0, description="How long put() waits for room in a full stream before raising QueueFull."
    )
    codec: Literal["msgpack", "json"] = Field("msgpack", description="Wire format of queue payloads.")


class TelemetrySettings(StrictModel):
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Root log level.")
    log_format: Literal["json", "console"] = Field("console", description="Structured JSON or key=value.")
    metrics_host: str = Field("127.0.0.1", description="Interface the /metrics endpoint binds to.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Port of /metrics; 0 turns the exporter off.")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers the learner's step records also go to "
        "(services.telemetry.trackers; files under the run folder); each must be installed when chosen.",
    )
    tracker_project: str = Field(
        "sparsity-forcing", description="Weights & Biases project and MLflow experiment the runs are filed under."
    )


class RewardSettings(StrictModel):
    accuracy_weight: float = Field(1.0, ge=0, description="Weight of the correctness reward r_acc.")
    efficiency_weight: float = Field(
        0.5, ge=0, description="lambda: weight of the reduction-ratio reward, scaled by the answer's credit (none when wrong)."
    )
    format_weight: float = Field(0.0, ge=0, description="mu: weight of the optional format reward.")
    efficiency_gate: Literal["rollout", "group"] = Field(
        "group",
        description="What the efficiency reward is scaled by: the best credit in the rollout's group ('group', the "
        "paper's C = 1 when any rollout of the group is correct; items carry their group in ScoreItem.group), or the "
        "rollout's own answer credit ('rollout': a wrong answer earns none). 'group' measured better in "
        "bench/ablation.py (README: the paper's options, measured).",
    )
    number_rel_tolerance: float = Field(1e-6, ge=0, description="Relative tolerance of number answers.")
    number_abs_tolerance: float = Field(1e-9, ge=0, description="Absolute tolerance of number answers.")
    format_timeout_s: float = Field(
        0.05, gt=0, description="Longest a required_format regex may run on one completion (ReDoS guard)."
    )


class RewardServerSettings(StrictModel):
    host: str = Field("127.0.0.1", description="Interface the reward server binds to.")
    port: int = Field(8100, ge=0, le=65535, description="Port of the reward server.")
    url: str = Field("http://127.0.0.1:8100", description="Where clients reach the reward server.")
    auth_token: SecretStr | None = Field(None, description="Bearer token clients must send.")
    auth_required: bool = Field(True, description="Refuse requests without the bearer token.")
    max_batch_items: int = Field(1024, ge=1, description="Most rollouts one /v1/score request may carry.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest accepted request body.")
    max_inflight_requests: int = Field(64, ge=1, description="Requests in flight before shedding with 503.")
    client_timeout_s: float = Field(10.0, gt=0, description="Client-side timeout of one request.")
    client_retries: int = Field(5, ge=0, description="Client retries with backoff on errors and 429/503.")
    client_backoff_s: float = Field(0.1, gt=0, description="First client retry delay; doubles each retry.")
    client_backoff_cap_s: float = Field(5.0, gt=0, description="Longest single client retry delay.")
    shed_retry_after_s: int = Field(
        1, ge=0, description="Retry-After seconds sent with a 503 (load shed, or past score_deadline_s)."
    )
    body_timeout_s: float = Field(
        10.0, gt=0, description="Longest a client may take to send a request body (slow-client guard)."
    )
    score_threads: int = Field(
        4, ge=1, description="Threads that parse and score request bodies off the event loop; more requests wait."
    )
    score_deadline_s: float = Field(
        5.0, gt=0,
        description="Longest a request may wait for a scoring thread and be parsed and scored once its body has "
        "arrived; past it the server answers 503 + Retry-After (keep it below client_timeout_s).",
    )
    rewards: RewardSettings = Field(default_factory=RewardSettings, description="Reward weights.")


class RolloutSettings(StrictModel):
    model_path: Path = Field(Path("assets/tiny-qwen25vl"), description="HF folder of the policy to start from.")
    worker_id: str | None = Field(None, description="Consumer name in the tasks group; default host-pid.")
    group_size: int = Field(8, ge=1, le=64, description="G: rollouts per prompt, one budget each.")
    budget_assignment: Literal["round_robin", "sampled"] = Field(
        "round_robin", description="How a group's G budgets are drawn from the budget set."
    )
    tasks_per_batch: int = Field(8, ge=1, description="Tasks expanded into one vLLM generate call.")
    max_new_tokens: int = Field(16, ge=1, description="Completion length cap.")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Task images above this many pixels are dead-lettered before decoding."
    )
    dataset_roots: list[Path] = Field(
        default_factory=list,
        description="Folders a task's dataset_root must lie in (others are dead-lettered); empty allows any.",
    )
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int = Field(0, description="Base seed of budget sampling and vLLM sampling.")
    weights_poll_s: float = Field(1.0, ge=0, description="How often to check for a new weight version (0: every batch).")
    vllm_kv_cache_gb: float = Field(1.0, gt=0, description="KV-cache size on the CPU backend (GiB).")
    vllm_gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM share of GPU memory.")
    vllm_max_model_len: int = Field(2048, ge=64, description="Longest prompt + completion.")
    vllm_enforce_eager: bool = Field(True, description="No CUDA graphs / compilation (required on CPU).")
    vllm_dtype: str = Field("auto", description="Model dtype for vLLM ('auto', 'float32', 'bfloat16').")
    vllm_in_process: bool | None = Field(
        None,
        description="Run vLLM's engine core inside the worker's process (VLLM_ENABLE_V1_MULTIPROCESSING=0). Its "
        "separate processes busy-poll shared memory for a second after each step, about one core on a small CPU "
        "box; None: in process on CPU, separate processes on GPU (where they overlap scheduling with compute).",
    )


def paper_budgets() -> list[Budget]:
    """The paper's eight mass thresholds, tau = 0.94, 0.945, ..., 0.975 (one per rollout of a group)."""
    return [Budget(kind="mass_threshold", value=round(0.94 + 0.005 * step, 3)) for step in range(8)]


class SparsitySettings(StrictModel):
    scorer: Literal["text_attention", "feature_norm"] = Field(
        "text_attention", description="Visual-token scorer (services.sparsity.scorers.SCORERS)."
    )
    scorer_layer: int = Field(2, ge=0, description="Decoder layer K whose text-to-image attention scores tokens.")
    budgets: list[Budget] = Field(
        default_factory=paper_budgets, min_length=1, description="Budget set a rollout group draws from."
    )
    inference_budget: Budget = Field(
        Budget(kind="mass_threshold", value=0.975), description="Budget of evaluation and serving."
    )


class LearnerSettings(StrictModel):
    model_path: Path | None = Field(
        None, description="HF folder the policy (and the frozen reference) start from; None uses rollout.model_path."
    )
    datasets: list[Path] = Field(
        default_factory=lambda: [Path("assets/tasks/digits/rl.jsonl")], min_length=1,
        description="Task JSONL files the learner feeds to the workers, in order.",
    )
    bad_task_lines: Literal["dead_letter", "refuse"] = Field(
        "dead_letter",
        description="A bad dataset line is dead-lettered on the tasks stream with its reason (the run goes on), "
        "or refused before the run starts.",
    )
    epochs: int = Field(1, ge=1, description="Passes over the datasets (each epoch reshuffled by seed + epoch).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (None: epochs decide).")
    groups_per_step: int = Field(8, ge=1, description="Trajectory groups (prompts) per optimizer step.")
    micro_batch_groups: int = Field(
        2, ge=1, description="Groups whose images go through the vision tower together (once per group: its G "
        "rollouts share the features); their vision graph is held until their rows are trained.",
    )
    micro_batch_tokens: int = Field(
        16_384, ge=1, description="Padded tokens (rows x longest pruned row) per batched LLM forward/backward; "
        "bounds activation memory whatever G is (a longer row runs alone).",
    )
    share_prompts: bool = Field(
        True, description="A group's rollouts with one keep set (every rollout of a dense group; repeated budgets) "
        "share one batch row: the pruned prompt once, then each completion under a block mask. Same log-probs, "
        "the prompt computed once instead of G times. Needs eager or SDPA decoder attention (off by itself "
        "otherwise).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's and vision block's activations in the backward "
        "(less memory, about a third more compute).",
    )
    reference_overlap: bool | None = Field(
        None, description="Run the frozen reference's passes on a second thread while the policy's run (same "
        "results, bit for bit): on a CPU with a core to spare it hides most of their cost (tiny model, 8 groups of 8: "
        "steps 1.30x faster); None: on for a CPU learner, off on GPUs, where both would queue on one stream.",
    )
    vision_attention: Literal["packed", "per_window"] = Field(
        "packed", description="Vision-tower window attention: one call per window size (packed) or HF's one "
        "call per window (per_window, the fallback). Flash attention, when installed, is used as it is.",
    )
    learning_rate: float = Field(1e-5, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="LR decay after warm-up (transformers.get_scheduler names, with warm-up)."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear LR warm-up steps.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm (clip_grad_norm_).")
    clip_eps_low: float = Field(0.2, ge=0, lt=1, description="PPO clip epsilon below 1.")
    clip_eps_high: float = Field(0.2, ge=0, description="PPO clip epsilon above 1 (0.28 = DAPO clip-higher).")
    dual_clip_c: float | None = Field(None, gt=1, description="Dual-clip bound for negative advantages; None: off.")
    beta: float = Field(0.04, ge=0, description="KL(pi || pi_ref) coefficient; 0 skips the reference model.")
    kl_ratio_weighted: bool = Field(True, description="Weight k3 by pi/pi_old (unbiased KL gradient off-policy).")
    normalization: Literal["token_mean", "sequence_mean", "group_token_mean", "sum_over_max_len"] = Field(
        "token_mean", description="How per-token losses are averaged (see learner.algorithms.aggregate)."
    )
    tis_cap: float | None = Field(2.0, gt=0, description="Truncated IS cap on pi_trainer/pi_rollout; None: off.")
    old_logprobs: Literal["recompute", "rollout"] = Field(
        "recompute",
        description="PPO ratio base: the trainer's own log-probs (+TIS vs the rollout's), or the rollout's.",
    )
    adv_std: Literal["unbiased", "biased", "none"] = Field("unbiased", description="Advantage std kind.")
    adv_eps: float = Field(1e-4, gt=0, description="Epsilon added to the group reward std.")
    drop_zero_variance: bool = Field(False, description="Skip the rows of groups whose rewards are all equal.")
    max_staleness: int = Field(4, ge=0, description="Drop groups made more than this many versions ago.")
    stale_retries: int = Field(
        2, ge=0, description="Times a task whose group arrived stale is sent back for fresh rollouts before it is "
        "dead-lettered with the reason.",
    )
    kept_mass_weight: float = Field(
        1.0, ge=0,
        description="Weight of the kept-set term (learner.algorithms.kept_mass_loss): teaches the scorer's attention "
        "to concentrate on the keep sets of above-average rollouts, so a fixed tau keeps fewer tokens; 0: off. "
        "It trains decoder layers <= K only, so it does nothing for the feature_norm scorer.",
    )
    publish_every: int = Field(1, ge=1, description="Publish a new weight version every k steps.")
    keep_weight_versions: int = Field(3, ge=1, description="Published version folders kept on disk.")
    checkpoint_every: int = Field(10, ge=1, description="Write a checkpoint every k steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (oldest removed first).")
    run_dir: Path | None = Field(None, description="Run folder (checkpoints, weights, logs); None: runs/<run_name>.")
    weights_root: Path | None = Field(
        None, description="Folder for published weight versions, shared with the workers; None: <run_dir>/weights. "
        "On one host a tmpfs (e.g. /dev/shm/<run_name>) makes a publish move the bytes once through memory; "
        "across hosts a shared volume.",
    )
    seed: int = Field(0, description="Seed of torch/numpy/python RNGs and of the dataset shuffle.")
    device: str = Field("cpu", description="Torch device of the policy and the reference ('cpu', 'cuda').")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Compute dtype of the learner's passes (bfloat16 on GPUs: autocast over the master "
        "weights); the frozen reference is held in it.",
    )
    master_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the trainable weights and optimizer state; float32 keeps updates that "
        "bf16 weights would round away. Published weights keep the checkpoint's own dtype.",
    )
    deterministic: bool = Field(True, description="torch.use_deterministic_algorithms (bit-exact CPU resume).")
    torch_threads: int = Field(
        0, ge=0, description="CPU threads of torch ops; 0 keeps torch's default (1 avoids spin under CPU contention)."
    )
    task_queue_fill: int = Field(64, ge=1, description="Keep up to this many tasks waiting on the tasks stream.")
    max_groups_in_flight: int | None = Field(
        None, ge=1, description="Run-ahead bound: tasks fed but not yet trained (waiting, in a worker's hands, or "
        "generated and waiting for the learner). None: groups_per_step x max(1, max_staleness), so what workers "
        "make is trained within the staleness bound instead of going stale.",
    )
    idle_timeout_s: float = Field(
        0.0, ge=0, description="Stop when no trajectory group arrives for this long; 0 waits forever."
    )
    use_ray: bool = Field(True, description="Run the trainer in a Ray actor (False: in this process).")
    ray_num_cpus: float = Field(1.0, gt=0, description="CPUs the trainer actor reserves.")
    ray_num_gpus: float = Field(0.0, ge=0, description="GPUs the trainer actor reserves.")
    num_workers: int = Field(
        1, ge=1, description="Ray Train workers; > 1 shards the policy, its gradients and AdamW state over them "
        "(FSDP2, learner.sharding); 1 runs one Ray actor."
    )


class Settings(StrictModel):
    """Everything a run can configure. Sections belong to the services that read them."""

    run_name: str = Field("default", description="Name of the run; namespaces its Redis keys and folder.")
    redis: RedisSettings = Field(default_factory=RedisSettings, description="Redis connection.")
    queues: QueueSettings = Field(default_factory=QueueSettings, description="Streams and delivery.")
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings, description="Logs and metrics.")
    reward_server: RewardServerSettings = Field(
        default_factory=RewardServerSettings, description="Reward server and its clients."
    )
    rollout: RolloutSettings = Field(default_factory=RolloutSettings, description="Rollout workers.")
    sparsity: SparsitySettings = Field(default_factory=SparsitySettings, description="Token pruning.")
    learner: LearnerSettings = Field(default_factory=LearnerSettings, description="The GRPO learner.")

"""Pydantic models for everything that crosses a process boundary (queues, HTTP, weight announcements)."""

from __future__ import annotations

import itertools
import math
import time
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1

MAX_ID_CHARS = 256
MAX_QUESTION_CHARS = 8_192
MAX_ANSWER_CHARS = 1_024


class WireModel(BaseModel):
    """Base of every boundary model: unknown fields are refused, and each carries its schema version."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schema_version: int = Field(SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION, description="Wire schema version.")


class AnswerType(str, Enum):
    EXACT = "exact"
    NUMBER = "number"
    CHOICE = "choice"
    YES_NO = "yes_no"
    VQA = "vqa"  # partial credit from the human answers (VQA accuracy); `answers` holds them
    RELAXED = "relaxed"  # ChartQA relaxed accuracy: numbers within 5%, other answers exact


MAX_HUMAN_ANSWERS = 32
HumanAnswers = list[Annotated[str, Field(min_length=1, max_length=MAX_ANSWER_CHARS)]]


class Task(BaseModel):
    """One dataset line: an image or a video, a question about it and the reference answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    image: str | None = Field(
        None, min_length=1, max_length=4_096, description="Image path, relative to the JSONL file."
    )
    video: str | None = Field(
        None, min_length=1, max_length=4_096,
        description="Video path relative to the JSONL file: a folder of PNG frames or a video file.",
    )
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    answer: str = Field(min_length=1, max_length=MAX_ANSWER_CHARS)
    answer_type: AnswerType
    choices: list[str] | None = Field(None, max_length=26, description="Options, for answer_type 'choice'.")
    answers: HumanAnswers | None = Field(
        None, max_length=MAX_HUMAN_ANSWERS, description="Human answers, for answer_type 'vqa' (VQA accuracy)."
    )

    @model_validator(mode="after")
    def _choices_match_type(self) -> Task:
        if self.answer_type is AnswerType.CHOICE and not self.choices:
            raise ValueError("answer_type 'choice' needs a non-empty 'choices' list")
        if (self.image is None) == (self.video is None):
            raise ValueError("a task names exactly one of 'image' and 'video'")
        return self

    @property
    def media(self) -> str:
        """The path of the task's image or video, relative to its JSONL file."""
        return self.image if self.image is not None else self.video  # type: ignore[return-value]

    @property
    def is_video(self) -> bool:
        """Whether the task carries a video rather than an image."""
        return self.video is not None


class Budget(BaseModel):
    """A visual-token budget: keep the top ceil(r*N) tokens, or the smallest set holding mass tau."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["keep_ratio", "mass_threshold"]
    value: float = Field(gt=0.0, le=1.0, allow_inf_nan=False)

    @property
    def label(self) -> str:
        """Short name used in metrics and reports, e.g. 'r=0.25' or 'tau=0.94'."""
        prefix = "r" if self.kind == "keep_ratio" else "tau"
        return f"{prefix}={self.value:g}"


class TaskMessage(WireModel):
    """A prompt the learner puts on the tasks stream for the rollout workers."""

    task: Task
    dataset_root: str = Field(description="Folder the task's image path is relative to.")
    epoch: int = Field(0, ge=0)
    attempt: int = Field(0, ge=0, description="Fresh rollouts asked for after earlier groups of it went stale.")
    enqueued_at: float = Field(default_factory=time.time)


class RolloutRequest(WireModel):
    """One rollout to generate: a task under one budget, as the i-th member of a GRPO group."""

    task: Task
    dataset_root: str = Field(description="Folder the task's image path is relative to.")
    budget: Budget
    group_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    rollout_index: int = Field(ge=0)
    seed: int | None = Field(None, description="Sampling seed, so a replayed rollout can be reproduced.")

class RolloutTimings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    score_s: float = Field(0.0, ge=0, description="Visual-token scoring and selection.")
    generate_s: float = Field(0.0, ge=0, description="vLLM generation (its share of the batch).")
    reward_s: float = Field(0.0, ge=0, description="Reward-server round trip (its share of the batch).")


class Rollout(WireModel):
    """One completion of one prompt under one budget, with everything the learner needs to replay it."""

    task_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    rollout_index: int = Field(ge=0)
    budget: Budget
    prompt_token_ids: list[int] = Field(min_length=1)
    completion_token_ids: list[int]
    completion_logprobs: list[float] = Field(description="Sampling log-prob of each completion token.")
    completion_text: str
    finish_reason: str = "stop"
    kept_indices: list[int] = Field(description="Sorted indices of the kept visual tokens, 0..total-1.")
    visual_tokens_kept: int = Field(ge=0)
    visual_tokens_total: int = Field(ge=1)
    policy_version: int = Field(ge=0)
    timings: RolloutTimings = Field(default_factory=RolloutTimings)

    @field_validator("completion_logprobs")
    @classmethod
    def _finite_logprobs(cls, logprobs: list[float]) -> list[float]:
        for position, logprob in enumerate(logprobs):
            if not math.isfinite(logprob) or logprob > 1e-4:
                raise ValueError(f"completion_logprobs[{position}]={logprob} is not a finite log-probability")
        return logprobs

    @model_validator(mode="after")
    def _counts_agree(self) -> Rollout:
        if len(self.completion_logprobs) != len(self.completion_token_ids):
            raise ValueError(
                f"{len(self.completion_logprobs)} completion_logprobs for "
                f"{len(self.completion_token_ids)} completion_token_ids"
            )
        if self.visual_tokens_kept != len(self.kept_indices):
            raise ValueError(
                f"visual_tokens_kept={self.visual_tokens_kept} but {len(self.kept_indices)} kept_indices"
            )
        if self.visual_tokens_kept > self.visual_tokens_total:
            raise ValueError(
                f"visual_tokens_kept={self.visual_tokens_kept} exceeds visual_tokens_total="
                f"{self.visual_tokens_total}"
            )
        indices = self.kept_indices
        if any(b <= a for a, b in itertools.pairwise(indices)):
            raise ValueError("kept_indices must be strictly increasing (sorted, no duplicates)")
        if indices and (indices[0] < 0 or indices[-1] >= self.visual_tokens_total):
            raise ValueError(f"kept_indices must lie in [0, {self.visual_tokens_total})")
        return self

    @property
    def reduction_ratio(self) -> float:
        """Share of visual tokens pruned away: 1 - kept/total."""
        return 1.0 - self.visual_tokens_kept / self.visual_tokens_total


class ScoreItem(BaseModel):
    """What the reward server needs to score one rollout."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    completion_text: str = Field(max_length=65_536)
    answer: str = Field(min_length=1, max_length=MAX_ANSWER_CHARS)
    answer_type: AnswerType
    choices: list[str] | None = Field(None, max_length=26)
    answers: HumanAnswers | None = Field(None, max_length=MAX_HUMAN_ANSWERS, description="For answer_type 'vqa'.")
    visual_tokens_kept: int = Field(ge=0)
    visual_tokens_total: int = Field(ge=1)
    required_format: str | None = Field(
        None, max_length=256, description="A regex the completion must match to earn the format reward."
    )
    group: str | None = Field(
        None, max_length=MAX_ID_CHARS,
        description="The rollout group the item belongs to, for rewards.efficiency_gate='group'; none: its own.",
    )

    @model_validator(mode="after")
    def _kept_within_total(self) -> ScoreItem:
        if self.visual_tokens_kept > self.visual_tokens_total:
            raise ValueError(
                f"visual_tokens_kept={self.visual_tokens_kept} exceeds visual_tokens_total="
                f"{self.visual_tokens_total}"
            )
        return self


class ScoreRequest(WireModel):
    items: list[ScoreItem] = Field(min_length=1)


class RewardBreakdown(BaseModel):
    """Every component of one rollout's reward, so learner and dashboards can show each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    correct: bool = Field(description="Full credit: accuracy == 1.")
    accuracy: float = Field(ge=0, le=1, description="r_acc in [0, 1]: 0 or 1, fractional for answer_type 'vqa'.")
    efficiency: float = Field(ge=0, le=1, description="r_eff: achieved reduction ratio, 1 - kept/total.")
    format: float = Field(ge=0, le=1, description="1 when the completion has the required format.")
    total: float = Field(description="accuracy_weight*acc + lambda*eff*credit + mu*format (credit: the answer's "
                         "accuracy, or its group's best under efficiency_gate='group').")
    parsed_answer: str | None = Field(None, description="The answer the checker read from the completion.")


class ScoreResponse(WireModel):
    results: list[RewardBreakdown]


class TrajectoryGroup(WireModel):
    """All G rollouts of one prompt, with their rewards: one GRPO group, made by one policy version."""

    group_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    task: Task
    epoch: int = Field(0, ge=0)
    attempt: int = Field(0, ge=0, description="The task message's attempt this group answers (0: the first).")
    rollouts: list[Rollout] = Field(min_length=1)
    rewards: list[RewardBreakdown] = Field(min_length=1)
    policy_version: int = Field(ge=0)
    worker_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    created_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _one_reward_per_rollout_one_version(self) -> TrajectoryGroup:
        if len(self.rewards) != len(self.rollouts):
            raise ValueError(f"{len(self.rewards)} rewards for {len(self.rollouts)} rollouts")
        versions = {rollout.policy_version for rollout in self.rollouts}
        if versions != {self.policy_version}:
            raise ValueError(f"a group mixes policy versions {sorted(versions)}; expected {self.policy_version}")
        if any(rollout.task_id != self.task.id for rollout in self.rollouts):
            raise ValueError(f"every rollout must belong to task {self.task.id!r}")
        return self


class WeightVersion(WireModel):
    """Announcement of a new policy: where its weights are and how to verify them."""

    version: int = Field(ge=0)
    uri: str = Field(min_length=1, description="Where the weights are: a folder path or a Redis key.")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="sha256 over the folder's weight files (a copied HF folder)."
    )
    manifest_blake3: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="blake3 of the folder's manifest.json, which lists a blake3 per chunk of every weight file "
        "(a version written in one pass: services.weights.stream).",
    )
    num_bytes: int = Field(ge=0)
    learner_step: int = Field(0, ge=0)
    created_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _one_hash(self) -> WeightVersion:
        if (self.sha256 is None) == (self.manifest_blake3 is None):
            raise ValueError("a WeightVersion carries exactly one of sha256 and manifest_blake3")
        return self

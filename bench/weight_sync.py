"""Weight sync latency: from "the learner has new weights" to "every worker generates with them".

    .venv/bin/python bench/weight_sync.py            # tiny model + a synthetic 1B-parameter bf16 state dict
    .venv/bin/python bench/weight_sync.py --quick    # tiny model + a 16M-parameter state dict (seconds)

Path measured (the shared-folder transport of services.weights): the learner saves safetensors
(save_pretrained for the tiny model, safetensors.save_file for the synthetic state dict), publishes the
folder (copy + sha256 + atomic rename), announces it on a real redis-server; then `--workers` weight
watchers (rollout_worker.weights.WeightWatcher, one process each, started and polling beforehand) verify
the hash and load it, and for the tiny model each generates one token with the new weights. Beside it, a memcpy of the same bytes (torch
tensor copy): the lower bound of any transport that moves the bytes once through memory.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import SecretStr
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The repo root goes first: bench/rollout_worker.py would otherwise shadow the rollout_worker package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS_DIR, print_table, save_results

from learner.publishing import publish_policy
from rollout_worker.weights import WeightWatcher
from services.modeling import TinyModelSpec, build_tiny_model, count_parameters, load_model_and_processor
from services.queues import connect_redis
from services.settings import RedisSettings
from services.weights import announce_weights, publish_weights_folder

PASSWORD = "bench-weight-sync"


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisSettings]:
    """A throw-away redis-server with a password on a free loopback port."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support import free_port, wait_for_port

    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", PASSWORD, "--save", "",
         "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield RedisSettings(url=f"redis://127.0.0.1:{port}/0", password=SecretStr(PASSWORD))
    finally:
        process.terminate()
        process.wait(timeout=10)


def memcpy_seconds(num_bytes: int, repeats: int = 3) -> float:
    """Best time of a torch tensor copy of num_bytes (destination pre-allocated and touched)."""
    source = torch.ones(num_bytes // 2, dtype=torch.bfloat16)
    target = torch.zeros_like(source)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return best


def synthetic_state_dict(parameters: int) -> dict[str, torch.Tensor]:
    """bf16 matrices of 4096 columns adding up to `parameters` (rounded up to whole rows)."""
    columns, rows_per_tensor = 4096, 8192
    rows = -(-parameters // columns)
    state, index = {}, 0
    while rows > 0:
        take = min(rows, rows_per_tensor)
        state[f"layers.{index}.weight"] = torch.full((take, columns), float(index % 7) / 8, dtype=torch.bfloat16)
        rows, index = rows - take, index + 1
    return state


def load_for(kind: str) -> Callable[[Path], None]:
    """What a worker does with a new version: transformers load + one token (tiny), or safetensors load."""
    if kind == "synthetic":
        # load_file maps the blob lazily; cloning reads every byte into memory, as copying into an engine would
        return lambda folder: {name: tensor.clone() for name, tensor in load_file(str(folder / "model.safetensors")).items()}

    def load(folder: Path) -> None:
        # The weights and their config only: a worker loads a version from its private verified copy, which
        # holds what the hash covers (processor files are not reloaded with new weights).
        worker_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
        with torch.no_grad():  # first use of the new weights: one decoding step on a text prompt
            worker_model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=1, do_sample=False)
    return load


def watcher_process(url: str, run_name: str, kind: str, ready: Any, results: Any) -> None:
    """One worker process: poll for a new version, verify and load it, report wall-clock times."""
    torch.set_num_threads(1)
    load, times = load_for(kind), {}

    def timed_load(folder: Path) -> None:
        times["load_start"] = time.time()
        load(folder)
        times["loaded"] = time.time()

    client = connect_redis(RedisSettings(url=url, password=SecretStr(PASSWORD)))
    watcher = WeightWatcher(client, run_name, timed_load, poll_s=0.0)
    ready.set()
    deadline = time.monotonic() + 600
    try:
        while not watcher.maybe_update():
            if time.monotonic() > deadline or watcher.refused:
                results.put({"error": f"no version loaded: {watcher.refused}"})
                return
            time.sleep(0.002)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which would otherwise wait for nothing
        results.put({"error": f"the watcher failed: {error!r}"})
        return
    finally:
        watcher.close()
    results.put(times)


class Watchers:
    """`count` worker processes, started and polling before the learner publishes (as in a live run)."""

    def __init__(self, redis: RedisSettings, run_name: str, kind: str, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.results = context.Queue()
        self.ready = [context.Event() for _ in range(count)]
        self.processes = [
            context.Process(target=watcher_process, args=(redis.url, run_name, kind, event, self.results))
            for event in self.ready
        ]
        for process in self.processes:
            process.start()
        for event in self.ready:
            if not event.wait(timeout=120):
                raise TimeoutError("a watcher process did not start within 120 s")

    def wait(self, published_at: float, announced_at: float) -> dict[str, float]:
        """Seconds from the publish start until every worker has loaded, and the slowest phases."""
        times = [self.results.get(timeout=900) for _ in self.processes]
        for process in self.processes:
            process.join(timeout=60)
        errors = [t["error"] for t in times if "error" in t]
        if errors:
            raise RuntimeError(errors[0])
        return {
            "detect_verify_s": max(t["load_start"] for t in times) - announced_at,
            "load_s": max(t["loaded"] - t["load_start"] for t in times),
            "end_to_end_s": max(t["loaded"] for t in times) - published_at,
        }


def bench_tiny(workdir: Path, redis: RedisSettings, workers: int) -> dict[str, float | int | str]:
    """Publish the tiny model, then each worker verifies, loads (transformers) and generates a token."""
    model_dir = build_tiny_model(workdir / "tiny-base", TinyModelSpec())
    model, processor = load_model_and_processor(model_dir)
    client = connect_redis(redis)
    watchers = Watchers(redis, "tiny", "tiny", workers)
    started = time.time()
    version, timings = publish_policy(model, processor, staging=workdir / "staging", weights_root=workdir / "weights",
                                      version=1, learner_step=1, client=client, run_name="tiny")
    measured = watchers.wait(started, started + timings.total_s)
    return {"case": "tiny model", "parameters": count_parameters(model)["total"], "bytes": version.num_bytes,
            "save_s": timings.save_s, "copy_hash_s": timings.copy_and_hash_s, "announce_s": timings.announce_s,
            **measured}


def bench_synthetic(workdir: Path, redis: RedisSettings, workers: int, parameters: int) -> dict[str, float | int | str]:
    """Publish a synthetic bf16 state dict as safetensors; each worker verifies and loads it into memory."""
    state = synthetic_state_dict(parameters)
    client = connect_redis(redis)
    staging = workdir / "synthetic-staging"
    staging.mkdir()
    watchers = Watchers(redis, "synthetic", "synthetic", workers)
    started = time.time()
    save_file(state, str(staging / "model.safetensors"))
    saved = time.time()
    version = publish_weights_folder(staging, workdir / "synthetic-weights", 1, learner_step=1)
    copied = time.time()
    announce_weights(client, "synthetic", version)
    announced = time.time()
    measured = watchers.wait(started, announced)
    shutil.rmtree(staging)
    count = sum(t.numel() for t in state.values())
    return {"case": f"synthetic {count / 1e9:.2f}B bf16", "parameters": count, "bytes": version.num_bytes,
            "save_s": saved - started, "copy_hash_s": copied - saved, "announce_s": announced - copied, **measured}


def main(argv: list[str] | None = None) -> int:
    """Run both cases, print the table, write bench/results/weight_sync.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 16M-parameter synthetic state dict (seconds)")
    parser.add_argument("--parameters", type=int, default=None, help="synthetic parameter count (default 1e9)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default 2; 1 with --quick)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where weight_sync.json goes")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the blobs (default: a temp dir)")
    args = parser.parse_args(argv)
    parameters = args.parameters or (16_000_000 if args.quick else 1_000_000_000)
    workers = args.workers or (1 if args.quick else 2)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="weight-sync-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        with redis_server(workdir) as redis:
            rows.append(bench_tiny(workdir, redis, workers))
            rows.append(bench_synthetic(workdir, redis, workers, parameters))
    for row in rows:
        row["memcpy_s"] = memcpy_seconds(int(row["bytes"]))
        row["memcpy_GBps"] = int(row["bytes"]) / row["memcpy_s"] / 1e9
        row["end_to_end_over_memcpy"] = row["end_to_end_s"] / row["memcpy_s"]
    columns = {"case": "case", "parameters": "params", "bytes": "MB", "save_s": "save s", "copy_hash_s": "copy+hash s",
               "announce_s": "announce s", "detect_verify_s": "detect+verify s", "load_s": "load s",
               "end_to_end_s": "end-to-end s", "memcpy_s": "memcpy s", "memcpy_GBps": "memcpy GB/s",
               "end_to_end_over_memcpy": "e2e / memcpy"}
    table = [[row[key] / 1e6 if key == "bytes" else row[key] for key in columns] for row in rows]
    print_table(f"Weight sync: publish -> {workers} worker(s) loaded (shared folder + Redis announce)",
                list(columns.values()), table)
    path = save_results("weight_sync", {"mode": "quick" if args.quick else "full", "workers": workers,
                                        "rows": rows}, results_dir=args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

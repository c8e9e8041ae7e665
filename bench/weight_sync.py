"""Weight sync latency: from "the learner has new weights" to "every worker generates with them".

    .venv/bin/python bench/weight_sync.py            # tiny model + a synthetic 1B-parameter bf16 state dict
    .venv/bin/python bench/weight_sync.py --quick    # tiny model + a 16M-parameter state dict (seconds)

Two paths per case, in the same run, each measured from the first byte the learner writes until `--workers`
weight watchers (rollout_worker.weights.WeightWatcher, one process each, started and polling beforehand on
a real redis-server) all hold the new weights; for the tiny model each then generates one token with them.
- "shm, in place" (today's path): the learner writes the version once into a tmpfs root (/dev/shm), hashing
  each chunk with blake3 as it writes (services.weights.stream), renames the folder and announces it; each
  worker hard-links the files and reads them once straight into its live weights (a pre-allocated state
  dict, or the HF model's own tensors), checking every chunk as it arrives. From the (KEEP_VERSIONS + 2)th
  version on, the learner writes over the tmpfs pages of the version it pruned last (the steady state of a
  run); `spare_pages_each` says which repeats did.
- "folder copy" (the path before, kept for comparison): save_pretrained / safetensors.save_file into a
  staging folder on disk, copy + sha256 into the weights root, announce; each worker copies the folder into
  a private one while hashing it, then loads the copy (from_pretrained, or load_file + clone).
Beside them, a memcpy of the same bytes (torch tensor copy into touched memory), timed again before every
repeat so that it sees the same load from other jobs as the publishes: the lower bound of any transport that
moves the bytes once through memory. The ratio is the fastest end-to-end over the fastest memcpy.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
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

from learner.publishing import prune_versions, publish_policy
from rollout_worker.weights import WeightWatcher
from services.modeling import TinyModelSpec, build_tiny_model, count_parameters, load_model_and_processor
from services.queues import connect_redis
from services.schemas import WeightVersion
from services.settings import RedisSettings
from services.weights import (
    announce_weights,
    load_verified_into,
    publish_weights_folder,
    write_weights_version,
)
from services.weights.hf import checkpoint_destination
from services.weights.stream import SPARE_BLOB_NAME

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


Loads = tuple[Callable[[Path], None], Callable[[WeightVersion], None] | None]


def one_token(model: torch.nn.Module) -> None:
    """First use of new weights: one decoding step on a text prompt."""
    with torch.no_grad():
        model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=1, do_sample=False)


def loads_for(kind: str, path: str, engine_spec: Any) -> Loads:
    """What a worker does with a new version: (load a verified folder, load a version in place or None).

    The in-place engine exists before the version arrives, as a serving engine's weights do: a touched bf16
    state dict (synthetic) or the tiny model loaded from its base folder.
    """
    if kind == "synthetic" and path == "inplace":
        engine = synthetic_state_dict(engine_spec)
        return (lambda folder: None), (lambda version: load_verified_into(version, engine))
    if kind == "synthetic":
        # load_file maps the blob lazily; cloning reads every byte into memory, as copying into an engine would
        return (lambda folder: {name: tensor.clone()
                                for name, tensor in load_file(str(folder / "model.safetensors")).items()}), None
    if path == "inplace":
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(engine_spec).eval()
        destination = checkpoint_destination(model)

        def load_in_place(version: WeightVersion) -> None:
            load_verified_into(version, destination)
            one_token(model)
        return (lambda folder: None), load_in_place

    def load_folder(folder: Path) -> None:
        # The weights and their config only: a worker loads a version from its private verified copy, which
        # holds what the hash covers (processor files are not reloaded with new weights).
        one_token(Qwen2_5_VLForConditionalGeneration.from_pretrained(folder))
    return load_folder, None


def watcher_process(url: str, run_name: str, kind: str, path: str, engine_spec: Any, versions: int, ready: Any,
                    results: Any) -> None:
    """One worker process: poll for versions 1..versions, verify and load each, report wall-clock times."""
    torch.set_num_threads(1)
    load, load_verified = loads_for(kind, path, engine_spec)
    times: dict[str, float] = {}

    def timed(function: Callable[[Any], None]) -> Callable[[Any], None]:
        def run(target: Any) -> None:
            times["load_start"] = time.time()
            function(target)
            times["loaded"] = time.time()
        return run

    client = connect_redis(RedisSettings(url=url, password=SecretStr(PASSWORD)))
    watcher = WeightWatcher(client, run_name, timed(load), poll_s=0.0,
                            load_verified=timed(load_verified) if load_verified is not None else None)
    ready.set()
    deadline = time.monotonic() + 900
    try:
        while watcher.version < versions:
            if watcher.maybe_update():
                results.put(dict(times))
            elif time.monotonic() > deadline or watcher.refused:
                results.put({"error": f"no version loaded: {watcher.refused}"})
                return
            else:
                time.sleep(0.002)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which would otherwise wait for nothing
        results.put({"error": f"the watcher failed: {error!r}"})
    finally:
        watcher.close()


class Watchers:
    """`count` worker processes, started and polling before the learner publishes (as in a live run)."""

    def __init__(self, redis: RedisSettings, run_name: str, kind: str, path: str, count: int, versions: int,
                 engine_spec: Any = None) -> None:
        context = multiprocessing.get_context("spawn")
        self.results = context.Queue()
        self.ready = [context.Event() for _ in range(count)]
        self.processes = [
            context.Process(target=watcher_process,
                            args=(redis.url, run_name, kind, path, engine_spec, versions, event, self.results))
            for event in self.ready
        ]
        for process in self.processes:
            process.start()
        for event in self.ready:
            if not event.wait(timeout=300):
                raise TimeoutError("a watcher process did not start within 300 s")

    def wait(self, published_at: float, announced_at: float) -> dict[str, float]:
        """Seconds from the publish start until every worker has loaded this version, and the slowest phases."""
        times = [self.results.get(timeout=900) for _ in self.processes]
        errors = [t["error"] for t in times if "error" in t]
        if errors:
            raise RuntimeError(errors[0])
        return {
            "detect_verify_s": max(0.0, max(t["load_start"] for t in times) - announced_at),
            "load_s": max(t["loaded"] - t["load_start"] for t in times),
            "end_to_end_s": max(t["loaded"] for t in times) - published_at,
        }

    def join(self) -> None:
        """Wait for the worker processes to exit (each does after the last version)."""
        for process in self.processes:
            process.join(timeout=60)


PATHS = {"inplace": "shm, in place", "folder": "folder copy (before)"}
KEEP_VERSIONS = 2  # the version the workers run and the one before


def best_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest repeat beside the fastest memcpy, with every repeat's end-to-end and memcpy times."""
    best = dict(min(rows, key=lambda row: row["end_to_end_s"]))
    best["end_to_end_each_s"] = [row["end_to_end_s"] for row in rows]
    best["memcpy_each_s"] = [row["memcpy_s"] for row in rows]
    best["spare_pages_each"] = [row["spare_pages"] for row in rows]
    best["save_each_s"] = [row["save_s"] for row in rows]
    best["load_each_s"] = [row["load_s"] for row in rows]
    best["memcpy_s"] = min(best["memcpy_each_s"])
    return best


def bench_tiny(workdir: Path, shm: Path, redis: RedisSettings, workers: int, path: str,
               repeats: int) -> dict[str, Any]:
    """Publish the tiny model `repeats` times; each worker verifies, loads it and generates a token."""
    model_dir = workdir / "tiny-base"
    if not model_dir.exists():
        build_tiny_model(model_dir, TinyModelSpec())
    model, processor = load_model_and_processor(model_dir)
    client = connect_redis(redis)
    run_name, rows = f"tiny-{path}", []
    watchers = Watchers(redis, run_name, "tiny", path, workers, repeats, engine_spec=str(model_dir))
    num_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for version_number in range(1, repeats + 1):
        memcpy_s = memcpy_seconds(num_bytes)
        spare_pages = (shm / run_name / SPARE_BLOB_NAME).exists() if path == "inplace" else False
        started = time.time()
        if path == "inplace":
            version, timings = publish_policy(model, processor, weights_root=shm / run_name, version=version_number,
                                              learner_step=version_number, client=client, run_name=run_name,
                                              keep_versions=KEEP_VERSIONS)
            stages = {"save_s": timings.write_s, "copy_hash_s": 0.0, "announce_s": timings.announce_s}
        else:  # the publish before: save_pretrained into staging, then copy + sha256 into the weights root
            staging = workdir / "tiny-staging"
            shutil.rmtree(staging, ignore_errors=True)
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
            saved = time.time()
            version = publish_weights_folder(staging, workdir / run_name, version_number, learner_step=version_number)
            copied = time.time()
            announce_weights(client, run_name, version)
            stages = {"save_s": saved - started, "copy_hash_s": copied - saved, "announce_s": time.time() - copied}
            prune_versions(workdir / run_name, KEEP_VERSIONS)
        rows.append({"case": "tiny model", "path": PATHS[path], "parameters": count_parameters(model)["total"],
                     "bytes": version.num_bytes, "spare_pages": spare_pages, **stages,
                     **watchers.wait(started, started + sum(stages.values())), "memcpy_s": memcpy_s})
    watchers.join()
    shutil.rmtree(Path(version.uri).parent, ignore_errors=True)
    return best_of(rows)


def bench_synthetic(workdir: Path, shm: Path, redis: RedisSettings, workers: int, parameters: int,
                    path: str, repeats: int) -> dict[str, Any]:
    """Publish a synthetic bf16 state dict `repeats` times; each worker verifies and loads it into memory."""
    state = synthetic_state_dict(parameters)
    count = sum(t.numel() for t in state.values())
    client = connect_redis(redis)
    run_name, rows = f"synthetic-{path}", []
    watchers = Watchers(redis, run_name, "synthetic", path, workers, repeats, engine_spec=parameters)
    for version_number in range(1, repeats + 1):
        memcpy_s = memcpy_seconds(count * 2)  # its two buffers are freed before the publish
        spare_pages = path == "inplace" and (shm / run_name / SPARE_BLOB_NAME).exists()
        started = time.time()
        if path == "inplace":
            root = shm / run_name
            version = write_weights_version(state, root, version_number, learner_step=version_number)
            written = time.time()
            announce_weights(client, run_name, version)
            stages = {"save_s": written - started, "copy_hash_s": 0.0, "announce_s": time.time() - written}
        else:
            root, staging = workdir / run_name, workdir / "synthetic-staging"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            save_file(state, str(staging / "model.safetensors"))
            saved = time.time()
            version = publish_weights_folder(staging, root, version_number, learner_step=version_number)
            copied = time.time()
            announce_weights(client, run_name, version)
            stages = {"save_s": saved - started, "copy_hash_s": copied - saved, "announce_s": time.time() - copied}
        rows.append({"case": f"synthetic {count / 1e9:.2f}B bf16", "path": PATHS[path], "parameters": count,
                     "bytes": version.num_bytes, "spare_pages": spare_pages, **stages,
                     **watchers.wait(started, started + sum(stages.values())), "memcpy_s": memcpy_s})
        prune_versions(root, KEEP_VERSIONS)
    watchers.join()
    shutil.rmtree(root, ignore_errors=True)  # frees the tmpfs copies before the next case
    return best_of(rows)


def main(argv: list[str] | None = None) -> int:
    """Run both cases, print the table, write bench/results/weight_sync.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 16M-parameter synthetic state dict (seconds)")
    parser.add_argument("--parameters", type=int, default=None, help="synthetic parameter count (default 1e9)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default 2; 1 with --quick)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="versions published per case and path (best kept; from the 4th on, over spare pages)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where weight_sync.json goes")
    parser.add_argument("--workdir", type=Path, default=None, help="disk folder of the path before (default: a temp dir)")
    parser.add_argument("--shm-root", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                        help="tmpfs folder for the in-place path's versions (default /dev/shm)")
    args = parser.parse_args(argv)
    parameters = args.parameters or (16_000_000 if args.quick else 1_000_000_000)
    workers = args.workers or (1 if args.quick else 2)
    torch.set_num_threads(1)
    rows, load_before = [], os.getloadavg()  # other jobs on the box skew every time: say how loaded it was
    with tempfile.TemporaryDirectory(prefix="weight-sync-", dir=args.workdir) as tmp, \
            tempfile.TemporaryDirectory(prefix="weight-sync-", dir=args.shm_root) as shm_tmp:
        workdir, shm = Path(tmp), Path(shm_tmp)
        with redis_server(workdir) as redis:
            for path in PATHS:
                rows.append(bench_tiny(workdir, shm, redis, workers, path, args.repeats))
            for path in PATHS:
                rows.append(bench_synthetic(workdir, shm, redis, workers, parameters, path, args.repeats))
    for row in rows:
        row["memcpy_GBps"] = int(row["bytes"]) / row["memcpy_s"] / 1e9
        row["end_to_end_over_memcpy"] = row["end_to_end_s"] / row["memcpy_s"]
    columns = {"case": "case", "path": "path", "bytes": "MB", "save_s": "write s", "copy_hash_s": "copy+hash s",
               "announce_s": "announce s", "detect_verify_s": "detect (+copy+hash) s", "load_s": "load s",
               "end_to_end_s": "end-to-end s", "memcpy_s": "memcpy s", "memcpy_GBps": "memcpy GB/s",
               "end_to_end_over_memcpy": "e2e / memcpy"}
    table = [[row[key] / 1e6 if key == "bytes" else row[key] for key in columns] for row in rows]
    print_table(f"Weight sync: publish -> {workers} worker(s) loaded (Redis announce)",
                list(columns.values()), table)
    path = save_results("weight_sync", {"mode": "quick" if args.quick else "full", "workers": workers,
                                        "repeats": args.repeats, "keep_versions": KEEP_VERSIONS,
                                        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
                                        "rows": rows}, results_dir=args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Weight sync stage by stage, in one process: where the time of bench/weight_sync.py's in-place path goes.

    .venv/bin/python bench/weight_sync_stages.py            # 1B-parameter bf16 state dict (2 GB), 5 rounds
    .venv/bin/python bench/weight_sync_stages.py --quick    # 16M parameters, 2 rounds (seconds)

Each round times every stage once, one after the other, so all stages see the same load from other jobs;
the table gives each stage's fastest round and its ratio to the fastest memcpy. Stages:
- memcpy: torch copy of the same bytes into touched memory (the unit of bench/weight_sync.py's ratio);
- blake3: the per-chunk hash over the bytes on one thread (services.weights.manifest.ChunkHasher), and the
  blake3 library's own multithreading (``max_threads``) on each 16 MiB chunk;
- write: the publisher's safetensors blob written to tmpfs without hashing, into new pages and into the
  pages of a pruned version's blob (the spare, services.weights.stream);
- publish: the whole one-pass publish (write + blake3 on a second thread + manifest + rename), new pages and
  spare pages;
- read: a worker's read of the blob into its touched weights without hashing (read calls, as the worker
  does; mmap + torch copy, which a truncated file would turn into SIGBUS, for comparison), and the whole
  verified in-place load (read + blake3 on a second thread + checks, services.weights.stream).
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS_DIR, print_table, save_results
from weight_sync import synthetic_state_dict

from learner.publishing import prune_versions
from services.schemas import WeightVersion
from services.weights import load_verified_into, write_weights_version
from services.weights.manifest import DEFAULT_CHUNK_BYTES, ChunkHasher
from services.weights.stream import PIECE_BYTES, SAFETENSORS_NAME, SPARE_BLOB_NAME, safetensors_header


def flat_bytes(tensors: dict[str, torch.Tensor]) -> list[memoryview]:
    """Each tensor's bytes as a flat view (no copy)."""
    return [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in tensors.values()]


def write_plain(path: Path, tensors: dict[str, torch.Tensor], reuse: bool) -> None:
    """The blob's bytes written in the publisher's pieces, without hashing."""
    with path.open("r+b" if reuse else "xb", buffering=0) as handle:
        handle.write(safetensors_header(tensors))
        for view in flat_bytes(tensors):
            for start in range(0, len(view), PIECE_BYTES):
                handle.write(view[start:start + PIECE_BYTES])


def read_plain(path: Path, engine: dict[str, torch.Tensor], offset: int) -> None:
    """The blob's data section read into the engine's tensors in the worker's pieces, without hashing."""
    with path.open("rb", buffering=0) as handle:
        handle.seek(offset)
        for view in flat_bytes(engine):
            for start in range(0, len(view), PIECE_BYTES):
                handle.readinto(view[start:start + PIECE_BYTES])


def read_mmap(path: Path, engine: dict[str, torch.Tensor], offset: int) -> None:
    """The data section copied from a read-only mapping with torch, in the same pieces."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        with warnings.catch_warnings():  # torch warns that the mapping is read-only: it is only read here
            warnings.simplefilter("ignore", UserWarning)
            source = torch.frombuffer(memoryview(mapped).cast("B")[offset:], dtype=torch.uint8)
        position = 0
        for tensor in engine.values():
            flat = tensor.reshape(-1).view(torch.uint8)
            for start in range(0, flat.numel(), PIECE_BYTES):
                piece = flat[start:start + PIECE_BYTES]
                piece.copy_(source[position + start:position + start + piece.numel()])
            position += flat.numel()
        del source


def hash_threads(views: list[memoryview], threads: int) -> None:
    """blake3 of every 16 MiB chunk with the library's own worker threads."""
    for view in views:
        for start in range(0, len(view), DEFAULT_CHUNK_BYTES):
            blake3.blake3(view[start:start + DEFAULT_CHUNK_BYTES], max_threads=threads).digest()


def hash_one_thread(views: list[memoryview]) -> None:
    """The per-chunk hash the publisher and workers take, on the calling thread."""
    hasher = ChunkHasher(DEFAULT_CHUNK_BYTES)
    for view in views:
        hasher.update(view)
    hasher.finish()


def stages(state: dict[str, torch.Tensor], engine: dict[str, torch.Tensor],
           shm: Path) -> dict[str, Callable[[], Any]]:
    """The stages of one round, by name, in the order they run."""
    views, root = flat_bytes(state), shm / "weights"
    scratch, spare = shm / "scratch.safetensors", root / SPARE_BLOB_NAME
    counter = iter(range(1, 1_000_000))
    versions: dict[str, WeightVersion] = {}  # folder name -> what was announced for it
    offset = len(safetensors_header(state))

    def memcpy() -> None:
        for name, tensor in state.items():
            engine[name].copy_(tensor)

    def write_new() -> None:
        scratch.unlink(missing_ok=True)
        write_plain(scratch, state, reuse=False)

    def publish(reuse: bool) -> Callable[[], Any]:
        def run() -> None:
            if not reuse:
                spare.unlink(missing_ok=True)
            version = write_weights_version(state, root, next(counter))
            versions[Path(version.uri).name] = version
            prune_versions(root, 1)  # keeps the pruned blob as the spare (nothing links it)
        return run

    def latest_blob() -> Path:
        return max(path for path in root.glob("v*") if path.is_dir()) / SAFETENSORS_NAME

    def verified_load() -> None:
        folder = max(path for path in root.glob("v*") if path.is_dir())
        load_verified_into(versions[folder.name], engine, folder)

    return {
        "memcpy (torch copy_)": memcpy,
        "blake3, 1 thread": lambda: hash_one_thread(views),
        "blake3, max_threads=2": lambda: hash_threads(views, 2),
        "write, new tmpfs pages": write_new,
        "write, spare tmpfs pages": lambda: write_plain(scratch, state, reuse=True),
        "publish (write + blake3), new pages": publish(reuse=False),
        "publish (write + blake3), spare pages": publish(reuse=True),
        "read into weights (read calls)": lambda: read_plain(latest_blob(), engine, offset),
        "read into weights (mmap + torch copy)": lambda: read_mmap(latest_blob(), engine, offset),
        "verified in-place load (read + blake3)": verified_load,
    }


def main(argv: list[str] | None = None) -> int:
    """Time every stage `--rounds` times, print the table, write bench/results/weight_sync_stages.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16M parameters, 2 rounds")
    parser.add_argument("--parameters", type=int, default=None, help="synthetic parameter count (default 1e9)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every stage (default 5)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--shm-root", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    args = parser.parse_args(argv)
    parameters = args.parameters or (16_000_000 if args.quick else 1_000_000_000)
    rounds = args.rounds or (2 if args.quick else 5)
    torch.set_num_threads(1)
    state, engine = synthetic_state_dict(parameters), synthetic_state_dict(parameters)
    num_bytes = sum(t.numel() * t.element_size() for t in state.values())
    load_before, times = os.getloadavg(), {}
    with tempfile.TemporaryDirectory(prefix="weight-stages-", dir=args.shm_root) as tmp:
        steps = stages(state, engine, Path(tmp))
        times = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                started = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - started)
        shutil.rmtree(tmp, ignore_errors=True)
    memcpy_s = min(times["memcpy (torch copy_)"])
    rows = [{"stage": name, "best_s": min(each), "median_s": statistics.median(each), "each_s": each,
             "GBps": num_bytes / min(each) / 1e9, "over_memcpy": min(each) / memcpy_s} for name, each in times.items()]
    print_table(f"Weight sync stages, {num_bytes / 1e9:.2f} GB, best of {rounds} rounds",
                ["stage", "best s", "median s", "GB/s", "× memcpy"],
                [[row["stage"], row["best_s"], row["median_s"], row["GBps"], row["over_memcpy"]] for row in rows])
    path = save_results("weight_sync_stages", {
        "mode": "quick" if args.quick else "full", "bytes": num_bytes, "rounds": rounds,
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()}, "rows": rows,
    }, results_dir=args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

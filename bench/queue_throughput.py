"""Queue throughput: put + consume + ack of Rollout-sized messages, beside redis-benchmark's raw XADD rate.

Run: `.venv/bin/python bench/queue_throughput.py` (add `--quick` for a seconds-long smoke run).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, save_results
from support import RedisServer

from services.queues import StreamQueue, connect_redis
from services.schemas import Budget, Rollout, decode, encode
from services.settings import QueueSettings, RedisSettings


def rollout_sized_message() -> Rollout:
    """A realistic rollout: 128-token prompt, 32-token completion, 64 of 256 visual tokens kept."""
    return Rollout(
        task_id="scenes-test-000123", rollout_index=3, budget=Budget(kind="keep_ratio", value=0.25),
        prompt_token_ids=list(range(1000, 1128)), completion_token_ids=list(range(200, 232)),
        completion_logprobs=[-0.0123456789 * (index + 1) for index in range(32)],
        completion_text="The answer is 7.", kept_indices=list(range(0, 256, 4)),
        visual_tokens_kept=64, visual_tokens_total=256, policy_version=17,
    )


def codec_costs(message: Rollout, repeats: int) -> list[dict]:
    """Bytes and encode+decode rate of each codec, for the codec choice."""
    rows = []
    for codec in ("msgpack", "json"):
        payload = encode(message, codec)
        started = time.perf_counter()
        for _ in range(repeats):
            decode(Rollout, encode(message, codec), codec)
        elapsed = time.perf_counter() - started
        rows.append({"codec": codec, "bytes": len(payload), "roundtrips_per_s": repeats / elapsed})
    return rows


def queue_rate(queue: StreamQueue, payload: bytes, batch: int, total: int) -> float:
    """Entries/s for put_many(batch) then consume(batch) then ack, repeated until total entries moved."""
    moved = 0
    started = time.perf_counter()
    while moved < total:
        queue.put_many([payload] * batch)
        entries = queue.consume(batch, block_ms=0)
        queue.ack(entries)
        moved += len(entries)
    return moved / (time.perf_counter() - started)


def redis_benchmark_xadd(server: RedisServer, payload_size: int, requests: int, pipeline: int) -> float:
    """redis-benchmark's XADD requests/s on the same server, with the same payload size."""
    output = subprocess.run(
        [
            "redis-benchmark", "-p", str(server.port), "-a", server.password, "-n", str(requests), "-q",
            "-P", str(pipeline), "XADD", "sf:rawbench", "*", "p", "x" * payload_size,
        ],
        capture_output=True, text=True, check=True,
    ).stdout
    match = re.search(r"([\d.]+) requests per second", output)
    if match is None:
        raise RuntimeError(f"could not read redis-benchmark output: {output!r}")
    server.client().delete("sf:rawbench")
    return float(match.group(1))


def main() -> None:
    """Run the benchmark, print the table, write bench/results/queue_throughput.json."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args()
    total = 2_000 if args.quick else 40_000
    message = rollout_sized_message()
    codecs = codec_costs(message, 500 if args.quick else 5_000)
    payload = encode(message, "msgpack")

    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir))
        server.start()
        try:
            client = connect_redis(RedisSettings(url=server.url, password=SecretStr(server.password)))
            # AOF fsync=always as in the tests' server would measure the disk; bench the queue itself.
            server.client().config_set("appendfsync", "everysec")
            queue = StreamQueue(client, "sf:bench", QueueSettings(max_length=100_000), consumer="bench")
            queue.ensure_group()
            raw = redis_benchmark_xadd(server, len(payload), total, pipeline=1)
            raw_pipelined = redis_benchmark_xadd(server, len(payload), total, pipeline=128)
            rows = []
            for batch in (1, 16, 128):
                rate = queue_rate(queue, payload, batch, total if batch > 1 else total // 4)
                rows.append({"batch": batch, "entries_per_s": rate, "ratio_to_raw_xadd": rate / raw,
                             "ratio_to_pipelined_xadd": rate / raw_pipelined})
        finally:
            server.stop()

    print_table("codec (one Rollout message)", ["codec", "bytes", "encode+decode/s"],
                [[row["codec"], row["bytes"], row["roundtrips_per_s"]] for row in codecs])
    print_table(
        f"put+consume+ack, {len(payload)}-byte Rollout messages (raw XADD: {raw:,.0f}/s with 50 clients, "
        f"{raw_pipelined:,.0f}/s pipelined x128)",
        ["batch", "entries/s", "vs raw XADD", "vs pipelined XADD"],
        [[row["batch"], row["entries_per_s"], row["ratio_to_raw_xadd"], row["ratio_to_pipelined_xadd"]]
         for row in rows],
    )
    path = save_results(
        "queue_throughput",
        {"payload_bytes": len(payload), "entries_per_batch_size": total, "codecs": codecs,
         "redis_benchmark_xadd_per_s": raw, "redis_benchmark_xadd_pipelined_per_s": raw_pipelined,
         "queue": rows, "goal": "batch 128 >= 0.5 x raw XADD"},
        args.results_dir or Path(__file__).resolve().parent / "results",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

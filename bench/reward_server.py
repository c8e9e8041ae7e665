"""Reward-server throughput and latency against a real `python -m reward_server` (uvicorn, 1 worker).

Cases: closed loops of 4 concurrent clients posting batches of 1, 64 and 512 (pre-encoded JSON, so the
server is what is measured), the same at 64 through RewardClient (the rollout worker's path), and open-loop
arrivals at the goal rate (5,000 items/s in batches of 64; latency counted from each scheduled send).
Each row also gives the server's own CPU per request, which other load on the machine does not inflate.

Run: `.venv/bin/python bench/reward_server.py` (add `--quick` for a seconds-long smoke run).
Goal (2-core machine): >= 5,000 items/s at batch 64 with p99 < 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np
import psutil
from pydantic import SecretStr
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))  # before bench/: this script's name would shadow the reward_server package

from common import RESULTS_DIR, print_table, save_results
from support import free_port, wait_for_port

from reward_server.client import RewardClient
from services.schemas.models import AnswerType, ScoreItem, ScoreRequest
from services.settings import RewardServerSettings

GOAL_ITEMS_PER_S = 5_000
GOAL_P99_MS = 50.0

_EXAMPLES = [
    (
        "Looking at the canvas, the shape is blue.\nThe answer is (B) blue square.",
        "B",
        AnswerType.CHOICE,
        ["red circle", "blue square", "green triangle", "yellow star"],
    ),
    (
        "I count the digits in the grid. There are seven of them. The answer is 7.",
        "7",
        AnswerType.NUMBER,
        None,
    ),
    ("Yes, there is a red circle in the top-left corner.", "yes", AnswerType.YES_NO, None),
    ("<answer>green</answer>", "Green", AnswerType.EXACT, None),
]


def make_items(size: int) -> list[ScoreItem]:
    """`size` realistic items, mixing every answer type and budget."""
    items = []
    for index in range(size):
        text, answer, answer_type, choices = _EXAMPLES[index % len(_EXAMPLES)]
        items.append(
            ScoreItem(
                completion_text=text,
                answer=answer,
                answer_type=answer_type,
                choices=choices,
                visual_tokens_kept=16 + index % 240,
                visual_tokens_total=256,
            )
        )
    return items


async def client_loop(send: Callable[[], Awaitable[None]], stop_at: float, latencies: list[float]) -> None:
    """Send back to back until stop_at, recording each request's latency."""
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        await send()
        latencies.append(time.perf_counter() - started)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def run_clients(
    send: Callable[[], Awaitable[None]], clients: int, seconds: float, server_pid: int
) -> tuple[list, float, float]:
    """`clients` concurrent loops for `seconds`, after a 0.5 s warm-up: latencies, elapsed, server CPU s."""
    await asyncio.gather(*(client_loop(send, time.perf_counter() + 0.5, []) for _ in range(clients)))
    latencies: list[float] = []
    cpu_before, started = cpu_seconds(server_pid), time.perf_counter()
    await asyncio.gather(*(client_loop(send, started + seconds, latencies) for _ in range(clients)))
    return latencies, time.perf_counter() - started, cpu_seconds(server_pid) - cpu_before


async def run_paced(
    send: Callable[[], Awaitable[None]], requests_per_s: float, seconds: float, server_pid: int
) -> tuple[list, float, float]:
    """Open-loop arrivals at a fixed rate; latency counts from each request's scheduled time, so a slow
    server cannot hide its queueing by slowing the senders down (no coordinated omission)."""
    await client_loop(send, time.perf_counter() + 0.5, [])
    latencies: list[float] = []

    async def one(scheduled: float) -> None:
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        await send()
        latencies.append(time.perf_counter() - scheduled)

    cpu_before, started = cpu_seconds(server_pid), time.perf_counter()
    count = int(seconds * requests_per_s)
    await asyncio.gather(*(one(started + index / requests_per_s) for index in range(count)))
    return latencies, time.perf_counter() - started, cpu_seconds(server_pid) - cpu_before


async def measure(
    url: str, token: str, batch: int, clients: int, seconds: float, via: str, server_pid: int
) -> dict:
    """Items/s and latency percentiles at one batch size: closed loops of raw posts (pre-encoded JSON),
    of RewardClient calls, or ("paced") raw posts arriving at the goal's GOAL_ITEMS_PER_S."""
    items = make_items(batch)
    if via == "RewardClient":
        settings = RewardServerSettings(url=url, auth_token=SecretStr(token), max_batch_items=max(batch, 1))
        async with RewardClient(settings) as client:

            async def send() -> None:
                await client.score(items)

            latencies, elapsed, server_cpu = await run_clients(send, clients, seconds, server_pid)
    else:
        body = ScoreRequest(items=items).model_dump_json().encode()
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        limits = httpx.Limits(max_connections=4 * clients, max_keepalive_connections=4 * clients)
        async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as http:

            async def send() -> None:
                response = await http.post("/v1/score", content=body)
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")

            if via == "paced":
                rate = GOAL_ITEMS_PER_S / batch
                latencies, elapsed, server_cpu = await run_paced(send, rate, seconds, server_pid)
            else:
                latencies, elapsed, server_cpu = await run_clients(send, clients, seconds, server_pid)
    lat_ms = np.array(latencies) * 1e3
    return {
        "via": via,
        "batch": batch,
        "clients": clients,
        "requests": len(latencies),
        "seconds": round(elapsed, 3),
        "items_per_s": len(latencies) * batch / elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "max_ms": float(lat_ms.max()),
        # Server CPU per request is what the server itself costs, whatever else shares the machine.
        "server_cpu_ms_per_request": server_cpu * 1e3 / len(latencies),
        "items_per_server_cpu_s": len(latencies) * batch / server_cpu if server_cpu > 0 else float("nan"),
    }


def start_server(port: int, token: str) -> subprocess.Popen:
    """A real reward server on loopback, as deploy runs it (1 uvicorn worker, auth on)."""
    env = {**os.environ, "SF_REWARD_SERVER__AUTH_TOKEN": token}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reward_server",
            "--set",
            f"reward_server.port={port}",
            "--set",
            "reward_server.host=127.0.0.1",
            "--set",
            "telemetry.log_level=WARNING",
        ],
        cwd=ROOT,
        env=env,
    )
    wait_for_port(port, timeout_s=60)
    return process


def main() -> None:
    """Measure each batch size, print the table and write bench/results/reward_server.json."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 s per case instead of 5 s")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (connections)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where reward_server.json goes")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 5.0
    port, token = free_port(), secrets.token_urlsafe(24)
    url = f"http://127.0.0.1:{port}"
    # Raw httpx with a pre-encoded body measures the server; RewardClient adds the worker's own client costs.
    cases = [("httpx", batch) for batch in args.batches] + [("RewardClient", 64), ("paced", 64)]
    load_before = os.getloadavg()[0]
    server = start_server(port, token)
    try:
        rows = [
            asyncio.run(measure(url, token, batch, args.clients, seconds, via, server.pid))
            for via, batch in tqdm(cases, desc="cases")
        ]
    finally:
        server.terminate()
        server.wait(timeout=10)
    columns = [
        "via",
        "batch",
        "clients",
        "requests",
        "items_per_s",
        "requests_per_s",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "server_cpu_ms_per_request",
        "items_per_server_cpu_s",
    ]
    print_table(
        f"reward server, {args.clients} concurrent clients, {seconds:g} s per case (1 uvicorn worker)",
        columns,
        [[row[column] for column in columns] for row in rows],
    )
    saturated = next((row for row in rows if row["via"] == "httpx" and row["batch"] == 64), None)
    paced = next(row for row in rows if row["via"] == "paced")
    goal = {
        "items_per_s_at_64": GOAL_ITEMS_PER_S,
        "p99_ms_at_64": GOAL_P99_MS,
        "throughput_met": saturated is not None and saturated["items_per_s"] >= GOAL_ITEMS_PER_S,
        "p99_met_at_goal_rate": paced["p99_ms"] < GOAL_P99_MS,
        "p99_met_at_saturation": saturated is not None and saturated["p99_ms"] < GOAL_P99_MS,
    }
    print(
        f"goal at batch 64: >= {GOAL_ITEMS_PER_S} items/s (saturated closed loop: "
        f"{'met' if goal['throughput_met'] else 'NOT met'}); p99 < {GOAL_P99_MS} ms at {GOAL_ITEMS_PER_S} items/s "
        f"offered ({'met' if goal['p99_met_at_goal_rate'] else 'NOT met'}) and at saturation "
        f"({'met' if goal['p99_met_at_saturation'] else 'NOT met'})"
    )
    payload = {
        "load_average_1m_before": load_before,
        "load_average_1m_after": os.getloadavg()[0],
        "seconds_per_case": seconds,
        "rows": rows,
        "goal": goal,
    }
    print(f"wrote {save_results('reward_server', payload, args.results_dir)}")


if __name__ == "__main__":
    main()

"""Helpers the test fixtures share: free ports, and a real redis-server process we can kill and restart."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

REPO = Path(__file__).resolve().parents[1]


def run_quick_bench(script: str, results_dir: Path, timeout: int) -> subprocess.CompletedProcess:
    """Run a bench script (path from the repo root) with --quick into results_dir; fail with its output if it fails."""
    result = subprocess.run(
        [sys.executable, script, "--quick", "--results-dir", str(results_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 30.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout_s}s")


def stop_process(process: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    """SIGTERM a process, then SIGKILL it if it has not exited within timeout_s."""
    if process is None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)


def exported_sample_names(exposition: str) -> set[str]:
    """Every sample name a Prometheus text exposition can produce, from its # TYPE lines."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.MULTILINE):
        names.add(name)
        if kind == "counter":
            names.add(name if name.endswith("_total") else name + "_total")
        if kind == "histogram":
            names.update({name + "_bucket", name + "_sum", name + "_count"})
    return names


def dashboard_metric_uses(dashboards_dir: Path) -> list[tuple[str, str]]:
    """(where, metric) for every sf_* metric a Grafana dashboard query names; where = 'file: panel title'."""
    uses = []
    for path in sorted(dashboards_dir.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                uses += [(f"{path.name}: {panel['title']!r}", metric)
                         for metric in re.findall(r"\bsf_[a-z0-9_]+", target["expr"])]
    return uses


class RedisServer:
    """A real redis-server on a free loopback port, with AOF on, that a test can kill -9 and restart."""

    def __init__(self, workdir: Path, password: str = "test-password") -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed; run `make setup`")
        self.workdir = workdir
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart) the server on the same port and data folder."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--requirepass", self.password, "--appendonly", "yes", "--appendfsync", "always",
                "--save", "", "--daemonize", "no", "--logfile", str(self.workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        client = self.client()
        deadline = time.monotonic() + 30
        while True:  # the port opens before an AOF replay finishes
            try:
                client.ping()
                break
            except redis.exceptions.BusyLoadingError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        """Terminate the server gracefully."""
        stop_process(self.process)
        self.process = None

    def client(self) -> redis.Redis:
        """A plain client for assertions (no retries, so tests see the truth)."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)


# ---- a reward server under test (its fixture yields an object with url, port and token)
def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll condition until it holds; fail the test if it does not within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def inflight(server) -> int:
    """Requests the server is handling now, as /healthz reports."""
    return httpx.get(f"{server.url}/healthz", timeout=10).json()["inflight_requests"]


def stall_a_request(server, body: bytes) -> socket.socket:
    """Send headers and the first 10 bytes of a body, withhold the rest: one request held in flight."""
    stalled = socket.create_connection(("127.0.0.1", server.port))
    stalled.sendall(
        f"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body[:10]
    )
    wait_until(lambda: inflight(server) == 1)
    return stalled


def read_until_closed(connection: socket.socket, timeout_s: float = 10) -> bytes:
    """Everything the server sends until it closes the connection: headers and body may arrive in separate
    packets, so one recv is not enough."""
    connection.settimeout(timeout_s)
    received = bytearray()
    while chunk := connection.recv(65_536):
        received += chunk
    return bytes(received)


MAX_BODY_BYTES = 8 * 1024 * 1024  # the reward server's production defaults: the heaviest batch a client may send
MAX_BATCH_ITEMS = 1024


def heavy_item(filler_chars: int) -> dict:
    """One of the slowest items the server accepts. The regex backtracks exponentially over the 16 leading
    a's (about 10 ms, inside a format timeout of 0.25 s, so it is scored, not refused), and the long run of
    numbers sends the number checker through its Python scan of the whole completion."""
    return {
        "completion_text": "a" * 16 + "!" + " 1" * (filler_chars // 2),
        "answer": "3",
        "answer_type": "number",
        "required_format": "^(a|a)*$",
        "visual_tokens_kept": 1,
        "visual_tokens_total": 2,
    }


def heavy_body(items: int = MAX_BATCH_ITEMS, max_bytes: int = MAX_BODY_BYTES) -> bytes:
    """A batch of `items` heavy items whose completions fill the body limit (within 2%)."""
    overhead = len(json.dumps({"items": [heavy_item(0)] * items}))
    body = json.dumps({"items": [heavy_item(int((max_bytes * 0.98 - overhead) / items))] * items}).encode()
    assert max_bytes * 0.96 < len(body) <= max_bytes, len(body)
    return body

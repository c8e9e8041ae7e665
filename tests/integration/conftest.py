"""Integration fixtures shared by several test files. Each fixture here is self-contained."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from services.settings import RewardServerSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- reward server -----------------------------------------------------------------------------------------


@dataclass
class RewardServerProcess:
    """A real `python -m reward_server` (uvicorn, one worker) on a free loopback port."""

    workdir: Path
    limits: dict[str, object] = field(default_factory=dict)  # reward_server.* settings of this instance
    token: str | None = field(default_factory=lambda: secrets.token_urlsafe(24))
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        """The Authorization header a client of this server sends."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client_settings(self, **changes: object) -> RewardServerSettings:
        """RewardServerSettings that point a RewardClient at this server (with the same limits)."""
        fields: dict[str, object] = {
            **self.limits,
            "url": self.url,
            "auth_token": SecretStr(self.token) if self.token else None,
            "client_backoff_s": 0.05,
            "client_backoff_cap_s": 0.5,
            **changes,
        }
        return RewardServerSettings(**fields)

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the server and wait until /healthz answers; raise with the server's log if it does not."""
        from support import free_port  # tests/ is on sys.path (tests/conftest.py puts it there)

        self.port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("SF_")}
        if self.token:
            env["SF_REWARD_SERVER__AUTH_TOKEN"] = self.token  # env, not argv: keep it out of `ps`
        log = (self.workdir / f"reward_server_{self.port}.log").open("wb")
        command = [
            sys.executable,
            "-m",
            "reward_server",
            "--set",
            f"reward_server.port={self.port}",
            "--set",
            "reward_server.host=127.0.0.1",
            "--set",
            "telemetry.log_level=WARNING",
        ]
        for name, value in self.limits.items():
            command += ["--set", f"reward_server.{name}={value}"]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"reward server exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"reward server did not answer /healthz within {timeout_s}s:\n{self.log_text()}")

    def log_text(self) -> str:
        """What the server wrote to stdout/stderr so far."""
        path = self.workdir / f"reward_server_{self.port}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Terminate the server gracefully (SIGTERM), then kill it if it hangs."""
        from support import stop_process

        stop_process(self.process)
        self.process = None


# Small limits keep the "too large" tests fast; the bench measures the defaults.
REWARD_SERVER_TEST_LIMITS: dict[str, object] = {"max_batch_items": 100, "max_body_bytes": 262_144}


@pytest.fixture(scope="session")
def start_reward_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RewardServerProcess]]:
    """Start extra reward servers with their own reward_server.* settings (auth=False: no token).
    All stop at session end."""
    started: list[RewardServerProcess] = []

    def start(auth: bool = True, **limits: object) -> RewardServerProcess:
        server = RewardServerProcess(
            tmp_path_factory.mktemp("reward_server"), limits={**REWARD_SERVER_TEST_LIMITS, **limits}
        )
        if not auth:
            server.token = None
            server.limits["auth_required"] = "false"
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def reward_server(start_reward_server: Callable[..., RewardServerProcess]) -> RewardServerProcess:
    """The session's reward server: auth on (a random token), max_batch_items=100, 256 KiB bodies."""
    return start_reward_server()

"""Start service processes and guarantee they stop: each in its own process group, stopped in reverse order."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)


class ServiceFailed(RuntimeError):
    """A supervised process exited while it was still needed; the message carries its log tail."""


@dataclass
class Service:
    """One supervised process and where its output goes."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the process's combined stdout/stderr."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-chars:]


class Supervisor:
    """Owns child processes; `stop_all` (also run on exit from the with-block) ends every one and its children."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.services: list[Service] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_all()

    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> Service:
        """Start argv in a new session (its own process group), logging to <log_dir>/<name>.log."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        # The child gets its own copy of the descriptor; the parent's is closed as soon as the child started.
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                list(argv), cwd=cwd, env=dict(env) if env is not None else None, stdout=log_file,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        service = Service(name, process, log_path)
        self.services.append(service)
        log.info("started", extra={"service": name, "pid": process.pid})
        return service

    def check_alive(self, expected_to_exit: Sequence[str] = ()) -> None:
        """Raise ServiceFailed naming the first supervised process that has exited (unless expected to)."""
        for service in self.services:
            if service.name in expected_to_exit:
                continue
            code = service.process.poll()
            if code is not None:
                raise ServiceFailed(f"{service.name} exited with code {code}; its log ends:\n{service.log_tail()}")

    def stop(self, service: Service, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the service's whole process group, then SIGKILL it after timeout_s; returns the exit code."""
        if service.process.poll() is None:
            _signal_group(service.process.pid, signal.SIGTERM)
            try:
                service.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("killing", extra={"service": service.name})
        # Children (vLLM engine cores, Ray workers) share the group and may outlive their parent.
        _signal_group(service.process.pid, signal.SIGKILL)
        service.process.wait(timeout=timeout_s)
        if service in self.services:
            self.services.remove(service)
        return service.process.returncode

    def stop_all(self) -> None:
        """Stop every service, the last started first."""
        for service in reversed(list(self.services)):
            self.stop(service)


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def wait_until(predicate, timeout_s: float, supervisor: Supervisor | None = None, poll_s: float = 0.2) -> None:
    """Poll predicate until it is true; fail early if a supervised process dies, else after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if supervisor is not None:
            supervisor.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s:.0f}s")
        time.sleep(poll_s)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on host that nothing listens on right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])

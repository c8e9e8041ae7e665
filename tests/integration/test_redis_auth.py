"""Services refuse a Redis that runs commands for anyone, unless --insecure-local allows it on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from support import RedisServer, stop_process, wait_for_port

from services.queues import InsecureRedisError, connect_redis
from services.settings import RedisSettings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def open_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server without a password (requirepass empty)."""
    server = RedisServer(tmp_path_factory.mktemp("open-redis"), password="")
    server.start()
    yield server
    server.stop()


def test_a_redis_without_authentication_is_refused_even_with_a_password_configured(open_redis) -> None:
    for settings in (RedisSettings(url=open_redis.url, password=SecretStr("ours")),
                     RedisSettings(url=open_redis.url.replace("redis://", "redis://:ours@"))):
        with pytest.raises(InsecureRedisError, match="runs commands without authentication"):
            connect_redis(settings)
    with pytest.raises(InsecureRedisError, match="no password"):
        connect_redis(RedisSettings(url=open_redis.url))
    allowed = connect_redis(RedisSettings(url=open_redis.url, insecure_local=True))  # loopback, opted in
    assert allowed.ping() is True


def test_a_redis_that_requires_a_password_is_accepted(redis_settings) -> None:
    assert connect_redis(redis_settings).ping() is True
    wrong = redis_settings.model_copy(update={"password": SecretStr("not-it")})
    with pytest.raises(Exception, match="invalid username-password"):
        connect_redis(wrong).ping()


def test_the_learner_refuses_to_start_against_it_unless_told_insecure_local(open_redis) -> None:
    command = [sys.executable, "-m", "learner.train", "--no-ray", "--set", f"redis.url={open_redis.url}"]
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2 and "refusing to start" in refused.stderr, refused.stderr[-2000:]
    assert "--insecure-local" in refused.stderr
    # With the flag the learner goes past the check and stops on the missing model, with its own message.
    allowed = subprocess.run([*command, "--insecure-local", "--set", "learner.model_path=/nonexistent"], cwd=REPO,
                             capture_output=True, text=True, timeout=120, check=False)
    assert allowed.returncode == 2 and "refusing to start" not in allowed.stderr, allowed.stderr[-2000:]
    assert "cannot start: /nonexistent is not a model folder: no such directory" in allowed.stderr


@pytest.fixture(scope="module")
def ipv6_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """A password-protected redis-server listening on the IPv6 loopback only: (port, password)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    workdir = tmp_path_factory.mktemp("ipv6-redis")
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "::1", "--requirepass", "v6-secret",
                                "--save", "", "--dir", str(workdir)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, host="::1")
        yield port, "v6-secret"
    finally:
        stop_process(process)


def test_an_ipv6_redis_url_passes_the_password_probe(ipv6_redis) -> None:
    port, password = ipv6_redis
    # The probe reconnects without credentials; its URL must keep the brackets around the IPv6 host.
    for settings in (RedisSettings(url=f"redis://[::1]:{port}/0", password=SecretStr(password)),
                     RedisSettings(url=f"redis://:{password}@[::1]:{port}/0")):
        client = connect_redis(settings)
        try:
            assert client.ping() is True
        finally:
            client.close()

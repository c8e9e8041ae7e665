"""Fixtures that start real components on free loopback ports, once per test session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).parent))

from support import RedisServer

from services.settings import RedisSettings


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server (AOF on, password set) shared by the session; flush it per test if needed."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def redis_settings(redis_server: RedisServer) -> RedisSettings:
    """Settings pointing at the session's redis-server, with its database flushed for this test."""
    redis_server.client().flushdb()
    return RedisSettings(
        url=redis_server.url, password=SecretStr(redis_server.password), connect_retries=20,
        retry_backoff_cap_s=0.5,
    )

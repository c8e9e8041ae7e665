"""Fixtures that start real components on free loopback ports, once per test session."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).parent))

from support import RedisServer

from services.settings import RedisSettings

_MODULE_MARKS = re.compile(r"^pytestmark = (.+)$", re.MULTILINE)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Skip importing a test module that ``-m "not M and ..."`` deselects whole (its ``pytestmark`` carries M).

    Collection imports every module, marks or not: without this, ``make test-fast`` spent seconds importing
    vLLM for modules whose every test it then deselects.
    """
    excluded = {part.strip()[len("not "):].strip() for part in config.option.markexpr.split(" and ")
                if part.strip().startswith("not ")}
    if not excluded or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    found = _MODULE_MARKS.search(collection_path.read_text(encoding="utf-8"))
    marks = set(re.findall(r"pytest\.mark\.(\w+)", found.group(1))) if found else set()
    return True if marks & excluded else None


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

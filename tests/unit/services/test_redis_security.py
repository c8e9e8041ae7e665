"""Services refuse an unauthenticated Redis unless it is on loopback and explicitly allowed."""

import pytest
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError

from services.queues import InsecureRedisError, check_redis_security, is_loopback_host
from services.queues.connection import RetryUnlessRefused, without_credentials
from services.settings import RedisSettings


def test_password_from_settings_or_url_is_accepted() -> None:
    check_redis_security(RedisSettings(url="redis://redis.internal:6379/0", password=SecretStr("s3cret")))
    check_redis_security(RedisSettings(url="redis://:s3cret@redis.internal:6379/0"))


def test_no_password_is_refused_without_insecure_local() -> None:
    with pytest.raises(InsecureRedisError, match="no password"):
        check_redis_security(RedisSettings(url="redis://127.0.0.1:6379/0"))


def test_insecure_local_is_only_for_loopback() -> None:
    check_redis_security(RedisSettings(url="redis://127.0.0.1:6379/0", insecure_local=True))
    check_redis_security(RedisSettings(url="redis://localhost:6379/0", insecure_local=True))
    with pytest.raises(InsecureRedisError, match="loopback"):
        check_redis_security(RedisSettings(url="redis://10.0.0.5:6379/0", insecure_local=True))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("localhost", True), ("10.0.0.1", False),
     ("redis", False), ("0.0.0.0", False)],
)
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize(
    ("url", "anonymous"),
    [("redis://:pw@[::1]:6379/0", "redis://[::1]:6379/0"),
     ("redis://user:pw@[2001:db8::7]:6380/2?socket_timeout=3", "redis://[2001:db8::7]:6380/2?socket_timeout=3"),
     ("rediss://user:pw@redis.internal/1", "rediss://redis.internal/1"),
     ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0")],
)
def test_without_credentials_keeps_host_port_and_database(url: str, anonymous: str) -> None:
    assert without_credentials(url) == anonymous
    parsed, original = parse_url(anonymous), parse_url(url)
    assert "password" not in parsed and "username" not in parsed
    assert (parsed["host"], parsed.get("port"), parsed.get("db")) == (
        original["host"], original.get("port"), original.get("db"))


def test_insecure_local_accepts_the_ipv6_loopback() -> None:
    check_redis_security(RedisSettings(url="redis://[::1]:6379/0", insecure_local=True))
    with pytest.raises(InsecureRedisError, match="loopback"):
        check_redis_security(RedisSettings(url="redis://[2001:db8::7]:6379/0", insecure_local=True))


def test_a_refused_login_is_not_retried_but_a_dropped_connection_is() -> None:
    retry = RetryUnlessRefused(NoBackoff(), retries=5)
    calls, failures = [], []

    def refused() -> None:
        calls.append("login")
        raise AuthenticationError("invalid username-password pair")

    # redis-py's AuthenticationError is a ConnectionError: a plain Retry would try six times.
    assert issubclass(AuthenticationError, RedisConnectionError)
    with pytest.raises(AuthenticationError):
        retry.call_with_retry(refused, failures.append)
    assert calls == ["login"] and failures == []

    def dropped_twice() -> str:
        calls.append("ping")
        if calls.count("ping") < 3:
            raise RedisConnectionError("connection reset")
        return "PONG"

    assert retry.call_with_retry(dropped_twice, failures.append) == "PONG"
    assert calls.count("ping") == 3 and len(failures) == 2

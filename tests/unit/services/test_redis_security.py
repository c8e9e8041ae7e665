"""Services refuse an unauthenticated Redis unless it is on loopback and explicitly allowed."""

import pytest
from pydantic import SecretStr

from services.queues import InsecureRedisError, check_redis_security, is_loopback_host
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

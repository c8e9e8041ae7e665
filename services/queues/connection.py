"""Build a Redis client from settings: auth, TLS, and retries with backoff on connection loss."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlparse

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from services.settings.models import RedisSettings


class InsecureRedisError(RuntimeError):
    """Refusing a Redis without a password (or insecure_local for a non-loopback host)."""


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_redis_security(settings: RedisSettings) -> None:
    """Refuse to run against an unauthenticated Redis unless it is local and explicitly allowed."""
    parsed = urlparse(settings.url)
    has_password = settings.password is not None or bool(parsed.password)
    if has_password:
        return
    host = parsed.hostname or ""
    if not settings.insecure_local:
        raise InsecureRedisError(
            f"Redis at {settings.url} has no password; set redis.password (SF_REDIS__PASSWORD), "
            "or redis.insecure_local=true for a throw-away Redis on loopback"
        )
    if not is_loopback_host(host):
        raise InsecureRedisError(f"redis.insecure_local is only allowed for a loopback host, not {host!r}")


def connect_redis(settings: RedisSettings) -> redis.Redis:
    """A Redis client that retries with jittered exponential backoff when the connection drops."""
    check_redis_security(settings)
    retry = Retry(
        ExponentialWithJitterBackoff(cap=settings.retry_backoff_cap_s, base=0.05),
        retries=settings.connect_retries,
    )
    options: dict[str, object] = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
        "retry": retry,
        "retry_on_error": [RedisConnectionError, RedisTimeoutError, ConnectionResetError],
        "health_check_interval": 30,
    }
    if settings.password is not None:
        options["password"] = settings.password.get_secret_value()
    if settings.username is not None:
        options["username"] = settings.username
    url = settings.url
    if settings.tls and url.startswith("redis://"):
        url = "rediss://" + url[len("redis://") :]
    if url.startswith("rediss://") and settings.tls_ca_cert is not None:
        options["ssl_ca_certs"] = str(settings.tls_ca_cert)
    return redis.Redis.from_url(url, **options)

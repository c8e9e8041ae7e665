"""Build a Redis client from settings: auth, TLS, and retries with backoff on connection loss."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from services.settings.models import RedisSettings

T = TypeVar("T")


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
            "or pass --insecure-local (redis.insecure_local=true) for a throw-away Redis on loopback"
        )
    if not is_loopback_host(host):
        raise InsecureRedisError(f"redis.insecure_local is only allowed for a loopback host, not {host!r}")


def host_and_port(url: str) -> str:
    """The url's host[:port], an IPv6 host in brackets (as a URL needs it)."""
    parsed = urlsplit(url)
    host = parsed.hostname or ""
    if ":" in host:  # hostname drops the brackets of an IPv6 literal; "::1:6379" would not parse back
        host = f"[{host}]"
    return host if parsed.port is None else f"{host}:{parsed.port}"


def without_credentials(url: str) -> str:
    """The url with its user name and password removed; scheme, host, port, database and query kept."""
    return urlunsplit(urlsplit(url)._replace(netloc=host_and_port(url)))


def answers_without_credentials(url: str, options: dict[str, object], retries: int, backoff_cap_s: float) -> bool:
    """Whether the server at url runs commands for a client that sends no credentials (retrying while it
    cannot be reached, e.g. still starting)."""
    client = redis.Redis.from_url(without_credentials(url), **options)
    try:
        for attempt in range(retries + 1):
            try:
                client.ping()
                return True
            except (AuthenticationError, ResponseError):  # NOAUTH / authentication required
                return False
            except (RedisConnectionError, RedisTimeoutError):
                if attempt == retries:
                    raise
                time.sleep(min(backoff_cap_s, 0.05 * 2**attempt))
    finally:
        client.close()
    return False


class RetryUnlessRefused(Retry):
    """redis-py's Retry, except that a refused login fails at once: redis-py's AuthenticationError is a
    ConnectionError, so a plain Retry would back off through every retry before saying the password is wrong."""

    def call_with_retry(
        self, do: Callable[[], T], fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None, with_failure_count: bool = False,
    ) -> T:
        """Retry ``do`` as Retry does, never on an authentication error."""
        def retryable(error: Exception) -> bool:
            return not isinstance(error, AuthenticationError) and (is_retryable is None or is_retryable(error))

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def connect_redis(settings: RedisSettings) -> redis.Redis:
    """A Redis client that retries with jittered exponential backoff when the connection drops.

    Refuses (InsecureRedisError) settings without a password, and a server that runs commands for anyone,
    unless `redis.insecure_local` (the --insecure-local flag) allows a throw-away Redis on loopback.
    """
    check_redis_security(settings)
    retry = RetryUnlessRefused(
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
    probe = {key: value for key, value in options.items() if key not in ("retry", "password", "username")}
    if not settings.insecure_local and answers_without_credentials(
        url, probe | {"retry": Retry(ExponentialWithJitterBackoff(), retries=0)}, settings.connect_retries,
        settings.retry_backoff_cap_s,
    ):
        raise InsecureRedisError(
            f"Redis at {host_and_port(url)} runs commands without authentication; give it a "
            "password (requirepass or an ACL user), or pass --insecure-local for a throw-away Redis on loopback"
        )
    return redis.Redis.from_url(url, **options)

"""Redis Streams work queues shared by the services."""

from services.queues.connection import (
    InsecureRedisError,
    check_redis_security,
    connect_redis,
    is_loopback_host,
)
from services.queues.streams import DeadLetter, Entry, QueueFull, Rejection, StreamQueue

__all__ = [
    "DeadLetter",
    "Entry",
    "InsecureRedisError",
    "QueueFull",
    "Rejection",
    "StreamQueue",
    "check_redis_security",
    "connect_redis",
    "is_loopback_host",
]

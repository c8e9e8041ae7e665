"""Versioned policy weights: publish a folder with its hash, announce it on Redis, verify before loading."""

from services.weights.store import (
    WeightIntegrityError,
    announce_weights,
    hash_weights_folder,
    latest_weight_version,
    publish_weights_folder,
    verify_weights,
    weights_channel,
    weights_key,
)

__all__ = [
    "WeightIntegrityError",
    "announce_weights",
    "hash_weights_folder",
    "latest_weight_version",
    "publish_weights_folder",
    "verify_weights",
    "weights_channel",
    "weights_key",
]

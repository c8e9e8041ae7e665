"""Versioned policy weights: write a version with its hashes, announce it on Redis, verify what is loaded."""

from services.weights.store import (
    WeightIntegrityError,
    announce_weights,
    copy_verified_weights,
    hash_weights_folder,
    latest_weight_version,
    publish_weights_folder,
    verify_weights,
    weights_channel,
    weights_key,
)
from services.weights.stream import (
    copy_verified_version,
    link_version,
    load_verified_into,
    verified_tensors,
    write_weights_version,
)

__all__ = [
    "WeightIntegrityError",
    "announce_weights",
    "copy_verified_version",
    "copy_verified_weights",
    "hash_weights_folder",
    "latest_weight_version",
    "link_version",
    "load_verified_into",
    "publish_weights_folder",
    "verified_tensors",
    "verify_weights",
    "weights_channel",
    "weights_key",
    "write_weights_version",
]

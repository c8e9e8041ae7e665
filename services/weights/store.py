"""Weight versions live as HF folders on a shared path; Redis holds the latest announcement (key + pub/sub).

A folder is hashed over what a worker loads from it (its safetensors blobs and the model config files
that say how to read them, sorted by name), so a worker can refuse a version that was corrupted or
swapped in transit before it touches the engine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import redis

from services.schemas import WeightVersion, decode, encode

HASH_CHUNK_BYTES = 8 * 1024 * 1024
# Read by from_pretrained / vLLM next to the blobs; the processor files are not reloaded with new weights.
MODEL_CONFIG_FILES = ("config.json", "generation_config.json")


class WeightIntegrityError(RuntimeError):
    """A weight folder is missing, or its hash does not match its announcement."""


def weights_key(run_name: str) -> str:
    """Redis key that holds the run's latest WeightVersion."""
    return f"sf:{run_name}:weights:latest"


def weights_channel(run_name: str) -> str:
    """Redis pub/sub channel on which new WeightVersions are announced."""
    return f"sf:{run_name}:weights:announce"


def hash_weights_folder(folder: Path) -> tuple[str, int]:
    """sha256 over the folder's *.safetensors files and model config files (name, then bytes, in name order),
    and their total size in bytes.

    The config counts too: from_pretrained reads config.json next to the blob, so an unhashed config could
    change what the verified weights are loaded into.
    """
    blobs = list(Path(folder).glob("*.safetensors"))
    if not blobs:
        raise WeightIntegrityError(f"no *.safetensors files in {folder}")
    configs = [Path(folder) / name for name in MODEL_CONFIG_FILES if (Path(folder) / name).is_file()]
    digest, total = hashlib.sha256(), 0
    for path in sorted(blobs + configs):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
                total += len(chunk)
    return digest.hexdigest(), total


def publish_weights_folder(source: Path, weights_root: Path, version: int, learner_step: int = 0) -> WeightVersion:
    """Copy a saved HF folder to <weights_root>/v<version> atomically and describe it with its hash."""
    target = Path(weights_root) / f"v{version:06d}"
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    sha256, num_bytes = hash_weights_folder(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)  # readers never see a half-written version folder
    return WeightVersion(
        version=version, uri=str(target), sha256=sha256, num_bytes=num_bytes, learner_step=learner_step
    )


def announce_weights(client: redis.Redis, run_name: str, weight_version: WeightVersion) -> None:
    """Record the version as the run's latest and notify subscribers."""
    payload = encode(weight_version)
    pipe = client.pipeline(transaction=True)
    pipe.set(weights_key(run_name), payload)
    pipe.publish(weights_channel(run_name), payload)
    pipe.execute()


def latest_weight_version(client: redis.Redis, run_name: str) -> WeightVersion | None:
    """The run's latest announced WeightVersion, or None before the first publish."""
    payload = client.get(weights_key(run_name))
    return None if payload is None else decode(WeightVersion, payload)


def verify_weights(weight_version: WeightVersion) -> Path:
    """Check the announced folder's hash and size; return the folder, or raise WeightIntegrityError."""
    folder = Path(weight_version.uri)
    if not folder.is_dir():
        raise WeightIntegrityError(f"weights v{weight_version.version}: folder {folder} does not exist")
    sha256, num_bytes = hash_weights_folder(folder)
    if sha256 != weight_version.sha256 or num_bytes != weight_version.num_bytes:
        raise WeightIntegrityError(
            f"weights v{weight_version.version} at {folder}: hash {sha256[:12]}… ({num_bytes} bytes) does not "
            f"match the announced {weight_version.sha256[:12]}… ({weight_version.num_bytes} bytes)"
        )
    return folder

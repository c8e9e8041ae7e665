"""Weight versions live as HF folders on a shared path; Redis holds the latest announcement (key + pub/sub).

A folder is hashed over what a worker loads from it (its safetensors blobs and the model config files
that say how to read them, sorted by name), so a worker can refuse a version that was corrupted or
swapped in transit before it touches the engine. A worker does not load the shared folder itself: it copies
those files into a private folder, hashing the bytes as it writes them (copy_verified_weights), and loads
that copy; so what was checked is what is loaded, even if the shared folder is pruned or rewritten meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path

import redis

from services.schemas import WeightVersion, decode, encode
from services.weights.manifest import MODEL_CONFIG_FILES, WeightIntegrityError
from services.weights.stream import copy_verified_version, verify_version

__all__ = ["MODEL_CONFIG_FILES", "WeightIntegrityError"]  # re-exported: callers import them from here

HASH_CHUNK_BYTES = 8 * 1024 * 1024


def weights_key(run_name: str) -> str:
    """Redis key that holds the run's latest WeightVersion."""
    return f"sf:{run_name}:weights:latest"


def weights_channel(run_name: str) -> str:
    """Redis pub/sub channel on which new WeightVersions are announced."""
    return f"sf:{run_name}:weights:announce"


def weight_files(folder: Path) -> list[Path]:
    """The files a worker loads from a version folder, in hash order: its *.safetensors blobs and the model
    config files present, sorted by name."""
    blobs = list(Path(folder).glob("*.safetensors"))
    if not blobs:
        raise WeightIntegrityError(f"no *.safetensors files in {folder}")
    configs = [Path(folder) / name for name in MODEL_CONFIG_FILES if (Path(folder) / name).is_file()]
    return sorted(blobs + configs)


def _hash_files(files: list[Path], copy_to: Path | None = None) -> tuple[str, int]:
    """sha256 over (name, then bytes) of each file and their total size; with copy_to, each file is also
    written there, from the very bytes that were hashed."""
    digest, total = hashlib.sha256(), 0
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as source, contextlib.ExitStack() as stack:
            target = stack.enter_context((copy_to / path.name).open("xb")) if copy_to is not None else None
            while chunk := source.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
                total += len(chunk)
                if target is not None:
                    target.write(chunk)
    return digest.hexdigest(), total


def hash_weights_folder(folder: Path) -> tuple[str, int]:
    """sha256 over the folder's *.safetensors files and model config files (name, then bytes, in name order),
    and their total size in bytes.

    The config counts too: from_pretrained reads config.json next to the blob, so an unhashed config could
    change what the verified weights are loaded into.
    """
    return _hash_files(weight_files(folder))


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


def _check_hash(weight_version: WeightVersion, folder: Path, sha256: str, num_bytes: int) -> None:
    if sha256 != weight_version.sha256 or num_bytes != weight_version.num_bytes:
        raise WeightIntegrityError(
            f"weights v{weight_version.version} at {folder}: hash {sha256[:12]}… ({num_bytes} bytes) does not "
            f"match the announced {weight_version.sha256[:12]}… ({weight_version.num_bytes} bytes)"
        )


def copy_verified_weights(weight_version: WeightVersion, destination: Path) -> Path:
    """Copy the files a worker loads from the announced folder into destination (a new folder), hashing the
    bytes as they are written; return destination once the copy matches the announcement.

    Raises WeightIntegrityError when it does not (the version is bad), and OSError (FileNotFoundError) when
    the folder is not there or a file vanishes during the copy (pruned or not yet visible: worth a retry).
    """
    source = Path(weight_version.uri)
    if not source.is_dir():
        raise FileNotFoundError(f"weights v{weight_version.version}: folder {source} does not exist")
    if weight_version.manifest_blake3 is not None:  # written in one pass: checked chunk by chunk
        return copy_verified_version(weight_version, destination)
    destination.mkdir(parents=True)
    sha256, num_bytes = _hash_files(weight_files(source), copy_to=destination)
    _check_hash(weight_version, source, sha256, num_bytes)
    return destination


def verify_weights(weight_version: WeightVersion) -> Path:
    """Check the announced folder's hash and size (or every chunk against its manifest); return the folder, or
    raise WeightIntegrityError."""
    folder = Path(weight_version.uri)
    if not folder.is_dir():
        raise WeightIntegrityError(f"weights v{weight_version.version}: folder {folder} does not exist")
    if weight_version.manifest_blake3 is not None:
        verify_version(weight_version)
        return folder
    sha256, num_bytes = hash_weights_folder(folder)
    _check_hash(weight_version, folder, sha256, num_bytes)
    return folder

"""Weight versions written in one pass and read back verified chunk by chunk.

The learner writes a state dict straight into ``<root>/v<N>.tmp/model.safetensors`` (no staging save, no
second copy), hashing each chunk from the very bytes it writes, adds manifest.json (services.weights.manifest)
and renames the folder to ``v<N>``: a reader never sees a partial version. On one host the root is a tmpfs
(/dev/shm), so the bytes move once through memory; across hosts it is a shared volume that a worker pulls
from chunk by chunk (``copy_verified_version``).

The tmpfs pages of a pruned version's blob are reused for the next one (``keep_spare_blob`` when a version is
pruned, then overwritten in place): writing into pages a tmpfs already holds is about a third cheaper than
making it allocate and clear new ones, and the spare is taken only when no worker links the blob any more.

A worker never trusts the folder between a check and a load: it hashes the bytes it has read, in its own
memory, and compares each chunk as soon as it is complete (``verified_tensors``): what was checked is what
is loaded, even if the folder is rewritten meanwhile. A mismatch raises WeightIntegrityError, and the caller
rolls the engine back (rollout_worker.weights).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import torch

from services.schemas import WeightVersion
from services.weights.manifest import (
    DEFAULT_CHUNK_BYTES,
    MANIFEST_NAME,
    MODEL_CONFIG_FILES,
    ChunkHasher,
    FileDigest,
    WeightIntegrityError,
    WeightManifest,
    manifest_digest,
)

SAFETENSORS_NAME = "model.safetensors"
# A pruned version's blob kept in the weights root so the next write reuses its pages (one at most).
SPARE_BLOB_NAME = ".spare.safetensors"
# Bytes moved per read/write call: small enough that the bytes just copied are still in cache when hashed.
PIECE_BYTES = 1024 * 1024
# Pieces handed to the hashing thread and not yet hashed: the copy runs this far ahead of the hash.
HASH_AHEAD = 4
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def version_folder(root: Path, version: int) -> Path:
    """Where version N lives under a weights root: <root>/v000N."""
    return Path(root) / f"v{version:06d}"


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat byte view, without a copy when it is a contiguous CPU tensor."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def safetensors_header(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The safetensors prefix for tensors stored in the mapping's order: 8-byte little-endian length, then the
    JSON header padded with spaces to a multiple of 8 (the format's alignment)."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name}: dtype {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def _digest_of(content: bytes, chunk_bytes: int) -> FileDigest:
    """The chunk hashes of bytes already in memory."""
    hasher = ChunkHasher(chunk_bytes)
    hasher.update(content)
    hasher.finish()
    return FileDigest(size=len(content), chunks=hasher.digests)


class HashPipeline:
    """Hashes pieces on one background thread, in order, while the caller moves the next ones.

    blake3 releases the GIL, so the hash of piece k overlaps the copy of piece k+1 (on a second core): a
    one-pass publish or load costs about max(copy, hash) instead of their sum. A piece must stay unchanged
    until hashed (the caller's tensor or buffer, never a reused scratch buffer). ``check`` sees each chunk
    completed, on the caller's thread.
    """

    def __init__(self, chunk_bytes: int, check: Callable[[list[tuple[int, str]]], None] | None = None) -> None:
        self.hasher = ChunkHasher(chunk_bytes)
        self._check = check or (lambda completed: None)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blake3")
        self._pending: deque[Future] = deque()

    def submit(self, piece: memoryview) -> None:
        """Queue a piece for hashing; waits while HASH_AHEAD pieces are already queued."""
        self._pending.append(self._executor.submit(self.hasher.update, piece))
        while len(self._pending) > HASH_AHEAD:
            self._check(self._pending.popleft().result())

    def finish(self) -> list[str]:
        """Hash what is queued, close the last chunk, stop the thread; returns every chunk's digest."""
        try:
            while self._pending:
                self._check(self._pending.popleft().result())
            self._check(self.hasher.finish())
        finally:
            self.close()
        return self.hasher.digests

    def close(self) -> None:
        """Stop the thread (queued pieces are dropped: after an error, nothing more is checked)."""
        for future in self._pending:
            future.cancel()
        self._executor.shutdown(wait=True)


def keep_spare_blob(folder: Path) -> bool:
    """Move a version's blob out of a folder about to be pruned, as the weights root's spare, when nothing else
    links it; True when kept.

    The link count is read after the move: from then on the folder's name is gone, so the count can only grow
    through links that already exist (a worker that still runs or loads that version), and such a blob is
    dropped instead, left to its links. A reader that opened the blob without a link (the verified-copy
    fallback) and is still reading when the spare is overwritten sees its chunk hashes fail and refuses that
    old version; nothing unchecked is ever loaded.
    """
    spare = folder.parent / SPARE_BLOB_NAME
    try:
        os.replace(folder / SAFETENSORS_NAME, spare)
        if os.stat(spare).st_nlink == 1:
            return True
        spare.unlink()
    except OSError:  # no blob there, or not ours to move: the folder is simply removed
        pass
    return False


def _claim_spare(root: Path, path: Path) -> bool:
    """Move the weights root's spare blob to path (atomic, so one writer gets it); True when there was one."""
    try:
        os.replace(root / SPARE_BLOB_NAME, path)
    except FileNotFoundError:
        return False
    try:
        path.chmod(0o600)  # it was published read-only
    except OSError:  # not ours after all: write a new file instead
        path.unlink()
        return False
    return True


def _write_hashed(path: Path, pieces: Iterator[memoryview], chunk_bytes: int, reuse: bool = False) -> FileDigest:
    """Write the pieces to a new file (or over an existing one's bytes, with reuse, then cut to size) while a
    second thread hashes each piece from the source as it is written."""
    pipeline, size = HashPipeline(chunk_bytes), 0
    try:
        with path.open("r+b" if reuse else "xb", buffering=0) as handle:
            for piece in pieces:
                for start in range(0, len(piece), PIECE_BYTES):
                    part = piece[start:start + PIECE_BYTES]
                    handle.write(part)
                    pipeline.submit(part)
                    size += len(part)
            handle.truncate(size)
    finally:
        digests = pipeline.finish()
    return FileDigest(size=size, chunks=digests)


def write_weights_version(
    tensors: Mapping[str, torch.Tensor], root: Path, version: int, *, learner_step: int = 0,
    write_config: Callable[[Path], None] | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> WeightVersion:
    """Write tensors as <root>/v<version>/model.safetensors in one hashed pass, with its manifest, atomically.

    write_config writes the small files a loader reads beside the blob (config.json, generation_config.json,
    processor files) into the folder first; the model config files among them are hashed too. The folder
    appears under its final name only once every byte and the manifest are written (an atomic rename), and
    its files are made read-only. Returns the WeightVersion to announce.
    """
    target = version_folder(root, version)
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if write_config is not None:
        write_config(staging)
    files = {name: _digest_of((staging / name).read_bytes(), chunk_bytes)  # a few KB each
             for name in MODEL_CONFIG_FILES if (staging / name).is_file()}
    # One tensor at a time reaches host memory (a snapshot on the GPU is never copied to the host whole).
    blob_pieces = itertools.chain([memoryview(safetensors_header(tensors))], map(_raw_bytes, tensors.values()))
    blob = staging / SAFETENSORS_NAME
    files[SAFETENSORS_NAME] = _write_hashed(blob, blob_pieces, chunk_bytes, reuse=_claim_spare(Path(root), blob))
    manifest = WeightManifest(chunk_bytes=chunk_bytes, files=files)
    raw = manifest.to_bytes()
    (staging / MANIFEST_NAME).write_bytes(raw)
    for path in staging.iterdir():
        path.chmod(0o444)  # a version never changes once written; a stray writer gets EACCES, not silence
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)  # readers never see a half-written version folder
    return WeightVersion(version=version, uri=str(target), manifest_blake3=manifest_digest(raw),
                         num_bytes=manifest.num_bytes, learner_step=learner_step)


def read_manifest(weight_version: WeightVersion, folder: Path | None = None) -> WeightManifest:
    """The version's manifest, once its blake3 matches the announcement.

    Raises FileNotFoundError when the folder or manifest is not there (pruned, or not visible yet: worth a
    retry) and WeightIntegrityError when it does not match.
    """
    folder = Path(folder if folder is not None else weight_version.uri)
    raw = (folder / MANIFEST_NAME).read_bytes()
    if weight_version.manifest_blake3 is None or manifest_digest(raw) != weight_version.manifest_blake3:
        raise WeightIntegrityError(
            f"weights v{weight_version.version} at {folder}: manifest hash {manifest_digest(raw)[:12]}… does not "
            f"match the announced {str(weight_version.manifest_blake3)[:12]}…"
        )
    manifest = WeightManifest.model_validate_json(raw)
    if manifest.num_bytes != weight_version.num_bytes:
        raise WeightIntegrityError(f"weights v{weight_version.version}: the manifest covers {manifest.num_bytes} "
                                   f"bytes, the announcement {weight_version.num_bytes}")
    return manifest


class VerifiedReader:
    """Reads one file of a version into caller buffers, checking each chunk's blake3 once it is complete.

    The hash is taken over the caller's buffer after the read, so a file rewritten during the read can only
    make the check fail, never slip unchecked bytes through. Buffers passed to ``readinto`` must stay
    unchanged until ``close`` (they are hashed on a second thread); ``close`` checks the last chunk and the size.
    """

    def __init__(self, path: Path, digest: FileDigest, chunk_bytes: int, version: int) -> None:
        self.path, self.digest, self.version = path, digest, version
        self.handle: BinaryIO = path.open("rb", buffering=0)
        self.position = 0
        size = os.fstat(self.handle.fileno()).st_size
        if size != digest.size:
            self.handle.close()
            raise WeightIntegrityError(f"weights v{version}: {path.name} has {size} bytes, the manifest "
                                       f"{digest.size}")
        self.pipeline = HashPipeline(chunk_bytes, self._check)

    def readinto(self, view: memoryview) -> None:
        """Fill the whole buffer with the file's next bytes; chunks are checked as their hashes complete."""
        if self.position + len(view) > self.digest.size:
            raise WeightIntegrityError(f"weights v{self.version}: read past the end of {self.path.name}")
        for start in range(0, len(view), PIECE_BYTES):
            part = view[start:start + PIECE_BYTES]
            filled = 0
            while filled < len(part):
                count = self.handle.readinto(part[filled:])
                if not count:
                    raise WeightIntegrityError(f"weights v{self.version}: {self.path.name} ended early")
                filled += count
            self.pipeline.submit(part)
        self.position += len(view)

    def abort(self) -> None:
        """Stop reading after an error: close the file and the hashing thread."""
        self.handle.close()
        self.pipeline.close()

    def close(self) -> None:
        """Check that the whole file was read and every chunk matches; close the file."""
        self.handle.close()
        digests = self.pipeline.finish()
        if self.position != self.digest.size:
            raise WeightIntegrityError(f"weights v{self.version}: {self.path.name} was read up to {self.position} "
                                       f"of {self.digest.size} bytes")
        if len(digests) != len(self.digest.chunks):
            raise WeightIntegrityError(f"weights v{self.version}: {self.path.name} has {len(digests)} chunks, the "
                                       f"manifest {len(self.digest.chunks)}")

    def _check(self, completed: list[tuple[int, str]]) -> None:
        for index, digest in completed:
            if index >= len(self.digest.chunks) or digest != self.digest.chunks[index]:
                raise WeightIntegrityError(f"weights v{self.version}: chunk {index} of {self.path.name} does not "
                                           "match its manifest hash")


def _parse_header(raw: bytes, data_bytes: int) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """(name, dtype, shape, start, end) of each tensor, in file order; refuses offsets that do not tile the
    data section (a header changed in place is caught by its chunk hash too, but only after it is used)."""
    try:
        entries = sorted(((name, spec) for name, spec in json.loads(raw).items() if name != "__metadata__"),
                         key=lambda item: item[1]["data_offsets"][0])
        layout, expected = [], 0
        for name, spec in entries:
            start, end = spec["data_offsets"]
            dtype, shape = _DTYPES.get(spec["dtype"]), [int(size) for size in spec["shape"]]
            if dtype is None or start != expected or end - start != math.prod(shape) * dtype.itemsize:
                raise WeightIntegrityError(f"safetensors header entry {name} is malformed: {spec}")
            layout.append((name, dtype, shape, start, end))
            expected = end
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # not JSON, or not the format's shape
        raise WeightIntegrityError(f"safetensors header is malformed: {error}") from error
    if expected != data_bytes:
        raise WeightIntegrityError(f"safetensors header covers {expected} of {data_bytes} data bytes")
    return layout


def verified_tensors(
    weight_version: WeightVersion, destination: Mapping[str, torch.Tensor] | None = None,
    folder: Path | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each (name, tensor) of the version's safetensors blob, read once and verified chunk by chunk.

    With destination, a tensor it names is loaded into that tensor in place (an engine's parameter: the same
    shape; read straight into it when the dtype matches, else cast into it); the others into new tensors. A chunk is checked as soon as its last byte is
    read, so a tensor may be yielded before the chunk it ends in is checked: exhaust the iterator before
    trusting what was loaded (the last check runs on exhaustion), and roll back on WeightIntegrityError.
    """
    folder = Path(folder if folder is not None else weight_version.uri)
    manifest = read_manifest(weight_version, folder)
    if SAFETENSORS_NAME not in manifest.files:
        raise WeightIntegrityError(f"weights v{weight_version.version}: the manifest lists no {SAFETENSORS_NAME}")
    for name, digest in manifest.files.items():  # config files: small, checked whole before any tensor
        if name != SAFETENSORS_NAME:
            _read_whole(folder / name, digest, manifest.chunk_bytes, weight_version.version)
    digest = manifest.files[SAFETENSORS_NAME]
    reader = VerifiedReader(folder / SAFETENSORS_NAME, digest, manifest.chunk_bytes, weight_version.version)
    try:
        length = bytearray(8)
        reader.readinto(memoryview(length))
        header_bytes = int.from_bytes(length, "little")
        if header_bytes > digest.size - 8:
            raise WeightIntegrityError(f"weights v{weight_version.version}: header length {header_bytes} is too big")
        header = bytearray(header_bytes)
        reader.readinto(memoryview(header))
        for name, dtype, shape, start, end in _parse_header(bytes(header), digest.size - 8 - header_bytes):
            target = destination.get(name) if destination is not None else None
            if target is not None and list(target.shape) != shape:
                raise ValueError(f"tensor {name}: the destination has shape {list(target.shape)}, the version "
                                 f"{shape}")
            # Straight into the destination when the bytes fit it as they are; else through a host tensor
            # (another dtype, a GPU tensor), copied over once read.
            direct = target is not None and target.dtype == dtype and target.is_contiguous() and not target.is_cuda
            tensor = target if direct else torch.empty(shape, dtype=dtype)
            if end > start:
                reader.readinto(memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy()))
            if target is not None and not direct:
                with torch.no_grad():
                    target.copy_(tensor)
            yield name, target if target is not None else tensor
    except BaseException:  # a mismatch, a bad destination, or the consumer stopped early
        reader.abort()
        raise
    reader.close()


def load_verified_into(weight_version: WeightVersion, destination: Mapping[str, torch.Tensor],
                       folder: Path | None = None) -> list[str]:
    """Read the version into the destination tensors in place, verifying every chunk; returns the names of
    the version's tensors that the destination does not hold (read and checked, then dropped)."""
    return [name for name, _ in verified_tensors(weight_version, destination, folder) if name not in destination]


def _read_whole(path: Path, digest: FileDigest, chunk_bytes: int, version: int) -> bytes:
    reader = VerifiedReader(path, digest, chunk_bytes, version)
    content = bytearray(digest.size)
    try:
        reader.readinto(memoryview(content))
    except BaseException:
        reader.abort()
        raise
    reader.close()
    return bytes(content)


def _pull(weight_version: WeightVersion, destination: Path | None) -> WeightManifest:
    """Read every file of the version chunk by chunk, checking each; with destination, write them there."""
    source = Path(weight_version.uri)
    manifest = read_manifest(weight_version, source)
    # A ring of buffers: one is refilled only after the hashing thread is done with it (HASH_AHEAD behind).
    ring = [memoryview(bytearray(PIECE_BYTES)) for _ in range(HASH_AHEAD + 2)]
    for name, digest in manifest.files.items():
        reader = VerifiedReader(source / name, digest, manifest.chunk_bytes, weight_version.version)
        try:
            with contextlib.ExitStack() as stack:
                target = stack.enter_context((destination / name).open("xb", buffering=0)) if destination else None
                for index, start in enumerate(range(0, digest.size, PIECE_BYTES)):
                    part = ring[index % len(ring)][:min(PIECE_BYTES, digest.size - start)]
                    reader.readinto(part)
                    if target is not None:
                        target.write(part)
        except BaseException:
            reader.abort()
            raise
        reader.close()
    return manifest


def copy_verified_version(weight_version: WeightVersion, destination: Path) -> Path:
    """Pull the version's files into destination (a new folder), checking each chunk as it arrives; returns
    destination, holding the same manifest, once every file matches.

    For a folder on a shared volume (another host) or an engine that loads folders: the copy is what was
    checked. Raises WeightIntegrityError on a mismatch, OSError when the source is missing (worth a retry).
    """
    destination.mkdir(parents=True)
    manifest = _pull(weight_version, destination)
    (destination / MANIFEST_NAME).write_bytes(manifest.to_bytes())
    return destination


def verify_version(weight_version: WeightVersion) -> None:
    """Read every file of the version once and check each chunk; raises WeightIntegrityError on a mismatch."""
    _pull(weight_version, None)


def link_version(weight_version: WeightVersion, destination: Path) -> WeightVersion:
    """Hard-link the version's files into destination (a new folder) and return the version pointing there.

    A link costs nothing and keeps the bytes alive when the learner prunes its folder, so a worker can reload
    the version it runs (a rollback) without holding a copy. Where links are refused (another file system,
    another owner), it falls back to a verified copy. The linked files are still verified on every read.
    """
    source = Path(weight_version.uri)
    manifest = read_manifest(weight_version, source)
    destination.mkdir(parents=True)
    try:
        for name in (*manifest.files, MANIFEST_NAME):
            os.link(source / name, destination / name)
    except FileNotFoundError:
        raise
    except OSError:  # EXDEV, EPERM: not on this file system or not ours
        shutil.rmtree(destination, ignore_errors=True)
        copy_verified_version(weight_version, destination)
    return weight_version.model_copy(update={"uri": str(destination)})

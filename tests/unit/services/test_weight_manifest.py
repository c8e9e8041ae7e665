"""Chunk hashes do not depend on how the bytes are fed, and the manifest round-trips canonically."""

import itertools

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.weights.manifest import ChunkHasher, FileDigest, WeightManifest, manifest_digest


@given(data=st.binary(max_size=300), chunk_bytes=st.integers(1, 64), cuts=st.lists(st.integers(0, 300), max_size=6))
def test_chunk_digests_are_the_blake3_of_each_slice_however_the_stream_is_split(
    data: bytes, chunk_bytes: int, cuts: list[int]
) -> None:
    hasher, completed = ChunkHasher(chunk_bytes), []
    bounds = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        completed += hasher.update(data[start:end])
    completed += hasher.finish()
    expected = [blake3.blake3(data[i:i + chunk_bytes]).hexdigest() for i in range(0, len(data), chunk_bytes)]
    assert hasher.digests == expected
    assert completed == list(enumerate(expected))  # each chunk reported once, as soon as it is complete


def test_a_chunk_is_reported_when_its_last_byte_arrives() -> None:
    hasher = ChunkHasher(4)
    assert hasher.update(b"abc") == []
    assert hasher.update(b"de") == [(0, blake3.blake3(b"abcd").hexdigest())]
    assert hasher.finish() == [(1, blake3.blake3(b"e").hexdigest())]
    with pytest.raises(ValueError, match="positive"):
        ChunkHasher(0)


def test_the_manifest_digest_pins_every_chunk_hash() -> None:
    manifest = WeightManifest(chunk_bytes=4, files={"model.safetensors": FileDigest(size=5, chunks=["a" * 64] * 2)})
    raw = manifest.to_bytes()
    assert WeightManifest.model_validate_json(raw) == manifest and manifest.num_bytes == 5
    changed = manifest.model_copy(update={"files": {"model.safetensors": FileDigest(size=5, chunks=["b" * 64] * 2)}})
    assert manifest_digest(changed.to_bytes()) != manifest_digest(raw)

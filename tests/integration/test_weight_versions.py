"""Versions written in one hashed pass: readable as safetensors, verified chunk by chunk, loaded in place by a
worker that refuses a tampered chunk and keeps serving the version before it, even once the learner pruned it."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learner.publishing import prune_versions, publish_policy, weights_snapshot
from rollout_worker.weights import WeightWatcher, process_tag, worker_folder_prefix
from services.modeling import TinyModelSpec, build_tiny_model, load_model_and_processor
from services.queues import connect_redis
from services.schemas import WeightVersion
from services.telemetry import Telemetry
from services.weights import (
    WeightIntegrityError,
    announce_weights,
    copy_verified_weights,
    load_verified_into,
    verified_tensors,
    verify_weights,
    write_weights_version,
)
from services.weights.hf import checkpoint_destination
from services.weights.stream import SPARE_BLOB_NAME, link_version

CHUNK = 64  # bytes: small chunks, so a test version spans many of them


def tensors(value: float) -> dict[str, torch.Tensor]:
    return {"generator": torch.full((8, 8), value), "scorer": torch.full((4, 4), value, dtype=torch.bfloat16),
            "step": torch.tensor(7, dtype=torch.int64)}


def write(root: Path, version: int, value: float) -> WeightVersion:
    return write_weights_version(tensors(value), root, version, chunk_bytes=CHUNK,
                                 write_config=lambda folder: (folder / "config.json").write_text("{}"))


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place (the version's files are read-only: a tamperer has to chmod first)."""
    path.chmod(0o644)
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_version_is_a_plain_safetensors_folder_announced_by_its_manifest_hash(tmp_path: Path) -> None:
    version = write(tmp_path / "weights", 1, 1.5)
    folder = Path(version.uri)
    assert folder.name == "v000001" and not list((tmp_path / "weights").glob("*.tmp"))
    loaded = load_file(str(folder / "model.safetensors"))  # the safetensors library reads our writer's blob
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors(1.5).items())
    assert version.sha256 is None and version.manifest_blake3 is not None
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["config.json", "model.safetensors"]
    assert version.num_bytes == sum(spec["size"] for spec in manifest["files"].values())
    assert all(not path.stat().st_mode & 0o222 for path in folder.iterdir())  # read-only once published
    assert verify_weights(version) == folder


@pytest.mark.parametrize("damage", ["blob byte", "truncated blob", "config", "manifest"])
def test_any_changed_byte_is_refused_before_the_read_ends(tmp_path: Path, damage: str) -> None:
    version = write(tmp_path / "weights", 1, 1.0)
    folder = Path(version.uri)
    blob = folder / "model.safetensors"
    if damage == "blob byte":
        flip_byte(blob, blob.stat().st_size - 3)  # in the last tensor, the last chunk
    elif damage == "truncated blob":
        blob.chmod(0o644)
        blob.write_bytes(blob.read_bytes()[:-1])
    elif damage == "config":
        (folder / "config.json").chmod(0o644)
        (folder / "config.json").write_text('{"num_hidden_layers": 1}')
    else:
        flip_byte(folder / "manifest.json", 10)
    destination = {name: torch.zeros_like(tensor) for name, tensor in tensors(0.0).items()}
    with pytest.raises(WeightIntegrityError):
        load_verified_into(version, destination)
    with pytest.raises(WeightIntegrityError):
        verify_weights(version)
    with pytest.raises(WeightIntegrityError):
        copy_verified_weights(version, tmp_path / "copy")


def test_a_changed_chunk_stops_the_read_soon_after_that_chunk(tmp_path: Path) -> None:
    layers = {f"layer{index:02d}": torch.full((4, 4), float(index)) for index in range(20)}  # one chunk each
    version = write_weights_version(layers, tmp_path / "weights", 1, chunk_bytes=CHUNK)
    blob = Path(version.uri) / "model.safetensors"
    data_start = blob.stat().st_size - 20 * CHUNK
    flip_byte(blob, data_start + 5)  # in the first layer
    seen = []
    with pytest.raises(WeightIntegrityError, match=f"chunk {(data_start + 5) // CHUNK} of model.safetensors"):
        for name, _tensor in verified_tensors(version):
            seen.append(name)
    assert len(seen) < len(layers)  # raised mid-read (hashing runs a few pieces behind the reads), not at the end


def test_a_header_changed_in_place_is_refused_before_any_tensor_is_read(tmp_path: Path) -> None:
    version = write(tmp_path / "weights", 1, 1.0)
    flip_byte(Path(version.uri) / "model.safetensors", 20)  # inside the JSON header
    with pytest.raises(WeightIntegrityError):
        next(verified_tensors(version))


def test_a_verified_copy_pulls_every_file_and_its_manifest(tmp_path: Path) -> None:
    version = write(tmp_path / "weights", 1, 2.0)
    copy = copy_verified_weights(version, tmp_path / "copy")
    assert sorted(path.name for path in copy.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    local = version.model_copy(update={"uri": str(copy)})
    assert torch.equal(dict(verified_tensors(local))["generator"], torch.full((8, 8), 2.0))


class InPlaceEngine:
    """An engine whose weights are loaded in place from a verified version, generator then scorer."""

    def __init__(self) -> None:
        self.weights = {name: torch.zeros_like(tensor) for name, tensor in tensors(0.0).items()}
        self.while_loading = lambda: None  # what else happens to the version's files during a load
        self.folder_loads: list[Path] = []

    def load_verified(self, version: WeightVersion) -> None:
        """Read the version into the live tensors; a bad chunk raises after part of them changed."""
        for index, _ in enumerate(verified_tensors(version, self.weights)):
            if index == 0:
                self.while_loading()

    def load(self, folder: Path) -> None:
        """Folder loads (the initial folder): not used for manifest versions."""
        self.folder_loads.append(folder)
        self.weights.update({name: tensor.clone() for name, tensor in load_file(str(folder / "model.safetensors")).items()
                             if name in self.weights})

    def value(self) -> float:
        return float(self.weights["generator"].mean())


def test_a_worker_loads_in_place_refuses_a_tampered_version_and_rolls_back_from_its_links(
    tmp_path: Path, redis_settings
) -> None:
    client = connect_redis(redis_settings)
    root = tmp_path / "weights"
    engine = InPlaceEngine()
    telemetry = Telemetry("worker")
    watcher = WeightWatcher(client, "run", engine.load, load_verified=engine.load_verified, poll_s=0.0,
                            metrics=telemetry.weights)

    v1 = write(root, 1, 1.0)
    announce_weights(client, "run", v1)
    assert watcher.maybe_update() is True and watcher.version == 1 and engine.value() == 1.0
    assert engine.folder_loads == []  # in place, no folder load
    shutil.rmtree(v1.uri)  # the learner prunes the version the worker runs: its links keep the bytes

    v2 = write(root, 2, 2.0)
    blob = Path(v2.uri) / "model.safetensors"
    # Rewritten in place after the worker's first read: the same size, other bytes, in a later chunk.
    engine.while_loading = lambda: flip_byte(blob, blob.stat().st_size - 3)
    announce_weights(client, "run", v2)
    assert watcher.maybe_update() is False
    assert watcher.version == 1 and engine.value() == 1.0  # rolled back, verified, from the pruned v1's links
    assert "does not match" in watcher.refused[2]
    assert telemetry.registry.get_sample_value("sf_weight_sync_failures_total", {"reason": "integrity"}) == 1.0

    engine.while_loading = lambda: None
    v3 = write(root, 3, 3.0)
    announce_weights(client, "run", v3)
    assert watcher.maybe_update() is True and watcher.version == 3 and engine.value() == 3.0
    links = [path for path in root.glob(".worker-*/v*")]
    assert [path.name for path in links] == ["v000003"]  # the links to v1 are gone, freeing its bytes
    watcher.close()
    assert not list(root.glob(".worker-*"))


def test_a_version_pruned_while_it_loads_in_place_still_loads(tmp_path: Path, redis_settings) -> None:
    client = connect_redis(redis_settings)
    engine = InPlaceEngine()
    watcher = WeightWatcher(client, "run", engine.load, load_verified=engine.load_verified, poll_s=0.0)
    v1 = write(tmp_path / "weights", 1, 1.0)
    engine.while_loading = lambda: shutil.rmtree(v1.uri)
    announce_weights(client, "run", v1)
    assert watcher.maybe_update() is True and engine.value() == 1.0
    watcher.close()


def test_published_policy_matches_save_pretrained_and_loads_in_place(tmp_path: Path) -> None:
    model, processor = load_model_and_processor(build_tiny_model(tmp_path / "tiny", TinyModelSpec()))
    snapshot = weights_snapshot(model, torch.bfloat16)
    model.save_pretrained(tmp_path / "reference", state_dict=snapshot)
    version, timings = publish_policy(model, processor, weights_root=tmp_path / "weights", version=1,
                                      learner_step=1, client=None, run_name="run", dtype=torch.bfloat16,
                                      state_dict=snapshot)
    assert timings.write_s > 0
    reference = load_file(str(tmp_path / "reference" / "model.safetensors"))
    published = load_file(str(Path(version.uri) / "model.safetensors"))
    assert reference.keys() == published.keys()  # checkpoint names, tied copies dropped, as save_pretrained
    assert all(torch.equal(reference[name], published[name]) for name in reference)
    config = json.loads((Path(version.uri) / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == [type(model).__name__]
    assert (Path(version.uri) / "tokenizer.json").is_file()  # the processor files, so vLLM loads the folder

    worker_model, _ = load_model_and_processor(tmp_path / "tiny", dtype=torch.bfloat16)
    missing = load_verified_into(version, checkpoint_destination(worker_model))
    assert missing == []
    assert all(torch.equal(a.to(torch.bfloat16), b)
               for a, b in zip(model.state_dict().values(), worker_model.state_dict().values(), strict=True))


def test_folders_of_dead_workers_are_removed_so_their_links_free_the_memory(tmp_path: Path, redis_settings) -> None:
    client = connect_redis(redis_settings)
    root = tmp_path / "weights"
    v1 = write(root, 1, 1.0)
    live = root / f"{worker_folder_prefix()}{process_tag(os.getpid())}-live"  # another watcher of this process
    dead = root / f"{worker_folder_prefix()}{os.getpid()}.1-dead"  # this pid in an earlier life (reused)
    for folder in (live, dead):
        folder.mkdir()
        os.link(Path(v1.uri) / "model.safetensors", folder / "model.safetensors")
    engine = InPlaceEngine()
    watcher = WeightWatcher(client, "run", engine.load, load_verified=engine.load_verified, poll_s=0.0)
    announce_weights(client, "run", v1)
    assert watcher.maybe_update() is True
    assert live.exists() and not dead.exists()
    assert (Path(v1.uri) / "model.safetensors").stat().st_nlink == 3  # the learner's, live's, this watcher's
    watcher.close()


def test_a_pruned_blob_nothing_links_is_overwritten_by_the_next_version(tmp_path: Path) -> None:
    root = tmp_path / "weights"
    v1 = write(root, 1, 1.0)
    first_inode = (Path(v1.uri) / "model.safetensors").stat().st_ino
    write(root, 2, 2.0)
    assert prune_versions(root, 1) == [Path(v1.uri)]
    assert (root / SPARE_BLOB_NAME).stat().st_ino == first_inode and not Path(v1.uri).exists()
    layers = {"generator": torch.full((2, 2), 3.0)}  # smaller than the spare: the rest is cut off
    v3 = write_weights_version(layers, root, 3, chunk_bytes=CHUNK)
    blob = Path(v3.uri) / "model.safetensors"
    assert blob.stat().st_ino == first_inode and not (root / SPARE_BLOB_NAME).exists()
    assert not blob.stat().st_mode & 0o222  # read-only again once published
    assert torch.equal(dict(verified_tensors(v3))["generator"], layers["generator"])
    assert load_file(str(blob)).keys() == {"generator"}  # a plain safetensors file of exactly its tensors
    assert sorted(path.name for path in root.iterdir()) == ["v000002", "v000003"]


def test_a_pruned_blob_a_worker_still_links_is_never_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "weights"
    v1 = write(root, 1, 1.0)
    running = link_version(v1, tmp_path / "worker-v1")  # a worker that still runs v1 (its rollback target)
    write(root, 2, 2.0)
    prune_versions(root, 1)
    assert not (root / SPARE_BLOB_NAME).exists()
    write(root, 3, 3.0)
    destination = {name: torch.zeros_like(tensor) for name, tensor in tensors(0.0).items()}
    load_verified_into(running, destination)  # the worker's links still hold v1, verified
    assert float(destination["generator"].mean()) == 1.0


def test_a_reader_without_a_link_sees_a_recycled_blob_fail_its_check(tmp_path: Path) -> None:
    root = tmp_path / "weights"
    v1 = write(root, 1, 1.0)
    reading = verified_tensors(v1)  # opens the blob without linking it (the verified-copy fallback does so)
    assert next(reading)[0] == "generator"
    write(root, 2, 2.0)
    prune_versions(root, 1)
    write(root, 3, 3.0)  # written over v1's pages while the reader is part-way through them
    with pytest.raises(WeightIntegrityError, match="does not match"):
        list(reading)

"""Weight versions: publish atomically, announce on a real Redis, refuse a tampered blob."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.queues import connect_redis
from services.weights import (
    WeightIntegrityError,
    announce_weights,
    latest_weight_version,
    publish_weights_folder,
    verify_weights,
    weights_channel,
)


def saved_folder(tmp_path: Path, scale: float) -> Path:
    folder = tmp_path / f"save-{scale}"
    folder.mkdir()
    save_file({"layer.weight": torch.full((8, 8), scale)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return folder


def test_publish_announce_and_verify(tmp_path: Path, redis_settings) -> None:
    client = connect_redis(redis_settings)
    assert latest_weight_version(client, "run") is None
    subscriber = client.pubsub()
    subscriber.subscribe(weights_channel("run"))
    subscriber.get_message(timeout=1.0)  # the subscribe confirmation

    version = publish_weights_folder(saved_folder(tmp_path, 1.0), tmp_path / "weights", 1, learner_step=10)
    announce_weights(client, "run", version)

    assert latest_weight_version(client, "run") == version
    message = subscriber.get_message(timeout=2.0)
    assert message is not None and message["type"] == "message"
    assert verify_weights(version) == Path(version.uri)
    assert (Path(version.uri) / "config.json").exists()
    assert not list((tmp_path / "weights").glob("*.tmp"))


def test_a_tampered_blob_is_refused(tmp_path: Path) -> None:
    version = publish_weights_folder(saved_folder(tmp_path, 1.0), tmp_path / "weights", 2)
    blob = Path(version.uri) / "model.safetensors"
    raw = bytearray(blob.read_bytes())
    raw[-1] ^= 0xFF  # one flipped bit in transit
    blob.write_bytes(bytes(raw))
    with pytest.raises(WeightIntegrityError, match="does not match"):
        verify_weights(version)


def test_a_swapped_model_config_is_refused(tmp_path: Path) -> None:
    version = publish_weights_folder(saved_folder(tmp_path, 2.0), tmp_path / "weights", 2)
    (Path(version.uri) / "config.json").write_text('{"num_hidden_layers": 1}')  # the blob is read through it
    with pytest.raises(WeightIntegrityError, match="does not match"):
        verify_weights(version)


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    version = publish_weights_folder(saved_folder(tmp_path, 3.0), tmp_path / "weights", 3)
    moved = version.model_copy(update={"uri": str(tmp_path / "nowhere")})
    with pytest.raises(WeightIntegrityError, match="does not exist"):
        verify_weights(moved)

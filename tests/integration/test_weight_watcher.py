"""The worker's weight watcher against a real Redis: loads newer verified versions, refuses tampered ones."""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rollout_worker.weights import WeightWatcher
from services.queues import connect_redis
from services.telemetry import Telemetry
from services.weights import announce_weights, publish_weights_folder


def save_linear(folder: Path, value: float) -> Path:
    folder.mkdir(parents=True)
    save_file({"weight": torch.full((4, 4), value)}, str(folder / "model.safetensors"))
    return folder


def test_watcher_loads_new_versions_and_refuses_a_tampered_one(tmp_path: Path, redis_settings) -> None:
    client = connect_redis(redis_settings)
    layer = torch.nn.Linear(4, 4, bias=False)

    def load_into_layer(folder: Path) -> None:
        layer.load_state_dict(load_file(str(folder / "model.safetensors")))

    telemetry = Telemetry("worker")
    watcher = WeightWatcher(client, "run", load_into_layer, poll_s=0.0, metrics=telemetry.weights)
    assert watcher.maybe_update() is False  # nothing announced yet

    v1 = publish_weights_folder(save_linear(tmp_path / "s1", 1.0), tmp_path / "weights", 1)
    announce_weights(client, "run", v1)
    assert watcher.maybe_update() is True and watcher.version == 1
    assert torch.all(layer.weight == 1.0)
    assert watcher.maybe_update() is False  # same version again: no reload

    v2 = publish_weights_folder(save_linear(tmp_path / "s2", 2.0), tmp_path / "weights", 2)
    blob = Path(v2.uri) / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")  # corrupted in transit
    announce_weights(client, "run", v2)
    assert watcher.maybe_update() is False
    assert watcher.version == 1 and torch.all(layer.weight == 1.0)  # the old weights stay
    assert 2 in watcher.refused and "does not match" in watcher.refused[2]
    assert telemetry.registry.get_sample_value("sf_weight_sync_failures_total", {"reason": "integrity"}) == 1.0

    v3 = publish_weights_folder(save_linear(tmp_path / "s3", 3.0), tmp_path / "weights", 3)
    announce_weights(client, "run", v3)
    assert watcher.maybe_update() is True and watcher.version == 3
    assert torch.all(layer.weight == 3.0)
    assert telemetry.registry.get_sample_value("sf_policy_version", {"service": "rollout_worker"}) == 3.0

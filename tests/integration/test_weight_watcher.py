"""The worker's weight watcher against a real Redis: loads newer verified versions, refuses tampered ones."""

import shutil
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


class TwoPartEngine:
    """An engine with a generator and a scorer that reload one after the other from the same folder, as the
    vLLM engine does (vLLM, then the HF scorer): a failure in between would leave them on two versions."""

    def __init__(self, value: float) -> None:
        self.generator = torch.nn.Linear(4, 4, bias=False)
        self.scorer = torch.nn.Linear(4, 4, bias=False)
        torch.nn.init.constant_(self.generator.weight, value)
        torch.nn.init.constant_(self.scorer.weight, value)
        self.loads: list[Path] = []
        self.while_loading = lambda: None  # what else happens to the shared folder during a load

    def load_weights(self, folder: Path) -> None:
        """Reload the generator, then the scorer (a blob whose scorer part has the wrong shape fails there)."""
        self.loads.append(folder)
        self.while_loading()
        blob = load_file(str(folder / "model.safetensors"))
        self.generator.load_state_dict({"weight": blob["generator"]})
        self.scorer.load_state_dict({"weight": blob["scorer"]})

    def values(self) -> tuple[float, float]:
        """The (generator, scorer) weight value, when each is uniform."""
        return float(self.generator.weight.detach().mean()), float(self.scorer.weight.detach().mean())


def save_two_part(folder: Path, value: float, scorer_shape: tuple[int, int] = (4, 4)) -> Path:
    folder.mkdir(parents=True)
    save_file({"generator": torch.full((4, 4), value), "scorer": torch.full(scorer_shape, value)},
              str(folder / "model.safetensors"))
    return folder


def publish(client, tmp_path: Path, version: int, value: float, **shape):
    weight_version = publish_weights_folder(save_two_part(tmp_path / f"s{version}", value, **shape),
                                            tmp_path / "weights", version)
    announce_weights(client, "run", weight_version)
    return weight_version


def failures(telemetry: Telemetry, reason: str) -> float:
    return telemetry.registry.get_sample_value("sf_weight_sync_failures_total", {"reason": reason}) or 0.0


def test_a_version_changed_or_deleted_after_its_check_is_never_loaded(tmp_path: Path, redis_settings) -> None:
    client = connect_redis(redis_settings)
    engine = TwoPartEngine(0.0)
    watcher = WeightWatcher(client, "run", engine.load_weights, poll_s=0.0)

    v1 = publish(client, tmp_path, 1, 1.0)
    blob = Path(v1.uri) / "model.safetensors"
    # Swapped after the hash check, while the engine loads: the same size, other weights.
    engine.while_loading = lambda: save_file({"generator": torch.full((4, 4), 9.0), "scorer": torch.full((4, 4), 9.0)},
                                             str(blob))
    assert watcher.maybe_update() is True and watcher.version == 1
    assert engine.values() == (1.0, 1.0)  # what was announced, not what the folder held later

    v2 = publish(client, tmp_path, 2, 2.0)
    engine.while_loading = lambda: shutil.rmtree(v2.uri)  # pruned by the learner mid-load
    assert watcher.maybe_update() is True and watcher.version == 2  # no OSError ends the worker
    assert engine.values() == (2.0, 2.0)
    assert not Path(v2.uri).exists() and all(Path(v2.uri) != folder for folder in engine.loads)
    watcher.close()


def test_a_failed_load_keeps_every_part_on_the_old_version_then_takes_the_next(
    tmp_path: Path, redis_settings
) -> None:
    client = connect_redis(redis_settings)
    base = save_two_part(tmp_path / "base", 0.5)
    engine = TwoPartEngine(0.5)
    telemetry = Telemetry("worker")
    watcher = WeightWatcher(client, "run", engine.load_weights, initial_folder=base, poll_s=0.0,
                            metrics=telemetry.weights, max_attempts=2)

    publish(client, tmp_path, 1, 1.0, scorer_shape=(3, 3))  # the generator part loads, the scorer part fails
    assert watcher.maybe_update() is False  # kept serving: no exception
    assert watcher.version == 0 and engine.values() == (0.5, 0.5)  # both parts back on the base weights
    assert failures(telemetry, "load") == 1.0 and 1 not in watcher.refused
    assert watcher.maybe_update() is False and 1 in watcher.refused  # retried once more, then given up
    loads = len(engine.loads)
    assert watcher.maybe_update() is False and len(engine.loads) == loads and failures(telemetry, "load") == 2.0

    v2 = publish(client, tmp_path, 2, 2.0)
    assert watcher.maybe_update() is True and watcher.version == 2 and engine.values() == (2.0, 2.0)
    shutil.rmtree(v2.uri)  # the learner prunes the version the worker runs

    publish(client, tmp_path, 3, 3.0, scorer_shape=(3, 3))
    assert watcher.maybe_update() is False
    assert watcher.version == 2 and engine.values() == (2.0, 2.0)  # rolled back from the worker's own copy
    assert telemetry.registry.get_sample_value("sf_policy_version", {"service": "rollout_worker"}) == 2.0
    watcher.close()


def test_a_version_folder_that_is_not_there_yet_is_retried(tmp_path: Path, redis_settings) -> None:
    client = connect_redis(redis_settings)
    engine = TwoPartEngine(0.0)
    telemetry = Telemetry("worker")
    watcher = WeightWatcher(client, "run", engine.load_weights, poll_s=0.0, metrics=telemetry.weights)
    v1 = publish(client, tmp_path, 1, 1.0)
    hidden = Path(v1.uri).with_name("hidden")
    Path(v1.uri).rename(hidden)  # announced before the shared file system shows the folder here
    assert watcher.maybe_update() is False and watcher.version == 0 and failures(telemetry, "io") == 1.0
    hidden.rename(v1.uri)
    assert watcher.maybe_update() is True and watcher.version == 1 and engine.values() == (1.0, 1.0)
    watcher.close()

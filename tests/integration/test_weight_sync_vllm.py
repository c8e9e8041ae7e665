"""The real worker's in-place reload: vLLM and the HF scorer loaded from verified tensors of a one-pass version
generate exactly what a folder reload generates, and a tampered version rolls both back to the last good one."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from learner.publishing import publish_policy
from rollout_worker.weights import WeightWatcher
from services.modeling import TinyModelSpec, build_tiny_model, load_model_and_processor
from services.queues import connect_redis
from services.settings import Settings
from services.weights import announce_weights, copy_verified_weights

pytestmark = pytest.mark.heavy  # starts vLLM: not in make test-fast


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), TinyModelSpec())


@pytest.fixture(scope="module")
def engine(base_folder: Path) -> Iterator:
    from rollout_worker.vllm_engine import VllmRolloutEngine

    settings = Settings.model_validate(
        {"rollout": {"model_path": str(base_folder), "max_new_tokens": 4, "vllm_dtype": "float32"}}
    )
    engine = VllmRolloutEngine(settings)
    yield engine
    engine.shutdown()


def greedy(engine) -> tuple[list[int], list[float]]:
    """Eight greedy tokens and their log-probs for a fixed text prompt."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0)
    output = engine.llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5]}], params, use_tqdm=False)[0].outputs[0]
    return list(output.token_ids), [next(iter(step.values())).logprob for step in output.logprobs]


def perturbed(base_folder: Path, seed: int):
    model, processor = load_model_and_processor(base_folder)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model, processor


def test_in_place_reload_matches_a_folder_reload_and_a_tampered_version_rolls_back(
    engine, base_folder: Path, redis_settings, tmp_path: Path
) -> None:
    assert engine.loads_in_place  # vLLM's engine core runs in this process on CPU
    client = connect_redis(redis_settings)
    root = tmp_path / "weights"
    model, processor = perturbed(base_folder, 0)
    v1, _ = publish_policy(model, processor, weights_root=root, version=1, learner_step=1, client=client,
                           run_name="run")
    base_output = greedy(engine)
    engine.load_weights(copy_verified_weights(v1, tmp_path / "copy"))  # the folder reload, as a reference
    folder_output = greedy(engine)
    assert folder_output[0] != base_output[0]  # the perturbation shows
    engine.load_weights(base_folder)

    watcher = WeightWatcher(client, "run", engine.load_weights, initial_folder=base_folder, poll_s=0.0,
                            load_verified=engine.load_verified)
    try:
        assert watcher.maybe_update() is True and watcher.version == 1 and watcher.loaded is not None
        assert greedy(engine) == folder_output  # same tokens, same log-probs
        scorer = engine.model.state_dict()
        assert all(torch.equal(scorer[name], tensor) for name, tensor in model.state_dict().items())

        model2, _ = perturbed(base_folder, 1)
        v2, _ = publish_policy(model2, processor, weights_root=root, version=2, learner_step=2, client=None,
                               run_name="run")
        blob = Path(v2.uri) / "model.safetensors"
        blob.chmod(0o644)
        raw = bytearray(blob.read_bytes())
        raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the middle of the blob
        blob.write_bytes(bytes(raw))
        announce_weights(client, "run", v2)
        assert watcher.maybe_update() is False and "does not match" in watcher.refused[2]
        assert watcher.version == 1 and greedy(engine) == folder_output  # vLLM rolled back to v1, verified
        scorer = engine.model.state_dict()
        assert all(torch.equal(scorer[name], tensor) for name, tensor in model.state_dict().items())
    finally:
        watcher.close()
        engine.load_weights(base_folder)

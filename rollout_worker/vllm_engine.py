"""The production RolloutEngine: the HF scorer + the patched vLLM Qwen2.5-VL, run through pruned_rollouts."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rollout_worker.engine import PreparedRollout, TaskInputError
from rollout_worker.weights import reload_vllm_verified
from services.modeling import load_model_and_processor
from services.rollout.pruned import PrunedRequest, pruned_rollouts
from services.schemas import Rollout, WeightVersion
from services.settings import Settings
from services.sparsity.scorers import build_scorer
from services.weights import load_verified_into
from services.weights.hf import checkpoint_destination

log = logging.getLogger(__name__)


def stored_dtype(model_path: Path, configured: str) -> str:
    """vLLM dtype to run: the configured one, or for 'auto' the checkpoint's own dtype.

    vLLM's 'auto' downcasts a float32 checkpoint to 16 bits, while the scorer and the learner run it in
    float32; greedy answers would then judge a different model than the one trained.
    """
    if configured != "auto":
        return configured
    config = json.loads((model_path / "config.json").read_text())
    text_config = config.get("text_config") or {}
    return str(config.get("dtype") or config.get("torch_dtype") or text_config.get("dtype") or "auto")


def vllm_in_process(settings: Settings) -> bool:
    """Whether vLLM's engine core runs in this process (rollout.vllm_in_process; None: on CPU only)."""
    configured = settings.rollout.vllm_in_process
    return (not torch.cuda.is_available()) if configured is None else configured


def build_llm(model_path: Path, settings: Settings):
    """A vLLM engine for the policy, sized by settings.rollout (CPU KV cache or GPU memory share)."""
    rollout = settings.rollout
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # The CPU backend sizes its KV cache from this variable only; settings own the value.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{rollout.vllm_kv_cache_gb:g}"
    in_process = vllm_in_process(settings)
    # vLLM reads this switch only from the environment, when the engine is built.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    from vllm import LLM

    return LLM(
        model=str(model_path),
        dtype=stored_dtype(Path(model_path), rollout.vllm_dtype),
        enforce_eager=rollout.vllm_enforce_eager,
        max_model_len=rollout.vllm_max_model_len,
        gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
        seed=rollout.seed,
        limit_mm_per_prompt={"image": 1, "video": 1},  # one image or one video per task
    )


def reset_engine_caches(llm: Any) -> None:
    """Drop vLLM's prefix KV blocks, multimodal cache and encoder outputs (and the scheduler's record of them)."""
    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()


class VllmRolloutEngine:
    """Scores with the HF model, generates in vLLM; both reload together when weights change."""

    def __init__(self, settings: Settings, model_path: Path | None = None) -> None:
        from vllm import SamplingParams

        self.settings = settings
        self.model_path = Path(model_path or settings.rollout.model_path)
        self.model, self.processor = load_model_and_processor(self.model_path)
        self.scorer = build_scorer(settings.sparsity.scorer, settings.sparsity.scorer_layer)
        self.llm = build_llm(self.model_path, settings)
        # In-place verified reloads hand vLLM a generator, which cannot cross to an engine-core process.
        self.loads_in_place = vllm_in_process(settings)
        # No per-request seed: on vLLM-cpu a seeded request with chunked prefill crashes the engine;
        # the engine-wide seed (settings.rollout.seed) keeps runs repeatable.
        self.sampling_params = SamplingParams(
            temperature=settings.rollout.temperature, top_p=settings.rollout.top_p,
            max_tokens=settings.rollout.max_new_tokens, logprobs=0,
        )

    def generate(self, prepared: Sequence[PreparedRollout], policy_version: int) -> list[Rollout]:
        """One Rollout per prepared request, generated in a single vLLM batch."""
        requests = [PrunedRequest(item.image, item.request.task.question, item.request.budget) for item in prepared]
        try:
            with torch.no_grad():
                results = pruned_rollouts(self.llm, self.model, self.processor, self.scorer, requests,
                                          self.sampling_params)
        except ValueError as error:  # KeepSetError and the processor's refusals of a bad image
            raise TaskInputError(str(error)) from error
        return [
            result.to_wire(item.request.task.id, item.request.rollout_index, policy_version)
            for item, result in zip(prepared, results)
        ]

    def load_weights(self, folder: Path) -> None:
        """Reload vLLM in place from the folder, and the HF scorer from the same files."""
        model_config = self.llm.llm_engine.model_config
        source = (model_config.model, model_config.model_weights, model_config.revision)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        # reload_weights points the worker's model config at the weight folder; with the engine in this
        # process that config is also the front end's, whose processor would then be looked for in a folder
        # that holds weights alone. The processor never changes: keep the front end on the original source.
        model_config.model, model_config.model_weights, model_config.revision = source
        # reload_weights clears the workers' encoder cache but neither the scheduler's record of it (the
        # next request for a cached image then fails with "Encoder cache miss") nor the prefix cache, whose
        # KV blocks were computed by the old weights. Reset all three caches together.
        reset_engine_caches(self.llm)
        # Weight folders hold the model alone; the processor (tokenizer, image config) never changes.
        self.model = type(self.model).from_pretrained(folder, dtype=self.model.dtype).eval()
        log.info("engine weights reloaded", extra={"folder": str(folder)})

    def load_verified(self, weight_version: WeightVersion) -> None:
        """Load a manifest version in place into vLLM and the HF scorer, each chunk verified as it is read
        (rollout_worker.weights): no folder reload, no new scorer model. Needs vLLM in this process."""
        reload_vllm_verified(self.llm, weight_version)
        reset_engine_caches(self.llm)  # the same three caches as load_weights, for the same reasons
        load_verified_into(weight_version, checkpoint_destination(self.model))
        log.info("engine weights reloaded in place", extra={"version": weight_version.version})

    def shutdown(self) -> None:
        """Stop vLLM's engine-core process."""
        self.llm.llm_engine.engine_core.shutdown()

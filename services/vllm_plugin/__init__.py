"""vLLM plugin (entry point ``vllm.general_plugins``): Qwen2.5-VL with per-request visual-token keep sets.

vLLM calls ``register`` in every process it starts (front end, engine core, workers). Registering the
stock architecture name replaces the stock class, so any Qwen2.5-VL checkpoint gets the prunable model;
a request without a keep set runs exactly as in stock vLLM. See ``qwen2_5_vl`` for the mechanism.
"""

from __future__ import annotations

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
MODEL_CLASS = "services.vllm_plugin.qwen2_5_vl:PrunableQwen2_5_VLForConditionalGeneration"


def register() -> None:
    """Register the prunable Qwen2.5-VL under the stock architecture name (idempotent)."""
    from vllm import ModelRegistry

    # A "module:Class" string keeps the import lazy: vLLM imports it where the model is built.
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)

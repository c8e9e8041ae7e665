"""vLLM plugin (entry point ``vllm.general_plugins``): Qwen2.5-VL / Qwen2-VL with per-request keep sets.

vLLM calls ``register`` in every process it starts (front end, engine core, workers). Registering the
stock architecture names replaces the stock classes, so any Qwen2.5-VL or Qwen2-VL checkpoint gets the
prunable model; a request without a keep set runs exactly as in stock vLLM. See ``qwen2_5_vl`` for
the mechanism. Set ``VLLM_PLUGINS`` to a list without ``sparsity_forcing`` to run stock vLLM.
"""

from __future__ import annotations

# "module:Class" strings keep the imports lazy: vLLM imports a model where it builds it.
MODEL_CLASSES = {
    "Qwen2_5_VLForConditionalGeneration": (
        "services.vllm_plugin.qwen2_5_vl:PrunableQwen2_5_VLForConditionalGeneration"
    ),
    "Qwen2VLForConditionalGeneration": "services.vllm_plugin.qwen2_vl:PrunableQwen2VLForConditionalGeneration",
}


def register() -> None:
    """Register the prunable models under the stock architecture names (idempotent)."""
    from vllm import ModelRegistry

    for architecture, model_class in MODEL_CLASSES.items():
        ModelRegistry.register_model(architecture, model_class)

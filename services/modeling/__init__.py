"""Build and load models: the tiny offline Qwen2.5-VL, checkpoint loading, and the shared prompt format."""

from services.modeling.loading import load_model_and_processor
from services.modeling.prompts import build_prompt, chat_messages
from services.modeling.tiny import TinyModelSpec, build_tiny_model, count_parameters, visual_tokens_for

__all__ = [
    "TinyModelSpec",
    "build_prompt",
    "build_tiny_model",
    "chat_messages",
    "count_parameters",
    "load_model_and_processor",
    "visual_tokens_for",
]

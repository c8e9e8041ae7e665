"""The one way the worker, the learner and evaluation turn a question into a chat prompt."""

from __future__ import annotations

from typing import Any


def chat_messages(question: str) -> list[dict[str, Any]]:
    """Chat messages for one image followed by the question (Qwen2.5-VL content-list format)."""
    if not question.strip():
        raise ValueError("question is empty")
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def build_prompt(processor: Any, question: str) -> str:
    """The chat-templated prompt text (one image placeholder, generation prompt added)."""
    return processor.apply_chat_template(chat_messages(question), tokenize=False, add_generation_prompt=True)

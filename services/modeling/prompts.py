"""The one way the worker, the learner and evaluation turn a question into a chat prompt."""

from __future__ import annotations

from typing import Any


def chat_messages(question: str, video: bool = False) -> list[dict[str, Any]]:
    """Chat messages for one image (or one video) followed by the question (Qwen2.5-VL content-list format)."""
    if not question.strip():
        raise ValueError("question is empty")
    media = {"type": "video" if video else "image"}
    return [{"role": "user", "content": [media, {"type": "text", "text": question}]}]


def build_prompt(processor: Any, question: str, video: bool = False) -> str:
    """The chat-templated prompt text (one image or video placeholder, generation prompt added)."""
    return processor.apply_chat_template(chat_messages(question, video), tokenize=False, add_generation_prompt=True)

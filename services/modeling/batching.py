"""Turn dataset items into model inputs: left-padded prompts for generation, right-padded answers for SFT."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from services.modeling.prompts import build_prompt

IGNORE_INDEX = -100
ANSWER_END = "<|im_end|>"


def generation_inputs(processor: Any, questions: Sequence[str], images: Sequence[Image.Image]) -> dict:
    """Left-padded prompt batch (input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids)."""
    prompts = [build_prompt(processor, question) for question in questions]
    return dict(processor(text=prompts, images=list(images), padding=True, padding_side="left",
                          return_tensors="pt"))


def training_inputs(
    processor: Any, questions: Sequence[str], images: Sequence[Image.Image], answers: Sequence[str]
) -> dict:
    """Right-padded prompt+answer batch with `labels` set on the answer tokens and the closing <|im_end|> only."""
    prompts = [build_prompt(processor, question) for question in questions]
    texts = [prompt + answer + ANSWER_END for prompt, answer in zip(prompts, answers, strict=True)]
    batch = dict(processor(text=texts, images=list(images), padding=True, padding_side="right",
                           return_tensors="pt"))
    return _with_answer_labels(processor, batch, answers)


def video_training_inputs(
    model: torch.nn.Module, processor: Any, questions: Sequence[str], videos: Sequence[Any], answers: Sequence[str]
) -> dict:
    """``training_inputs`` for videos (``services.data.video.Video``), with explicit M-RoPE ``position_ids``.

    The positions are the engine's (``video_rope_positions``), not transformers' ``get_rope_index``, which
    places the text after a video elsewhere: a model fine-tuned on those would be served on other positions.
    """
    from transformers.video_utils import VideoMetadata

    prompts = [build_prompt(processor, question, video=True) for question in questions]
    texts = [prompt + answer + ANSWER_END for prompt, answer in zip(prompts, answers, strict=True)]
    metadata = [VideoMetadata(total_num_frames=v.num_frames, fps=v.fps, frames_indices=list(range(v.num_frames)))
                for v in videos]
    batch = dict(processor(text=texts, videos=[list(v.frames) for v in videos], padding=True,
                           padding_side="right", return_tensors="pt", videos_kwargs={"video_metadata": metadata}))
    batch = _with_answer_labels(processor, batch, answers)
    temporal_patch = processor.video_processor.temporal_patch_size
    batch["position_ids"] = _video_position_ids(model, batch, batch["video_grid_thw"],
                                                [video.seconds_per_grid(temporal_patch) for video in videos])
    return batch


def cached_video_training_inputs(
    model: torch.nn.Module, processor: Any, questions: Sequence[str], answers: Sequence[str],
    features: Sequence[torch.Tensor], grid_thw: torch.Tensor, seconds_per_grid: float,
) -> dict:
    """``video_training_inputs`` on visual tokens computed before (a frozen vision tower): ``inputs_embeds``.

    features[b]: (visual tokens, hidden) of row b's video, all of one patch grid ``grid_thw`` (3,). The batch
    also holds ``input_ids`` for callers that locate tokens; pop it before ``model(**batch)``.
    """
    video_token = processor.video_token
    texts = [build_prompt(processor, question, video=True).replace(video_token, video_token * len(tokens))
             + answer + ANSWER_END for question, answer, tokens in zip(questions, answers, features, strict=True)]
    batch = dict(processor.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt",
                                     add_special_tokens=False))
    batch = _with_answer_labels(processor, batch, answers)
    batch["position_ids"] = _video_position_ids(model, batch, grid_thw.expand(len(texts), 3),
                                                [seconds_per_grid] * len(texts))
    embeddings = model.get_input_embeddings()(batch["input_ids"])
    placeholders = (batch["input_ids"] == model.config.video_token_id).unsqueeze(-1)
    batch["inputs_embeds"] = embeddings.masked_scatter(placeholders, torch.cat(list(features)).to(embeddings.dtype))
    return batch


def _video_position_ids(model: torch.nn.Module, batch: dict, grid_thw: torch.Tensor,
                        seconds_per_grid: Sequence[float]) -> torch.Tensor:
    """(3, B, L) M-RoPE positions of right-padded one-video rows: the engine's rule, padding counting on."""
    from services.modeling.pruned_forward import video_rope_positions

    lengths = batch["attention_mask"].sum(dim=1).tolist()
    positions = torch.zeros((3, *batch["input_ids"].shape), dtype=torch.long)
    for row, length in enumerate(lengths):
        row_positions = video_rope_positions(model, batch["input_ids"][row, :length], grid_thw[row],
                                             seconds_per_grid[row])
        positions[:, row, :length] = row_positions
        # Padding continues the count; right padding is never attended by a real token.
        positions[:, row, length:] = row_positions.max() + 1 + torch.arange(positions.shape[2] - length)
    return positions


def _with_answer_labels(processor: Any, batch: dict, answers: Sequence[str]) -> dict:
    """The batch with `labels` on each row's answer tokens and closing <|im_end|> (IGNORE_INDEX elsewhere)."""
    input_ids: torch.Tensor = batch["input_ids"]
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (answer, length) in enumerate(zip(answers, lengths, strict=True)):
        answer_ids = processor.tokenizer(answer + ANSWER_END, add_special_tokens=False)["input_ids"]
        start = length - len(answer_ids)
        # The template ends the prompt with "\n", which the pre-tokenizer never merges into the answer,
        # so the answer's ids are the same whether tokenized alone or after the prompt.
        if input_ids[row, start:length].tolist() != answer_ids:
            raise ValueError(f"answer {answer!r} does not tokenize the same after the prompt (row {row})")
        labels[row, start:length] = input_ids[row, start:length]
    batch["labels"] = labels
    return batch


def decode_answers(processor: Any, generated: torch.Tensor, prompt_length: int) -> list[str]:
    """Text of each row's new tokens (special tokens dropped, whitespace stripped). generated: (B, L+T)."""
    texts = processor.tokenizer.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)
    return [text.strip() for text in texts]


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module, processor: Any, questions: Sequence[str], images: Sequence[Image.Image],
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy (dense) answers of the model to a batch of image questions."""
    inputs = generation_inputs(processor, questions, images)
    inputs = {name: value.to(model.device) for name, value in inputs.items()}
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return decode_answers(processor, generated, inputs["input_ids"].shape[1])

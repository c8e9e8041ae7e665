"""Visual-token scorers: (model, inputs) -> one non-negative importance score per visual token.

The default, ``TextAttentionScorer``, follows FastV / ZipVL: the attention that the prompt's text tokens
*after* the image pay to each visual token at decoder layer K (default 2), averaged over heads and query
tokens. Only the first K layers run in full; at layer K we recompute the softmax attention rows of the
query tokens from that layer's own q/k projections and M-RoPE (``text_to_visual_attention``), so the
score does not depend on which attention kernel the model was loaded with, and nothing past layer K
runs. ``FeatureNormScorer`` is a query-agnostic second scorer (L2 norm of the merged visual
features), which shows that the interface is pluggable.

Both embed the sequence with ``services.modeling.pruned_forward.embed_full_sequence``, the function
the training forward uses: scoring and training see the same embeddings and positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

from services.modeling.pruned_forward import embed_full_sequence, image_features, visual_tokens_per_image


@dataclass(frozen=True)
class ScorerInputs:
    """One unpruned prompt. input_ids: (1, L) with N image placeholders; pixel_values; image_grid_thw: (1, 3).

    image_embeds: (N, D) merged visual features of pixel_values when already computed (saves a
    vision-tower pass), else None. A video prompt sets ``video_seconds_per_grid`` (the seconds one temporal
    slot spans) and holds ``<|video_pad|>`` placeholders, its frames' pixel values and its grid; its N tokens
    are all frames' tokens, t-major, and are scored together.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    image_embeds: torch.Tensor | None = None
    video_seconds_per_grid: float | None = None

    def visual_features(self, model: torch.nn.Module) -> torch.Tensor:
        """The merged visual features (N, D): the given ones, or a vision-tower pass."""
        if self.image_embeds is not None:
            return self.image_embeds
        return image_features(model, self.pixel_values, self.image_grid_thw)


class VisualTokenScorer(Protocol):
    """Anything that maps (model, inputs) to scores of shape (N,), non-negative."""

    name: str

    def score(self, model: torch.nn.Module, inputs: ScorerInputs) -> torch.Tensor:
        """Importance of each visual token, in image order. Returns (N,) float32."""
        ...

    def differentiable_score(self, model: torch.nn.Module, inputs: ScorerInputs) -> torch.Tensor:
        """``score`` with autograd on, for training the scorer's own layers."""
        ...


def text_to_visual_attention(
    query_states: torch.Tensor,
    key_states: torch.Tensor,
    query_rows: torch.Tensor,
    visual_positions: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Mean causal softmax attention from query rows to visual positions, over heads and queries.

    query_states: (H, Q, d) rotated queries of the query rows; key_states: (H, L, d) rotated keys of
    the whole sequence (KV heads already repeated); query_rows: (Q,) sequence index of each query;
    visual_positions: (N,) sequence index of each visual token. Returns (N,) float32.
    """
    logits = torch.matmul(query_states.float(), key_states.float().transpose(-1, -2)) * scaling
    key_index = torch.arange(key_states.shape[-2], device=key_states.device)
    future = key_index.unsqueeze(0) > query_rows.unsqueeze(1)
    probabilities = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    return probabilities[..., visual_positions].mean(dim=(0, 1))


class _StopForward(Exception):
    """Raised from a hook once layer K's input is captured, so later layers never run."""


def _layer_inputs(
    model: torch.nn.Module, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, layer: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Hidden states entering decoder layer ``layer`` and its rotary (cos, sin); runs layers < ``layer``."""
    layers = model.model.language_model.layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"scorer layer must lie in [0, {len(layers) - 1}], got {layer}")
    captured: dict[str, object] = {}

    def capture(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden_states"] = args[0] if args else kwargs["hidden_states"]
        captured["position_embeddings"] = kwargs["position_embeddings"]
        raise _StopForward

    handle = layers[layer].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model.model.language_model(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["hidden_states"], captured["position_embeddings"]  # type: ignore[return-value]


@dataclass(frozen=True)
class TextAttentionScorer:
    """FastV/ZipVL scores: attention from the text after the image to each visual token at layer K."""

    layer: int = 2
    name: str = "text_attention"

    @torch.no_grad()
    def score(self, model: torch.nn.Module, inputs: ScorerInputs) -> torch.Tensor:
        """Importance of each visual token. Returns (N,) float32, summing to at most 1."""
        return self.differentiable_score(model, inputs)

    def differentiable_score(self, model: torch.nn.Module, inputs: ScorerInputs) -> torch.Tensor:
        """``score`` with autograd on: the learner's kept-mass term trains layers <= K through it."""
        sequence = embed_full_sequence(
            model, inputs.input_ids, inputs.pixel_values, inputs.image_grid_thw,
            image_embeds=inputs.visual_features(model), video_seconds_per_grid=inputs.video_seconds_per_grid,
        )
        visual_positions = sequence.visual_positions
        query_rows = torch.arange(
            int(visual_positions[-1]) + 1, sequence.inputs_embeds.shape[1], device=visual_positions.device
        )
        if query_rows.numel() == 0:
            raise ValueError("text_attention scorer needs prompt text after the image; the prompt ends with it")
        hidden, (cos, sin) = _layer_inputs(model, sequence.inputs_embeds, sequence.position_ids, self.layer)
        block = model.model.language_model.layers[self.layer]
        attention = block.self_attn
        normed = block.input_layernorm(hidden)
        head_dim = attention.head_dim
        queries = attention.q_proj(normed).view(1, -1, attention.num_heads, head_dim).transpose(1, 2)
        keys = attention.k_proj(normed).view(1, -1, attention.num_key_value_heads, head_dim).transpose(1, 2)
        queries, keys = apply_rotary_pos_emb(queries, keys, cos, sin)
        keys = keys.repeat_interleave(attention.num_key_value_groups, dim=1)
        return text_to_visual_attention(
            queries[0][:, query_rows], keys[0], query_rows, visual_positions, attention.scaling
        )


@dataclass(frozen=True)
class FeatureNormScorer:
    """Query-agnostic scores: the L2 norm of each merged visual feature (what the LLM receives)."""

    name: str = "feature_norm"

    @torch.no_grad()
    def score(self, model: torch.nn.Module, inputs: ScorerInputs) -> torch.Tensor:
        """Importance of each visual token. Returns (N,) float32."""
        return self.differentiable_score(model, inputs)

    def differentiable_score(self, model: torch.nn.Module, inputs: ScorerInputs) -> torch.Tensor:
        """``score`` with autograd on (trains the vision tower and merger)."""
        norms = inputs.visual_features(model).float().norm(dim=-1)
        expected = sum(visual_tokens_per_image(model, inputs.image_grid_thw))
        if norms.numel() != expected:
            raise ValueError(f"vision tower gave {norms.numel()} features, expected {expected}")
        return norms


SCORERS: dict[str, Callable[[int], VisualTokenScorer]] = {
    "text_attention": lambda layer: TextAttentionScorer(layer=layer),
    "feature_norm": lambda layer: FeatureNormScorer(),
}


def build_scorer(name: str, layer: int = 2) -> VisualTokenScorer:
    """The scorer registered under ``name`` (see ``SCORERS``), configured with decoder layer ``layer``."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known: {sorted(SCORERS)}")
    return SCORERS[name](layer)

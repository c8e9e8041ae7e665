"""Vision-tower attention that is not launch-bound: one attention call per window size, not one per window.

HF's Qwen2.5-VL vision attention, without flash-attn installed, splits q/k/v at every window boundary and
launches one ``scaled_dot_product_attention`` per window: 108 windows x 28 windowed blocks = 3,024 calls for a
1344x1008 image, and the GPU sits idle between them. The windows of an image come in at most four sizes (full
windows, and the right, bottom and corner remainders), so we gather the windows of each size into one batch and
run one SDPA call for it. The arithmetic is the same, window by window; only the launches change.

``use_packed_vision_attention`` swaps the forward of each vision block's attention; it leaves the model alone
when flash attention is in use (that path is already one varlen call).
"""

from __future__ import annotations

import itertools
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen25

VISION_ATTENTION_MODES = ("packed", "per_window")


@dataclass
class WindowBuckets:
    """Gather indices of the windows of one cu_seqlens, grouped by length: length -> (windows * length,) long."""

    sequence_length: int
    by_length: dict[int, torch.Tensor]


def window_buckets(cu_seqlens: torch.Tensor) -> WindowBuckets:
    """Group the segments [cu[i], cu[i+1]) by length; one host read of cu_seqlens. cu_seqlens: (segments + 1,)."""
    bounds = cu_seqlens.tolist()
    starts_by_length: dict[int, list[int]] = {}
    for start, end in itertools.pairwise(bounds):
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)
    by_length = {}
    for length, starts in starts_by_length.items():
        offsets = torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(length)[None, :]
        by_length[length] = offsets.reshape(-1).to(cu_seqlens.device, non_blocking=True)
    return WindowBuckets(sequence_length=bounds[-1] - bounds[0], by_length=by_length)


def windowed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, buckets: WindowBuckets, scaling: float
) -> torch.Tensor:
    """Non-causal attention within each window. query/key/value: (S, H, d) -> (S, H * d)."""
    length_total, heads, head_dim = query.shape
    if len(buckets.by_length) == 1 and buckets.sequence_length == length_total:
        (length, index), = buckets.by_length.items()
        if length == length_total:  # one window: no gather at all
            out = torch.nn.functional.scaled_dot_product_attention(
                query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), scale=scaling
            )
            return out.transpose(0, 1).reshape(length_total, heads * head_dim)
    out = query.new_empty(length_total, heads * head_dim)
    for length, index in buckets.by_length.items():
        windows = index.numel() // length

        def gather(tensor: torch.Tensor, index: torch.Tensor = index, length: int = length,
                   windows: int = windows) -> torch.Tensor:
            return tensor.index_select(0, index).view(windows, length, heads, head_dim).transpose(1, 2)

        attended = torch.nn.functional.scaled_dot_product_attention(
            gather(query), gather(key), gather(value), scale=scaling
        )
        out = out.index_copy(0, index, attended.transpose(1, 2).reshape(windows * length, heads * head_dim))
    return out


@dataclass
class _BucketCache:
    """The last cu_seqlens seen and its buckets: the windowed blocks of one forward share one tensor."""

    entries: list[tuple[weakref.ref, WindowBuckets]] = field(default_factory=list)

    def get(self, cu_seqlens: torch.Tensor) -> WindowBuckets:
        for reference, buckets in self.entries:
            if reference() is cu_seqlens:
                return buckets
        buckets = window_buckets(cu_seqlens)
        # Two live tensors per forward (window and full attention); keep a few, newest first.
        self.entries = [(weakref.ref(cu_seqlens), buckets), *self.entries[:3]]
        return buckets


def _packed_forward(cache: _BucketCache) -> Callable:
    def forward(self: torch.nn.Module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **_: object) -> torch.Tensor:
        """Qwen2.5-VL vision attention with one SDPA call per window length (see module docstring)."""
        seq_length = hidden_states.shape[0]
        query, key, value = (
            self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        )
        cos, sin = position_embeddings
        query, key = qwen25.apply_rotary_pos_emb_vision(query, key, cos, sin)
        attended = windowed_attention(query, key, value.to(query.dtype), cache.get(cu_seqlens), self.scaling)
        return self.proj(attended)

    return forward


def use_packed_vision_attention(model: torch.nn.Module) -> int:
    """Swap every vision attention's forward for the packed one; returns how many were swapped (0 with flash)."""
    visual = model.model.visual
    if "flash" in str(visual.config._attn_implementation):
        return 0
    cache = _BucketCache()
    forward = _packed_forward(cache)
    swapped = 0
    for module in visual.modules():
        if isinstance(module, qwen25.Qwen2_5_VLVisionAttention):
            module.forward = types.MethodType(forward, module)
            swapped += 1
    return swapped

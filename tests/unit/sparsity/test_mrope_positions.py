"""The plugin's M-RoPE positions for a pruned prompt equal HF get_rope_index on the full one, minus pruned columns.

This is the position half of inference consistency, checked directly on many grids and keep sets
(the vLLM integration test checks it end to end through log-probs).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel
from vllm.multimodal.inputs import (
    MultiModalBatchedField,
    MultiModalFeatureSpec,
    MultiModalFieldElem,
    MultiModalKwargsItem,
    PlaceholderRange,
)

from services.sparsity.budgets import keep_mask
from services.vllm_plugin.keep_sets import KEEP_MASK_FIELD, KeepSetModelMixin

IMAGE_TOKEN = 7
CONFIG = Qwen2_5_VLConfig(
    text_config={"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                 "intermediate_size": 64, "vocab_size": 32},
    vision_config={"depth": 1, "hidden_size": 32, "out_hidden_size": 64, "num_heads": 2, "intermediate_size": 32},
    image_token_id=IMAGE_TOKEN,
)


class PositionsOnly(KeepSetModelMixin):
    """The plugin's position logic with only the config it reads (no weights, no engine)."""

    def __init__(self, config: Qwen2_5_VLConfig) -> None:
        self.config = config


def _hf_positions(input_ids: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    # get_rope_index reads nothing but the config; build the module on the meta device (no weights).
    with torch.device("meta"):
        model = Qwen2_5_VLModel(CONFIG)
    positions, _ = model.get_rope_index(
        input_ids.cpu(), mm_token_type_ids=(input_ids == IMAGE_TOKEN).int(), image_grid_thw=grid
    )
    return positions[:, 0]


cases = st.tuples(
    st.integers(1, 6), st.integers(1, 6), st.integers(0, 5), st.integers(0, 7), st.integers(0, 2**31 - 1)
)


@settings(max_examples=60, deadline=None)
@given(cases)
def test_plugin_positions_equal_hf_positions_without_pruned_columns(case: tuple[int, int, int, int, int]) -> None:
    rows, cols, before, after, seed = case
    total = rows * cols
    generator = torch.Generator().manual_seed(seed)
    count = int(torch.randint(1, total + 1, (1,), generator=generator))
    kept = sorted(torch.randperm(total, generator=generator)[:count].tolist())
    grid = torch.tensor([[1, 2 * rows, 2 * cols]])
    full_ids = torch.tensor([[1] * before + [IMAGE_TOKEN] * total + [2] * after])
    mask = keep_mask(kept, total)
    expected = _hf_positions(full_ids, grid)[:, torch.cat([torch.ones(before, dtype=torch.bool), mask,
                                                          torch.ones(after, dtype=torch.bool)])]

    pruned_ids = [1] * before + [IMAGE_TOKEN] * count + [2] * after
    feature = MultiModalFeatureSpec(
        data=MultiModalKwargsItem({
            "image_grid_thw": MultiModalFieldElem(data=grid[0], field=MultiModalBatchedField()),
            KEEP_MASK_FIELD: MultiModalFieldElem(data=mask, field=MultiModalBatchedField()),
        }),
        modality="image",
        identifier="image-0",
        mm_position=PlaceholderRange(offset=before, length=count),
    )
    positions, delta = PositionsOnly(CONFIG).get_mrope_input_positions(pruned_ids, [feature])
    assert torch.equal(positions, expected)
    # Decoding continues where HF's unpruned sequence would: position = index + delta.
    assert delta == int(_hf_positions(full_ids, grid).max()) + 1 - len(pruned_ids)

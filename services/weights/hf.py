"""A transformers model's tensors under the names its checkpoint stores them (what a version's blob holds)."""

from __future__ import annotations

import torch
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict


def checkpoint_tensors(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors save_pretrained would write, under the names it would write them: tied copies dropped and
    the checkpoint's own names restored (transformers renames some on load, e.g. Qwen2.5-VL's
    model.language_model.*), so vLLM and from_pretrained read a version like any HF folder."""
    # The two steps save_pretrained itself runs before writing (transformers.modeling_utils.save_pretrained).
    return revert_weight_conversion(model, remove_tied_weights_from_state_dict(dict(state_dict), model))


def checkpoint_destination(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's live tensors by checkpoint name, to load a version into in place (verified_tensors).

    Raises ValueError when a checkpoint tensor is not a view of the model's own memory (a model whose load
    fuses or splits weights): writing into it would change a copy, not the model.
    """
    live = {tensor.data_ptr() for tensor in model.state_dict().values()}
    destination = checkpoint_tensors(model, model.state_dict())
    foreign = [name for name, tensor in destination.items() if tensor.data_ptr() not in live]
    if foreign:
        raise ValueError(f"{type(model).__name__} converts these tensors on load, so they cannot be loaded in "
                         f"place: {foreign[:5]}")
    return destination

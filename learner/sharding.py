"""The policy sharded over the learner's ranks with PyTorch FSDP2 (`fully_shard`), and what the step and the
checkpoints need around it: the full state dict on rank 0, lockstep counts, sharded (DCP) save and load.

Units: every vision block, the rest of the vision tower (patch embedding, merger), every decoder layer, the
token embedding, the text model's final norm, the LM head, then the root. The step calls these submodules
directly (vision tower into a detached leaf, embeddings, the decoder, `lm_head` on completion rows only), so
each one it calls is a unit of its own whose forward gathers its parameters; the root is initialised once by a
small no-grad forward so that every unit shares its post-backward callback (which reduce-scatters the gradients
of a unit whose backward the autograd graph never entered, e.g. the text attention scorer's layer K).

Every gather and reduce-scatter is a collective, so every rank must call the same units in the same order:
``learner.step`` runs the same number of vision chunks, micro-batches and scorer passes on every rank, padding a
rank that has less with zero-weight passes (``lockstep_counts``). Each unit reduce-scatters its gradients in every
backward rather than once per step: holding them unsharded until the step's last backward
(``set_requires_gradient_sync(False)``) would keep a full-model gradient on every rank for the whole step.
FSDP2 averages over ranks; the step wants the sum (each row's loss weight already comes from the whole step), so
it scales by W (``sum_gradients``; a divide factor of 1 needs ReduceOp.PREMUL_SUM, which gloo lacks).

The frozen KL reference is not sharded: it runs under no_grad, so it has no gradients or optimizer state, and
replicating it keeps its passes free of collectives (its memory is one compute-dtype copy per rank).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

SHARDED_DIR = "distributed"  # the DCP folder inside a checkpoint

# What a DCP .metadata pickle may name: its own dataclasses and torch's size/dtype types. A planted pickle that
# names anything else (os.system, builtins.eval, ...) is refused instead of run (pickle docs, "Restricting Globals").
_METADATA_MODULES = ("torch.distributed.checkpoint.", "torch.distributed._shard.")
_METADATA_GLOBALS = {("torch", "Size"), ("collections", "OrderedDict"), ("torch", "device"),
                     ("torch.serialization", "_get_layout"),  # looks a torch.layout up by name
                     ("pathlib", "PosixPath")}  # the checkpoint id


class UnsafeMetadataError(RuntimeError):
    """A DCP metadata file names a global outside the allow-list; it is not loaded."""


def _units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The policy's submodules that become FSDP units, innermost first (the root comes last, separately)."""
    core = model.model
    text = core.language_model
    return [*core.visual.blocks, core.visual, *text.layers, text.embed_tokens, text, model.lm_head]


def shard_policy(model: torch.nn.Module, mesh: Any = None) -> torch.nn.Module:
    """Shard the policy in place over the default process group (or `mesh`); returns it (now an FSDPModule)."""
    if model.config.tie_word_embeddings:
        raise ValueError("tied embeddings share one parameter between two FSDP units; untie them first")
    for unit in (*_units(model), model):
        fully_shard(unit, mesh=mesh)
    _initialise_root(model)
    return model


def _initialise_root(model: torch.nn.Module) -> None:
    """One tiny no-grad forward through the root: FSDP2 makes the first unit to run forward the root, and the
    step never calls the root's own forward, so without this each directly-called unit would become a root."""
    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when the model's parameters are FSDP2 shards."""
    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0's CPU (floating tensors cast to dtype), None on other ranks.

    A collective: every rank calls it. Each tensor is gathered and moved to the CPU one at a time, so no rank
    holds more than one extra full copy.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {name: tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            for name, tensor in state.items()}


def sum_gradients(params: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """Turn FSDP2's rank-averaged gradients into their sum over ranks (in place; exact for W a power of 2)."""
    for param in params:
        if param.grad is not None:
            param.grad.mul_(world_size)


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s total norm as a float (a DTensor over sharded gradients is reduced first)."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def collective_device() -> torch.device:
    """Where a small tensor must sit to go through the default process group (NCCL reduces GPU tensors only)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def lockstep_counts(counts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each entry's maximum over ranks (counts: slots x kinds), so every rank runs as many passes of each kind."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [list(row) for row in counts]
    packed = torch.tensor(counts, dtype=torch.int64, device=collective_device()).reshape(len(counts), -1)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return packed.tolist()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_METADATA_MODULES) or (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise UnsafeMetadataError(f"DCP metadata names {module}.{name}, outside the allow-list; refusing to load it")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with its one pickle (the .metadata file) read by an allow-listing unpickler; the tensor
    files are read with torch.load(weights_only=True) by DCP itself."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        """The checkpoint's metadata, refusing any global outside DCP's own dataclasses and torch types."""
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Write the model and the optimizer's tensors as a DCP checkpoint in `folder` (every rank writes its shards;
    a collective). Returns the optimizer's param_groups (plain values) for the caller's pickle-free file."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    # Tensors only: DCP would pickle any other value (and unpickle it on load with the full unpickler).
    dcp.save({"model": model_state, "optimizer": optimizer_state["state"]}, storage_writer=dcp.FileSystemWriter(folder))
    return optimizer_state["param_groups"]


def load_sharded(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, param_groups: list[dict[str, Any]]
) -> None:
    """Load a DCP checkpoint written by save_sharded into the model and optimizer, whatever the number of ranks
    it was written with (DCP reshards); param_groups: what save_sharded returned."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state["state"]}
    dcp.load(state, storage_reader=SafeFileSystemReader(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optimizer"], "param_groups": param_groups})


def load_full_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a one-rank checkpoint's optimizer state_dict (full tensors, keyed by parameter index in the order
    the optimizer was built: the trainable parameters in named_parameters order) into sharded parameters."""
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    by_name = {"state": {names[index]: value for index, value in state["state"].items()},
               "param_groups": [{**group, "params": [names[index] for index in group["params"]]}
                                for group in state["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict={}, optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True))

"""Learner scaling bench: the GRPO step on 1 rank against the FSDP2-sharded step on 2 ranks, same batches.

The groups are recorded once from the bundled tiny model (`assets/tiny-qwen25vl`, fp32) on the first tasks of the
digit-grid RL split with the paper's eight mass thresholds (`learner.recorded`, as `bench/learner_step.py`
does), and split into `--steps` batches of `--groups` groups. Each run trains a fresh copy of the model on those
batches in order (`learner.step.grpo_step` with the learner's default loss knobs: a frozen reference for the
KL, beta 0.04, and the kept-set term with the text_attention scorer at layer 2), one vision chunk per group:

    1 rank     no torch.distributed, a full replica (what `learner.num_workers: 1` runs)
    2 ranks    gloo, torch.multiprocessing; the policy sharded with `learner.sharding.shard_policy`

With 3 groups per step the 2-rank run is uneven (rank 0 takes 2 chunks, rank 1 one), so rank 1 runs a
zero-weight filler chunk: the lockstep that sharded collectives need is on the measured path.

Reported per step: the loss of each run and |Δloss|; after the last step: max |Δparameter| over the whole
model (rank 0's full state dict against the 1-rank model). Per rank: the bytes of the parameters and of the
optimizer state it holds (local shards), and its peak resident set during the steps above the resident set
before them (psutil, sampled every 5 ms: `PeakRss` from bench/learner_step.py) and in absolute terms.
Run: `python bench/learner_scaling.py` (`--quick`: 2 steps).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import RESULTS_DIR, print_table, save_results
from learner_step import PeakRss, _release_freed_memory

from learner.algorithms import LossConfig
from learner.recorded import record_groups
from learner.sharding import full_state_dict, shard_policy
from learner.step import PixelCache, StepConfig, grpo_step
from services.data.build import prepare_rl_split
from services.data.loader import load_dataset, open_image
from services.modeling import load_model_and_processor
from services.modeling.pruned_forward import image_inputs
from services.schemas import TrajectoryGroup
from services.settings.models import paper_budgets
from services.sparsity.scorers import build_scorer

LEARNING_RATE = 1e-4  # AdamW moves weights ~lr a step: far past rounding, and the KL term stays tame
# AdamW's update is lr * m / (sqrt(v) + eps): for an element whose summed gradient is within rounding of zero, the
# rank-order rounding of the sum can move it by up to ~lr. So besides the max we count the elements apart by more.
PARAMETER_TOLERANCE = 1e-6


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _local_bytes(tensors: Any) -> int:
    """Bytes this rank holds for the tensors (a DTensor counts its local shard only)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _local_bytes(value for state in optimizer.state.values() for value in state.values()
                        if isinstance(value, torch.Tensor))


def train_rank(rank: int, world_size: int, args: dict[str, Any]) -> None:
    """One rank: train on the recorded batches; write its losses, bytes, memory (and rank 0 the weights)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args['port']}", rank=rank,
                                world_size=world_size)
    lines = Path(args["groups"]).read_text().splitlines()
    groups = [TrajectoryGroup.model_validate_json(line) for line in lines]
    policy, processor = load_model_and_processor(args["model"])
    reference, _ = load_model_and_processor(args["model"])
    reference.requires_grad_(False)
    if world_size > 1:
        shard_policy(policy)
    images = {item.task.id: item.image_path for item in load_dataset(args["tasks"])}
    pixels = PixelCache(lambda group: image_inputs(processor, open_image(images[group.task.id])))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    config = StepConfig(loss=LossConfig(beta=0.04), micro_batch_groups=1, kept_mass_weight=1.0,
                        scorer=build_scorer("text_attention", 2))
    per_step = args["groups_per_step"]
    losses, grad_norms = [], []
    _release_freed_memory()
    with PeakRss() as rss:
        for step in range(args["steps"]):
            batch = groups[step * per_step:(step + 1) * per_step]
            metrics = grpo_step(policy, reference, optimizer, scheduler, batch, pixels, config, rank=rank,
                                world_size=world_size)
            losses.append(metrics["loss"])
            grad_norms.append(metrics["grad_norm"])
    out = Path(args["out"])
    state = full_state_dict(policy) if world_size > 1 else policy.state_dict()
    if state is not None:
        torch.save({name: tensor.detach().cpu() for name, tensor in state.items()}, out / f"weights-w{world_size}.pt")
    record = {
        "rank": rank, "world_size": world_size, "losses": losses, "grad_norms": grad_norms,
        "parameter_bytes": _local_bytes(policy.parameters()), "optimizer_state_bytes": _optimizer_bytes(optimizer),
        "peak_rss_mb_above_start": rss.growth_mb, "peak_rss_mb": rss.peak / 2**20,
    }
    (out / f"rank-w{world_size}-r{rank}.json").write_text(json.dumps(record))
    if world_size > 1:
        dist.destroy_process_group()


def _run(world_size: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Start world_size rank processes (spawned, so each has its own memory) and read their records."""
    mp.spawn(train_rank, args=(world_size, {**args, "port": _free_port()}), nprocs=world_size, join=True)
    out = Path(args["out"])
    return [json.loads((out / f"rank-w{world_size}-r{rank}.json").read_text()) for rank in range(world_size)]


def main(argv: list[str] | None = None) -> int:
    """Record the batches, train them on 1 and on 2 ranks, compare; print a table and save JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "assets/tiny-qwen25vl")
    parser.add_argument("--tasks", type=Path, default=REPO / "assets/tasks/digits/rl.jsonl")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--groups", type=int, default=3, help="groups per step (3: uneven over 2 ranks)")
    parser.add_argument("--quick", action="store_true", help="2 steps: a smoke run")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    steps = 2 if args.quick else args.steps
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the spawned ranks inherit it

    tasks = prepare_rl_split(args.tasks)
    items = load_dataset(tasks)[:steps * args.groups]
    model, processor = load_model_and_processor(args.model)
    groups = record_groups(model, processor, items, paper_budgets())
    del model
    with tempfile.TemporaryDirectory(prefix="sf-scaling-") as folder:
        shared = {"model": str(args.model), "tasks": str(tasks), "steps": steps, "groups_per_step": args.groups,
                  "groups": str(Path(folder) / "groups.jsonl"), "out": folder}
        Path(shared["groups"]).write_text("\n".join(group.model_dump_json() for group in groups) + "\n")
        single = _run(1, shared)
        sharded = _run(2, shared)
        weights_1 = torch.load(Path(folder) / "weights-w1.pt", weights_only=True)
        weights_2 = torch.load(Path(folder) / "weights-w2.pt", weights_only=True)
    base = load_model_and_processor(args.model)[0].state_dict()
    return _report(single, sharded, weights_1, weights_2, base, steps, args)


def _report(single: list[dict[str, Any]], sharded: list[dict[str, Any]], weights_1: dict[str, torch.Tensor],
            weights_2: dict[str, torch.Tensor], base: dict[str, torch.Tensor], steps: int,
            args: argparse.Namespace) -> int:
    """Print the per-step and per-rank tables, save bench/results/learner_scaling.json."""
    if weights_1.keys() != weights_2.keys():
        raise RuntimeError(f"state dict keys differ: {sorted(weights_1.keys() ^ weights_2.keys())[:5]}")
    delta_loss = [abs(a - b) for a, b in zip(single[0]["losses"], sharded[0]["losses"], strict=True)]
    delta_param = max(float((weights_1[name] - weights_2[name]).abs().max()) for name in weights_1)
    differing = sum(int(((weights_1[name] - weights_2[name]).abs() > PARAMETER_TOLERANCE).sum()) for name in weights_1)
    differing_share = differing / sum(tensor.numel() for tensor in weights_1.values())
    moved = max(float((weights_1[name] - base[name]).abs().max()) for name in weights_1)
    print_table(f"loss per step, 1 rank vs 2 ranks (FSDP2, gloo), {args.groups} groups/step",
                ["step", "loss 1 rank", "loss 2 ranks", "|Δloss|"],
                [[step + 1, a, b, d] for step, (a, b, d) in
                 enumerate(zip(single[0]["losses"], sharded[0]["losses"], delta_loss, strict=True))])
    ranks = [("1 rank", record) for record in single] + [(f"2 ranks, rank {r['rank']}", r) for r in sharded]
    print_table("per rank", ["run", "params MB", "optimizer MB", "params+optimizer MB", "peak RSS MB above start",
                             "peak RSS MB"],
                [[name, r["parameter_bytes"] / 2**20, r["optimizer_state_bytes"] / 2**20,
                  (r["parameter_bytes"] + r["optimizer_state_bytes"]) / 2**20, r["peak_rss_mb_above_start"],
                  r["peak_rss_mb"]] for name, r in ranks])
    full = single[0]["parameter_bytes"] + single[0]["optimizer_state_bytes"]
    shares = [(r["parameter_bytes"] + r["optimizer_state_bytes"]) / full for r in sharded]
    print(f"max |Δloss| {max(delta_loss):.3g}, max |Δparameter| {delta_param:.3g} (largest move from the start "
          f"{moved:.3g}; {differing_share:.2e} of the elements apart by > {PARAMETER_TOLERANCE:g}); per-rank "
          f"params+optimizer share of 1 rank: {', '.join(f'{s:.3f}' for s in shares)}")
    path = save_results("learner_scaling", {
        "model": str(args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model),
        "dtype": "float32", "steps": steps, "groups_per_step": args.groups, "learning_rate": LEARNING_RATE,
        "backend": "gloo (CPU), torch.multiprocessing", "sharding": "FSDP2 fully_shard (learner.sharding)",
        "max_abs_delta_loss": max(delta_loss), "abs_delta_loss_per_step": delta_loss,
        "max_relative_delta_loss": max(d / max(abs(a), 1.0) for d, a in zip(delta_loss, single[0]["losses"],
                                                                              strict=True)),
        "max_abs_delta_parameter": delta_param, "max_abs_parameter_move": moved,
        "parameter_tolerance": PARAMETER_TOLERANCE, "share_of_parameters_beyond_tolerance": differing_share,
        "max_relative_delta_grad_norm": max(abs(a - b) / max(abs(a), 1e-12) for a, b in
                                            zip(single[0]["grad_norms"], sharded[0]["grad_norms"], strict=True)),
        "params_plus_optimizer_share_per_rank": shares,
        "memory": "peak RSS above the pre-step RSS, sampled every 5 ms (psutil); bytes: local tensors (shards)",
        "one_rank": single, "two_ranks": sharded,
    }, args.results_dir)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

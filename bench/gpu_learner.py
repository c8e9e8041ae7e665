"""GPU learner bench: the project's own learner code on random-weight Qwen2.5-VL models of the real 3B and 7B shapes.

Needs only torch, transformers (5.17 or newer) and pure-Python wheels (pydantic); builds every model directly on
the GPU in bf16 (or fp32 master weights), so it runs where no checkpoint can be downloaded. Sections:
  a. one GRPO step (`learner.step.grpo_step`) on the 3B shape at G = 8, one 1344x1008 image per group, budgets
     {1, .5, .25, .125} x 2, fp32 master weights with bf16 autocast, a bf16 frozen reference and AdamW: step time,
     peak memory and MFU; the same step with one batch row per rollout (no shared prompts), and the old
     per-rollout path at G = 4 beside it, in the same run;
  b. the 7B pruned forward+backward at keep 1 / .5 / .25 / .125: one group (vision tower once, G = 8 rollouts
     batched, as the learner runs it) and one rollout alone (vision tower included);
  c. bf16 update survival: after one AdamW step at lr 1e-5, the share of weights with a non-zero gradient that
     changed (fp32 master weights, and bf16 weights updated in place for contrast);
  d. the vision tower forward+backward with packed against per-window attention (7B shape).
FLOP model (per sequence forward; a training pass counts 3x, the reference 1x):
  vision  = 2*P_patch_embed*patches + 2*P_blocks*patches + 4*hidden_v*sum_blocks(sum_windows |w|^2) + 2*P_merger*patches/4
  llm     = 2*P_decoder*L' + 2*layers*L'^2*heads*head_dim          (causal: half of 4*L'^2*d per layer)
  lm_head = 2*D*V*C                                                 (completion rows only, as the code runs it)
  step    = 4*vision per group + sum over batch rows of 4*(llm + lm_head); a batch row is a rollout, or with
            shared prompts (learner.share_prompts, the default) the rollouts of a group with one keep set:
            L' = their pruned prompt + all their completions, counted once
  MFU = step FLOPs / step seconds / 790e12 (H200 dense bf16); padding rows are not counted as useful FLOPs.
Run: `python bench/gpu_learner.py` (writes bench/results/gpu_learner.json); `--tiny` runs toy shapes on any device,
`--quick` (tiny, one repeat) is the test suite's smoke run.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
import transformers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from learner.algorithms import LossConfig
from learner.recorded import recorded_reward
from learner.step import PixelCache, StepConfig, grpo_step
from services.modeling.batched_forward import RowSpec, batched_completion_logprobs, plan_batch
from services.modeling.pruned_forward import image_features
from services.modeling.vision_attention import use_packed_vision_attention
from services.schemas import Budget, Rollout, Task, TrajectoryGroup
from services.sparsity.budgets import KeepRatio, select
from services.sparsity.scorers import ScorerInputs, TextAttentionScorer

PEAK_BF16_FLOPS = 790e12
KEEP_RATIOS = (1.0, 0.5, 0.25, 0.125)
# Qwen2.5-VL's special ids. The toy shape has a 4k vocabulary, its special ids at the top: a 152k one makes the
# lm_head's weight gradient, a bf16 matmul the CPU is slow at, most of a toy step.
SPECIAL_TOKENS = {"real": {"vision_start_token_id": 151652, "vision_end_token_id": 151653,
                           "image_token_id": 151655, "video_token_id": 151656},
                  "tiny": {"vision_start_token_id": 4090, "vision_end_token_id": 4091,
                           "image_token_id": 4093, "video_token_id": 4094}}
FIRST_TEXT_ID = 100
VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu",
              "in_chans": 3, "tokens_per_second": 2}
TEXT = {
    "3B": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
               "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "7B": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
               "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "vocab_size": 4096, "tie_word_embeddings": False,
             "bos_token_id": 4088, "eos_token_id": 4089},
}
TINY_VISION = dict(VISION, depth=4, hidden_size=64, intermediate_size=128, num_heads=4, fullatt_block_indexes=[1, 3])


def qwen25_vl_config(shape: str) -> Qwen2_5_VLConfig:
    """The real Qwen2.5-VL 3B / 7B architecture (parameter counts match the published checkpoints)."""
    text = TEXT[shape]
    vision = TINY_VISION if shape == "tiny" else VISION
    mrope = [4, 6, 6] if shape == "tiny" else [16, 24, 24]
    return Qwen2_5_VLConfig(
        vision_config={**vision, "out_hidden_size": text["hidden_size"]},
        text_config={**text, "rope_theta": 1_000_000.0, "rope_scaling": {"type": "mrope", "mrope_section": mrope},
                     "max_position_embeddings": 128_000, "rms_norm_eps": 1e-6},
        tie_word_embeddings=text["tie_word_embeddings"], **SPECIAL_TOKENS["tiny" if shape == "tiny" else "real"],
    )


def build_model(shape: str, dtype: torch.dtype, device: torch.device, packed: bool = True) -> torch.nn.Module:
    """Random weights, made directly on the device (seconds, not the minutes of a CPU init)."""
    config = qwen25_vl_config(shape)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    if packed:
        use_packed_vision_attention(model)
    return model


# ---------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> dict[str, Any]:
    """Median wall time of `repeats` calls after `warmup`, each ending in a device sync; peak memory above start."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync(device)
        walls.append(time.perf_counter() - started)
    result: dict[str, Any] = {"median_s": statistics.median(walls), "min_s": min(walls), "wall_s": walls,
                              "repeats": repeats, "warmup": warmup}
    if device.type == "cuda":
        gib = 2.0 ** 30
        result.update(peak_allocated_gib=torch.cuda.max_memory_allocated(device) / gib,
                      allocated_before_gib=before / gib,
                      peak_above_start_gib=(torch.cuda.max_memory_allocated(device) - before) / gib)
    return result


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- inputs
def image_grid(width: int, height: int) -> torch.Tensor:
    return torch.tensor([[1, height // 14, width // 14]])


def random_pixels(grid: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, generator=generator)


def random_text_ids(config: Qwen2_5_VLConfig, count: int, generator: torch.Generator) -> list[int]:
    """Random ordinary text ids, below every special id of the config."""
    return torch.randint(FIRST_TEXT_ID, config.vision_start_token_id, (count,), generator=generator).tolist()


def prompt_ids(config: Qwen2_5_VLConfig, visual_tokens: int, question_tokens: int, seed: int) -> list[int]:
    """The chat layout of a Qwen2.5-VL prompt with random text ids: system, image, question, assistant prefix."""
    generator = torch.Generator().manual_seed(seed)
    text = lambda n: random_text_ids(config, n, generator)
    return [*text(12), config.vision_start_token_id, *[config.image_token_id] * visual_tokens,
            config.vision_end_token_id, *text(question_tokens), *text(5)]


def make_group(model: torch.nn.Module, index: int, grid: torch.Tensor, keep_ratios: list[float],
               question_tokens: int, completion_tokens: int) -> TrajectoryGroup:
    """One group of len(keep_ratios) rollouts on one random image: keep sets from random scores."""
    merge = model.config.vision_config.spatial_merge_size
    total = int(grid.prod()) // merge ** 2
    prompt = prompt_ids(model.config, total, question_tokens, seed=index)
    scores = torch.rand(total, generator=torch.Generator().manual_seed(index))
    generator = torch.Generator().manual_seed(1000 + index)
    task = Task(id=f"task-{index}", image="x.png", question="q", answer="a", answer_type="exact")
    rollouts, rewards = [], []
    for position, ratio in enumerate(keep_ratios):
        selection = select(scores, KeepRatio(ratio))
        completion = random_text_ids(model.config, completion_tokens, generator)
        rollouts.append(Rollout(
            task_id=task.id, rollout_index=position, budget=Budget(kind="keep_ratio", value=ratio),
            prompt_token_ids=prompt, completion_token_ids=completion, completion_logprobs=[-1.0] * completion_tokens,
            completion_text="a", kept_indices=list(selection.kept_indices),
            visual_tokens_kept=selection.visual_tokens_kept, visual_tokens_total=total, policy_version=0,
        ))
        rewards.append(recorded_reward(position % 2 == 0, selection.reduction_ratio))
    return TrajectoryGroup(group_id=f"g-{index}", task=task, rollouts=rollouts, rewards=rewards, policy_version=0,
                           worker_id="bench")


def with_own_logprobs(model: torch.nn.Module, group: TrajectoryGroup, pixels: tuple, device: torch.device,
                      dtype: torch.dtype) -> TrajectoryGroup:
    """The group with its recorded log-probs replaced by the model's own (as a matching engine reports them)."""
    rows = [RowSpec(r.prompt_token_ids, r.completion_token_ids, r.kept_indices) for r in group.rollouts]
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != next(model.parameters()).dtype):
        plan = plan_batch(model, rows, pixels[1]).to(device)
        features = image_features(model, pixels[0].to(device), pixels[1].to(device))
        logprobs = batched_completion_logprobs(model, plan, features).clamp(max=0.0).tolist()
    rollouts = [r.model_copy(update={"completion_logprobs": lp[:len(r.completion_token_ids)]})
                for r, lp in zip(group.rollouts, logprobs, strict=True)]
    return group.model_copy(update={"rollouts": rollouts})


# ---------------------------------------------------------------------------------------------- FLOPs
def attention_segments(model: torch.nn.Module, grid: torch.Tensor) -> list[list[int]]:
    """Patch counts of the attention segments (windows) each vision block sees, read from one forward."""
    segments: list[list[int]] = []

    def record(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        bounds = kwargs["cu_seqlens"].tolist()
        segments.append([b - a for a, b in itertools.pairwise(bounds) if b > a])

    blocks = model.model.visual.blocks
    handles = [block.attn.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            image_features(model, random_pixels(grid, 0).to(device, next(model.parameters()).dtype), grid.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return segments


def flop_model(model: torch.nn.Module, grid: torch.Tensor) -> dict[str, Any]:
    """Per-sequence forward FLOP functions of the model (see the module docstring)."""
    visual, text = model.model.visual, model.config.text_config
    patches = int(grid.prod())
    count = lambda module: sum(p.numel() for p in module.parameters())
    segments = attention_segments(model, grid)
    attention = sum(length * length for block in segments for length in block)
    vision = (2 * count(visual.patch_embed) * patches + 2 * count(visual.blocks) * patches
              + 4 * visual.config.hidden_size * attention + 2 * count(visual.merger) * patches / 4)
    decoder = count(model.model.language_model.layers)
    heads_dim = text.num_attention_heads * (text.hidden_size // text.num_attention_heads)

    def llm(length: int) -> float:
        return 2 * decoder * length + 2 * text.num_hidden_layers * length * length * heads_dim

    def lm_head(completion: int) -> float:
        return 2 * text.hidden_size * text.vocab_size * completion

    return {"vision": vision, "llm": llm, "lm_head": lm_head, "patches": patches,
            "windows": max(len(block) for block in segments)}


def step_flops(
    flops: dict[str, Any], groups: list[TrajectoryGroup], placeholder: int, share_prompts: bool
) -> float:
    """4*vision per group + 4*(llm + lm_head) per batch row: a rollout, or, sharing prompts, the rollouts of a
    group with one keep set (their prompt once, then every completion)."""
    from learner.step import pruned_length

    total = 0.0
    for group in groups:
        total += 4 * flops["vision"]
        units: dict[tuple[int, ...], list[int]] = {}
        for index, rollout in enumerate(group.rollouts):
            units.setdefault(tuple(rollout.kept_indices) if share_prompts else (index,), []).append(index)
        for members in units.values():
            completions = [len(group.rollouts[i].completion_token_ids) for i in members]
            prompt = pruned_length(group.rollouts[members[0]], placeholder) - completions[0]
            total += 4 * (flops["llm"](prompt + sum(completions)) + flops["lm_head"](sum(completions)))
    return total


# ---------------------------------------------------------------------------------------------- sections
def grpo_step_section(args: argparse.Namespace, device: torch.device, out: dict[str, Any]) -> None:
    """(a) and (c): GRPO steps on the 3B shape, new path at G = 8, old path at G = 4, update survival."""
    shape = "tiny" if args.tiny else "3B"
    grid = image_grid(*args.image_wh)
    policy = build_model(shape, torch.float32, device)  # fp32 master weights
    reference = build_model(shape, torch.bfloat16, device)
    reference.requires_grad_(False)
    flops = flop_model(policy, grid)
    pixels = {f"task-{i}": (random_pixels(grid, i), grid) for i in range(args.groups_per_step)}
    cache = PixelCache(lambda group: pixels[group.task.id])
    section: dict[str, Any] = {"model": f"Qwen2.5-VL-{shape}-shaped (random weights)", "flop_parts": {
        "vision": flops["vision"], "patches": flops["patches"], "windows": flops["windows"]}}
    out["a_grpo_step"] = section
    def run_condition(name: str, group_size: int, **knobs: Any) -> None:
        ratios = list(KEEP_RATIOS) * (group_size // len(KEEP_RATIOS))
        if time.monotonic() > args.deadline:
            section[name] = {"skipped": "time budget"}
            return
        groups = [make_group(policy, i, grid, ratios, args.question_tokens, args.completion_tokens)
                  for i in range(args.groups_per_step)]
        groups = [with_own_logprobs(policy, g, pixels[g.task.id], device, torch.bfloat16) for g in groups]
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-8)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
        config = StepConfig(loss=LossConfig(beta=0.04), kept_mass_weight=1.0,
                            scorer=TextAttentionScorer(layer=2), compute_dtype=torch.bfloat16, **knobs)
        metrics: dict[str, float] = {}

        def step() -> None:
            metrics.update(grpo_step(policy, reference, optimizer, scheduler, groups, cache, config))

        try:
            timing = timed(step, device, args.repeats, args.warmup)
        except torch.OutOfMemoryError as error:
            section[name] = {"oom": True, "error": str(error)[:300]}
            return
        useful = step_flops(flops, groups, policy.config.image_token_id, config.share_prompts and config.forward == "batched")
        rollouts = sum(len(g.rollouts) for g in groups)
        section[name] = {
            "group_size": group_size, "groups": len(groups), "knobs": {k: str(v) for k, v in knobs.items()},
            "step": timing, "flops_useful": useful, "achieved_tflops": useful / timing["median_s"] / 1e12,
            "mfu": useful / timing["median_s"] / PEAK_BF16_FLOPS, "ms_per_rollout": 1e3 * timing["median_s"] / rollouts,
            "last_metrics": {k: v for k, v in metrics.items() if isinstance(v, float)},
        }
        print(f"[a] {name}: {timing['median_s']:.3f} s/step, MFU {section[name]['mfu']:.3f}, "
              f"peak {timing.get('peak_allocated_gib', 0):.1f} GiB", flush=True)

    # Each condition's optimizer state dies with its call; free() returns the memory before the next one.
    run_condition("batched_G8", 8, micro_batch_groups=1, micro_batch_tokens=args.micro_batch_tokens)
    free(device)
    # The budgets repeat (x2), so shared prompts halve the LLM rows; this is the step without them.
    run_condition("batched_G8_row_per_rollout", 8, micro_batch_groups=1,
                  micro_batch_tokens=args.micro_batch_tokens, share_prompts=False)
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    free(device)
    run_condition("batched_G8_gradient_checkpointing", 8, micro_batch_groups=1,
                  micro_batch_tokens=4 * args.micro_batch_tokens)
    policy.gradient_checkpointing_disable()
    policy.eval()
    free(device)
    # The old forward (vision tower per rollout, batch 1, lm_head on every row), one backward per rollout so
    # its memory stays bounded beside the fp32 master weights.
    run_condition("per_rollout_G4_old_path", 4, forward="per_rollout", micro_batch_groups=1, micro_batch_tokens=1)
    free(device)
    new, old = section.get("batched_G8", {}), section.get("per_rollout_G4_old_path", {})
    if "ms_per_rollout" in new and "ms_per_rollout" in old:
        section["per_rollout_time_ratio_old_over_new"] = old["ms_per_rollout"] / new["ms_per_rollout"]
    update_survival(args, policy, reference, cache, grid, device, out)


def update_survival(args: argparse.Namespace, policy: torch.nn.Module, reference: torch.nn.Module,
                    cache: PixelCache, grid: torch.Tensor, device: torch.device, out: dict[str, Any]) -> None:
    """(c): share of weights with a non-zero gradient that one AdamW step at lr 1e-5 changes."""
    if time.monotonic() > args.deadline:
        out["c_update_survival"] = {"skipped": "time budget"}
        return
    policy.zero_grad(set_to_none=True)
    groups = [make_group(policy, 0, grid, [1.0, 0.5, 0.25, 0.125], args.question_tokens, args.completion_tokens)]
    config = StepConfig(loss=LossConfig(beta=0.0), compute_dtype=torch.bfloat16, micro_batch_groups=1,
                        micro_batch_tokens=args.micro_batch_tokens)
    section: dict[str, Any] = {"lr": 1e-5, "beta": 0.0}
    # The bf16 reference, trained in place, is the old learner.dtype=bfloat16 behaviour.
    for label, model in (("fp32_master_bf16_autocast", policy), ("bf16_weights_in_place", reference)):
        model.requires_grad_(True)
        before = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
        grpo_step(model, None, optimizer, scheduler, groups, cache, config)
        changed = with_grad = 0
        named = {}
        for name, p in model.named_parameters():
            state = optimizer.state.get(p)
            if state is None:
                continue
            moved = p.detach().cpu() != before[name]
            nonzero = state["exp_avg"].cpu() != 0
            changed += int((moved & nonzero).sum())
            with_grad += int(nonzero.sum())
            if name.endswith(("layers.0.self_attn.q_proj.weight", "blocks.0.attn.qkv.weight", "embed_tokens.weight")):
                named[name] = float((moved & nonzero).sum()) / max(int(nonzero.sum()), 1)
        section[label] = {"dtype": str(next(model.parameters()).dtype), "weights_with_grad": with_grad,
                          "fraction_changed_where_grad_nonzero": changed / max(with_grad, 1), "named": named}
        print(f"[c] {label}: {section[label]['fraction_changed_where_grad_nonzero']:.4f} of updated weights changed",
              flush=True)
        del optimizer, before
        free(device)
    out["c_update_survival"] = section


def forward_backward_section(args: argparse.Namespace, device: torch.device, out: dict[str, Any]) -> None:
    """(b) and (d): the 7B pruned forward+backward per keep ratio; packed vs per-window vision attention."""
    shape = "tiny" if args.tiny else "7B"
    grid = image_grid(*args.image_wh)
    model = build_model(shape, torch.bfloat16, device)
    flops = flop_model(model, grid)
    pixel_values, grid_device = random_pixels(grid, 7).to(device), grid.to(device)
    section: dict[str, Any] = {"model": f"Qwen2.5-VL-{shape}-shaped (random bf16 weights)", "per_keep_ratio": {}}
    out["b_pruned_forward_backward"] = section
    for ratio in KEEP_RATIOS:
        if time.monotonic() > args.deadline:
            section["per_keep_ratio"][f"r={ratio:g}"] = {"skipped": "time budget"}
            continue
        group = make_group(model, 7, grid, [ratio] * args.group_size, args.question_tokens, args.completion_tokens)
        rows = [RowSpec(r.prompt_token_ids, r.completion_token_ids, r.kept_indices) for r in group.rollouts]
        length = plan_batch(model, rows[:1], grid).lengths[0]
        per_batch = max(1, args.micro_batch_tokens // length)  # token-sized micro-batches, as the learner cuts

        def group_pass(size: int, rows: list[RowSpec] = rows, per_batch: int = per_batch) -> Callable[[], None]:
            plans = [plan_batch(model, rows[start:min(start + per_batch, size)], grid).to(device)
                     for start in range(0, size, per_batch)]

            def run() -> None:
                features = image_features(model, pixel_values, grid_device)
                leaf = features.detach().requires_grad_(True)
                for plan in plans:
                    batched_completion_logprobs(model, plan, leaf).sum().backward()
                features.backward(leaf.grad)
                model.zero_grad(set_to_none=True)
            return run

        entry: dict[str, Any] = {"kept_visual_tokens": len(rows[0].kept_indices), "pruned_seq_len": length}
        for label, size in (("one_rollout", 1), (f"group_G{len(rows)}", len(rows))):
            timing = timed(group_pass(size), device, args.repeats, args.warmup)
            useful = 3 * (flops["vision"] + size * (flops["llm"](length) + flops["lm_head"](args.completion_tokens)))
            entry[label] = {**timing, "flops": useful, "mfu": useful / timing["median_s"] / PEAK_BF16_FLOPS}
        section["per_keep_ratio"][f"r={ratio:g}"] = entry
        print(f"[b] keep {ratio}: one rollout {entry['one_rollout']['median_s']:.3f} s, group "
              f"{entry[f'group_G{len(rows)}']['median_s']:.3f} s", flush=True)
    keep1, keep025 = section["per_keep_ratio"].get("r=1", {}), section["per_keep_ratio"].get("r=0.25", {})
    for label in ("one_rollout", f"group_G{args.group_size}"):
        if label in keep1 and label in keep025:
            section[f"speedup_keep025_vs_keep1_{label}"] = keep1[label]["median_s"] / keep025[label]["median_s"]
    vision_attention_section(args, model, pixel_values, grid_device, flops, device, out)
    scorer_section(args, model, pixel_values, grid_device, grid, device, out)


def vision_attention_section(args: argparse.Namespace, model: torch.nn.Module, pixel_values: torch.Tensor,
                             grid: torch.Tensor, flops: dict[str, Any], device: torch.device,
                             out: dict[str, Any]) -> None:
    """(d): vision tower forward+backward, packed (what `model` runs) against HF's per-window loop."""
    if time.monotonic() > args.deadline:
        out["d_vision_attention"] = {"skipped": "time budget"}
        return
    def vision_pass() -> None:
        image_features(model, pixel_values, grid).float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    section: dict[str, Any] = {"packed": timed(vision_pass, device, args.repeats, args.warmup)}
    for module in model.model.visual.modules():
        if "forward" in vars(module) and hasattr(module, "qkv"):
            del module.forward  # back to the class's (HF's per-window) forward
    section["per_window"] = timed(vision_pass, device, args.repeats, args.warmup)
    section["speedup_packed"] = section["per_window"]["median_s"] / section["packed"]["median_s"]
    section["vision_forward_flops"] = flops["vision"]
    use_packed_vision_attention(model)
    out["d_vision_attention"] = section
    print(f"[d] vision fwd+bwd: packed {section['packed']['median_s']:.3f} s, per-window "
          f"{section['per_window']['median_s']:.3f} s ({section['speedup_packed']:.2f}x)", flush=True)


def scorer_section(args: argparse.Namespace, model: torch.nn.Module, pixel_values: torch.Tensor,
                   grid_device: torch.Tensor, grid: torch.Tensor, device: torch.device, out: dict[str, Any]) -> None:
    """The rollout worker's scorer (text attention at layer 2) on the unpruned prompt, vision features given."""
    if time.monotonic() > args.deadline:
        return
    total = int(grid.prod()) // 4
    ids = torch.tensor([prompt_ids(model.config, total, args.question_tokens, seed=7)], device=device)
    with torch.no_grad():
        features = image_features(model, pixel_values, grid_device)
    inputs = ScorerInputs(ids, pixel_values, grid_device, image_embeds=features)
    scorer = TextAttentionScorer(layer=2)
    out["e_scorer_text_attention_layer2"] = timed(lambda: scorer.score(model, inputs), device, args.repeats,
                                                  args.warmup)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "device": str(device),
                           "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        env.update(gpu=properties.name, gpu_total_gib=properties.total_memory / 2**30, cuda=torch.version.cuda,
                   sms=properties.multi_processor_count)
    return env


def main(argv: list[str] | None = None) -> int:
    """Run the sections that fit in the time budget; print progress and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy shapes (a smoke run on any device)")
    parser.add_argument("--quick", action="store_true", help="--tiny, one repeat, no warm-up: the smoke test")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench/results")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: <results-dir>/gpu_learner.json)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=270.0, help="sections past this many seconds are skipped")
    parser.add_argument("--sections", default="a,b", help="comma list of a (step, update survival) and b (passes)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tiny, args.repeats, args.warmup = True, 1, 0
    args.out = args.out or args.results_dir / "gpu_learner.json"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.image_wh = (224, 224) if args.tiny else (1344, 1008)
    args.question_tokens, args.completion_tokens = 40, (8 if args.tiny else 64)
    args.groups_per_step, args.group_size = 1, 8
    args.micro_batch_tokens = 4096
    args.deadline = time.monotonic() + args.budget_s
    torch.manual_seed(0)
    started = time.perf_counter()
    out: dict[str, Any] = {"about": __doc__.split("\n")[0], "env": environment(device), "errors": {},
                           "config": {"tiny": args.tiny, "image_wh": args.image_wh, "repeats": args.repeats,
                                      "warmup": args.warmup, "keep_ratios": KEEP_RATIOS,
                                      "question_tokens": args.question_tokens,
                                      "completion_tokens": args.completion_tokens,
                                      "micro_batch_tokens": args.micro_batch_tokens,
                                      "peak_bf16_flops_for_mfu": PEAK_BF16_FLOPS}}
    sections = {"a": grpo_step_section, "b": forward_backward_section}
    for key in args.sections.split(","):
        try:
            sections[key](args, device, out)
        except Exception as error:  # noqa: BLE001 - a section's failure is recorded; the others still run
            out["errors"][key] = {"error": repr(error)[:500], "traceback": traceback.format_exc()[-3000:]}
            print(f"section {key} failed: {error!r}", flush=True)
        free(device)
    out["elapsed_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "env"}, indent=1, default=str)[:6000])
    print(f"wrote {args.out} in {out['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

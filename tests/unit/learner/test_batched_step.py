"""The learner's batched path against the one-rollout-at-a-time reference, on the bundled tiny model in fp32.

Pins: batched log-probs equal per-rollout log-probs; the gradient through features shared by a group equals
the sum of per-rollout gradients; a whole GRPO step (KL, kept-set term, token micro-batches that cut groups)
takes the same update both ways; bf16 compute over fp32 master weights loses no update.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from learner.algorithms import LossConfig
from learner.recorded import record_groups
from learner.step import PixelCache, StepConfig, grpo_step, rollout_logprobs
from services.data.loader import load_dataset, open_image
from services.modeling import load_model_and_processor
from services.modeling.batched_forward import RowSpec, plan_batch, rows_completion_logprobs
from services.modeling.pruned_forward import image_inputs, pruned_completion_logprobs
from services.modeling.vision_attention import use_packed_vision_attention
from services.schemas import Budget
from services.sparsity.budgets import KeepSetError
from services.sparsity.scorers import build_scorer

REPO = Path(__file__).resolve().parents[3]
MODEL = REPO / "assets/tiny-qwen25vl"
TASKS = REPO / "assets/tasks/scenes/val.jsonl"
BUDGETS = [Budget(kind="keep_ratio", value=value) for value in (1.0, 0.5, 0.25, 0.125)]


@pytest.fixture(scope="module")
def recorded() -> tuple:
    torch.manual_seed(0)
    model, processor = load_model_and_processor(MODEL)
    items = load_dataset(TASKS)[:3]
    groups = record_groups(model, processor, items, BUDGETS)
    images = {item.task.id: item.image_path for item in items}
    pixels = PixelCache(lambda group: image_inputs(processor, open_image(images[group.task.id])))
    return model, groups, pixels


def _rows_and_images(groups: list, pixels: PixelCache) -> tuple[list[RowSpec], torch.Tensor, torch.Tensor]:
    rows = [RowSpec(r.prompt_token_ids, r.completion_token_ids, r.kept_indices, image)
            for image, group in enumerate(groups) for r in group.rollouts]
    inputs = [pixels.get(group) for group in groups]
    return rows, torch.cat([p for p, _ in inputs]), torch.cat([g for _, g in inputs])


def test_batched_logprobs_equal_per_rollout_logprobs(recorded: tuple) -> None:
    model, groups, pixels = recorded
    rows, pixel_values, grids = _rows_and_images(groups, pixels)
    with torch.no_grad():
        batched, mask = rows_completion_logprobs(model, rows, pixel_values, grids)
        flat = [r for group in groups for r in group.rollouts]
        for index, (rollout, group) in enumerate(zip(flat, [g for g in groups for _ in g.rollouts], strict=True)):
            alone = rollout_logprobs(model, rollout, pixels.get(group))
            assert int(mask[index].sum()) == alone.numel()
            torch.testing.assert_close(batched[index, :alone.numel()], alone, atol=1e-5, rtol=0)
    assert not bool(mask.all()) or len({len(r.completion_token_ids) for r in flat}) == 1


def test_engine_prompts_with_pruned_placeholders_plan_like_unpruned_ones(recorded: tuple) -> None:
    model, groups, pixels = recorded
    rollout = groups[0].rollouts[2]  # keep ratio 0.25
    placeholder = int(model.config.image_token_id)
    prompt = rollout.prompt_token_ids
    start = prompt.index(placeholder)
    engine_prompt = prompt[:start] + [placeholder] * len(rollout.kept_indices) + prompt[start + prompt.count(placeholder):]
    grid = pixels.get(groups[0])[1]
    unpruned = plan_batch(model, [RowSpec(prompt, rollout.completion_token_ids, rollout.kept_indices)], grid)
    engine = plan_batch(model, [RowSpec(engine_prompt, rollout.completion_token_ids, rollout.kept_indices)], grid)
    assert torch.equal(unpruned.position_ids, engine.position_ids) and torch.equal(unpruned.input_ids, engine.input_ids)
    with pytest.raises(KeepSetError, match="image placeholders"):
        plan_batch(model, [RowSpec(engine_prompt[:-3] + [placeholder] * 3, [5], rollout.kept_indices)], grid)
    with pytest.raises(KeepSetError, match="strictly increasing"):
        plan_batch(model, [RowSpec(prompt, [5], [3, 1])], grid)


def test_shared_feature_gradients_equal_the_sum_of_per_rollout_gradients(recorded: tuple) -> None:
    model, groups, pixels = recorded
    policy = copy.deepcopy(model)
    group = groups[0]
    rows, pixel_values, grids = _rows_and_images([group], pixels)
    weights = torch.linspace(-1.0, 1.0, len(rows))

    policy.zero_grad()
    logprobs, mask = rows_completion_logprobs(policy, rows, pixel_values, grids)
    (logprobs * mask * weights[:, None]).sum().backward()
    shared = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}

    policy.zero_grad()
    for weight, rollout in zip(weights, group.rollouts, strict=True):
        ids = torch.tensor([rollout.prompt_token_ids + rollout.completion_token_ids])
        alone = pruned_completion_logprobs(policy, ids, pixel_values, grids, rollout.kept_indices,
                                           len(rollout.completion_token_ids))
        (alone.sum() * weight).backward()  # gradients accumulate: the sum over rollouts
    summed = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    assert shared.keys() == summed.keys()
    assert any(name.startswith("model.visual") for name in shared)
    for name, gradient in shared.items():
        torch.testing.assert_close(gradient, summed[name], atol=1e-5, rtol=1e-4, msg=name)


def _step(model: torch.nn.Module, groups: list, pixels: PixelCache, **knobs: object) -> tuple[dict, dict]:
    policy, reference = copy.deepcopy(model), copy.deepcopy(model)
    reference.requires_grad_(False)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    config = StepConfig(loss=LossConfig(beta=0.04, normalization=knobs.pop("normalization", "token_mean")),
                        scorer=build_scorer("text_attention", 2), **knobs)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    metrics = grpo_step(policy, reference, optimizer, scheduler, groups, pixels, config)
    return metrics, {name: p.detach() - before[name] for name, p in policy.named_parameters()}


@pytest.mark.parametrize("normalization", ["token_mean", "group_token_mean"])
def test_batched_step_takes_the_per_rollout_step(recorded: tuple, normalization: str) -> None:
    model, groups, pixels = recorded
    reference_metrics, reference_update = _step(model, groups, pixels, forward="per_rollout", micro_batch_groups=3,
                                                kept_mass_weight=1.0, normalization=normalization, grad_clip=1e9)
    # 2 groups per vision pass and micro-batches of ~3 rows: micro-batches cut groups and images.
    metrics, update = _step(model, groups, pixels, micro_batch_groups=2, micro_batch_tokens=300,
                            kept_mass_weight=1.0, normalization=normalization, grad_clip=1e9)
    for name in ("loss", "policy_loss", "kl_penalty", "kept_mass_loss", "ratio_mean", "tokens", "rows"):
        assert metrics[name] == pytest.approx(reference_metrics[name], abs=1e-6), name
    assert metrics["grad_norm"] == pytest.approx(reference_metrics["grad_norm"], rel=1e-4)
    assert max(float(u.abs().max()) for u in update.values()) > 0
    for name, change in update.items():
        torch.testing.assert_close(change, reference_update[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def repeated_budgets(recorded: tuple) -> list:
    """Groups whose budgets repeat (dense three times, keep 0.5 twice): rollouts that share a pruned prompt."""
    model, _groups, _pixels = recorded
    budgets = [Budget(kind="keep_ratio", value=value) for value in (1.0, 0.5, 1.0, 0.25, 0.5, 1.0)]
    return record_groups(model, load_model_and_processor(MODEL)[1], load_dataset(TASKS)[:2], budgets)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_rows_give_each_rollouts_logprobs_and_gradients(
    recorded: tuple, repeated_budgets: list, attention: str
) -> None:
    model, _groups, pixels = recorded
    policy = copy.deepcopy(model)
    policy.model.language_model.config._attn_implementation = attention
    rows, pixel_values, grids = _rows_and_images(repeated_budgets, pixels)
    shared_plan = plan_batch(policy, rows, grids, share_prompts=True)
    assert shared_plan.input_ids.shape[0] == 6 and shared_plan.rows == 12  # 3 keep sets x 2 images
    assert shared_plan.padded_tokens < plan_batch(policy, rows, grids).padded_tokens / 1.5
    weights = torch.linspace(-1.0, 1.0, len(rows))[:, None]
    results = []
    for share in (False, True):
        policy.zero_grad()
        logprobs, mask = rows_completion_logprobs(policy, rows, pixel_values, grids, share_prompts=share)
        (logprobs * mask * weights).sum().backward()
        results.append((logprobs.detach(), mask, {n: p.grad.clone() for n, p in policy.named_parameters()
                                                    if p.grad is not None}))
    (alone, alone_mask, alone_grads), (shared, shared_mask, shared_grads) = results
    assert torch.equal(alone_mask, shared_mask)
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=0)
    assert shared_grads.keys() == alone_grads.keys()
    for name, gradient in shared_grads.items():
        torch.testing.assert_close(gradient, alone_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_shared_prompts_need_an_attention_that_takes_a_mask(recorded: tuple, repeated_budgets: list) -> None:
    model, _groups, pixels = recorded
    policy = copy.deepcopy(model)
    policy.model.language_model.config._attn_implementation = "flash_attention_2"
    rows, _pixel_values, grids = _rows_and_images(repeated_budgets, pixels)
    with pytest.raises(ValueError, match="eager or sdpa"):
        plan_batch(policy, rows, grids, share_prompts=True)
    assert plan_batch(policy, rows, grids).attention_mask is None


def test_a_step_over_shared_prompts_takes_the_per_rollout_step(recorded: tuple, repeated_budgets: list) -> None:
    model, _groups, pixels = recorded
    knobs = {"kept_mass_weight": 1.0, "grad_clip": 1e9}
    reference_metrics, reference_update = _step(model, repeated_budgets, pixels, forward="per_rollout", **knobs)
    dense = [r for r in repeated_budgets[0].rollouts if r.budget.value == 1.0]
    prompt = plan_batch(model, _rows_and_images(repeated_budgets[:1], pixels)[0][:1], pixels.get(
        repeated_budgets[0])[1]).lengths[0] - len(dense[0].completion_token_ids)
    # Room for a dense prompt and two completions: the third dense rollout goes to a part of its own.
    two_of_three = prompt + len(dense[0].completion_token_ids) + len(dense[1].completion_token_ids)
    for tokens in (16_384, two_of_three):
        metrics, update = _step(model, repeated_budgets, pixels, micro_batch_tokens=tokens, **knobs)
        for name in ("loss", "policy_loss", "kl_penalty", "kept_mass_loss", "tokens", "rows"):
            assert metrics[name] == pytest.approx(reference_metrics[name], abs=1e-6), name
        for name, change in update.items():
            torch.testing.assert_close(change, reference_update[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_vision_attention_matches_per_window_attention(recorded: tuple) -> None:
    model, groups, pixels = recorded
    packed = copy.deepcopy(model)
    assert use_packed_vision_attention(packed) == len(model.model.visual.blocks)
    rows, pixel_values, grids = _rows_and_images(groups, pixels)
    plain_lp, _ = rows_completion_logprobs(model, rows, pixel_values, grids)
    packed_lp, _ = rows_completion_logprobs(packed, rows, pixel_values, grids)
    torch.testing.assert_close(packed_lp, plain_lp, atol=1e-5, rtol=0)
    plain_lp.sum().backward()
    packed_lp.sum().backward()
    for (name, a), (_, b) in zip(model.model.visual.named_parameters(), packed.model.visual.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad(set_to_none=True)


def test_bf16_compute_over_fp32_master_weights_keeps_every_update(recorded: tuple) -> None:
    model, groups, pixels = recorded
    policy, reference = copy.deepcopy(model), copy.deepcopy(model).to(torch.bfloat16)
    reference.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    config = StepConfig(loss=LossConfig(beta=0.04), compute_dtype=torch.bfloat16)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    metrics = grpo_step(policy, reference, optimizer, scheduler, groups, pixels, config)
    assert metrics["skipped_nonfinite"] == 0.0
    changed = nonzero = 0
    for name, p in policy.named_parameters():
        assert p.dtype == torch.float32, name
        moved = p.detach() != before[name]
        nonzero_grad = optimizer.state[p]["exp_avg"] != 0 if p in optimizer.state else torch.zeros_like(moved)
        changed += int((moved & nonzero_grad).sum())
        nonzero += int(nonzero_grad.sum())
    assert nonzero > 0 and changed / nonzero >= 0.99
    # The same step with bf16 weights updated in place loses most of it: what the master copy is for.
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(bf16.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    weights_before = {name: p.detach().clone() for name, p in bf16.named_parameters()}
    grpo_step(bf16, reference, optimizer, scheduler, groups, pixels, StepConfig(loss=LossConfig(beta=0.04)))
    moved = sum(int((p.detach() != weights_before[name]).sum()) for name, p in bf16.named_parameters())
    assert moved / sum(p.numel() for p in bf16.parameters()) < 0.5


def test_kept_set_term_of_dense_groups_is_skipped_with_the_same_metrics(recorded: tuple) -> None:
    model, _groups, pixels = recorded
    items = load_dataset(TASKS)[:2]
    dense = record_groups(model, load_model_and_processor(MODEL)[1], items, [Budget(kind="keep_ratio", value=1.0)] * 4)
    metrics, update = _step(model, dense, pixels, kept_mass_weight=1.0, grad_clip=1e9)
    without, update_without = _step(model, dense, pixels, kept_mass_weight=0.0, grad_clip=1e9)
    assert metrics["kept_share"] == 1.0 and metrics["kept_mass_loss"] == 0.0
    assert metrics["loss"] == without["loss"] and metrics["grad_norm"] == without["grad_norm"]
    for name, change in update.items():
        torch.testing.assert_close(change, update_without[name], atol=0, rtol=0, msg=name)


def test_reference_passes_on_the_overlap_thread_give_the_same_step(recorded: tuple) -> None:
    model, groups, pixels = recorded
    reference = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # a reference unlike the policy, so the KL term and its gradient are not zero
        for parameter in reference.model.language_model.layers[-1].parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    results = {}
    for overlap in (False, True):
        policy = copy.deepcopy(model)
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
        config = StepConfig(loss=LossConfig(beta=0.04), micro_batch_groups=2, micro_batch_tokens=300,
                            grad_clip=1e9, reference_overlap=overlap)
        metrics = grpo_step(policy, reference, optimizer, scheduler, groups, pixels, config)
        results[overlap] = metrics, dict(policy.named_parameters())
    (plain, plain_params), (overlapped, overlapped_params) = results[False], results[True]
    assert plain["kl_penalty"] > 1e-6
    for name in ("loss", "policy_loss", "kl_penalty", "kl_mean", "grad_norm"):
        assert overlapped[name] == plain[name], name
    for name, parameter in plain_params.items():
        assert torch.equal(overlapped_params[name], parameter), name

"""Direct tests of the GRPO math in learner.algorithms: hand-computed cases, masks, gradients, invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.algorithms import (
    LossConfig,
    aggregate,
    clipped_surrogate,
    filter_stale,
    group_advantages,
    grpo_loss,
    k3_kl,
    kept_mass_loss,
    masked_mean,
    truncated_is_weights,
)

PLAIN = LossConfig(beta=0.0, tis_cap=None)  # only the clipped surrogate


# ---- staleness
def test_filter_stale_keeps_groups_within_the_bound() -> None:
    keep = filter_stale(torch.tensor([7, 6, 5, 4, 7]), learner_version=7, max_staleness=2)
    assert keep.tolist() == [True, True, True, False, True]


def test_filter_stale_zero_staleness_keeps_only_the_current_version() -> None:
    assert filter_stale(torch.tensor([3, 2]), learner_version=3, max_staleness=0).tolist() == [True, False]


def test_filter_stale_rejects_future_versions_and_negative_bounds() -> None:
    with pytest.raises(ValueError, match="ahead of learner 3"):
        filter_stale(torch.tensor([3, 4]), learner_version=3, max_staleness=1)
    with pytest.raises(ValueError, match="max_staleness"):
        filter_stale(torch.tensor([3]), learner_version=3, max_staleness=-1)


# ---- advantages
@pytest.mark.parametrize(
    "std, scale",
    [("unbiased", math.sqrt(1 / 3) + 1e-4), ("biased", 0.5 + 1e-4), ("none", 1.0)],
)
def test_group_advantages_hand_computed(std: str, scale: float) -> None:
    """Rewards [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3), population std 0.5."""
    result = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), std=std)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / scale
    torch.testing.assert_close(result.advantages, expected)
    assert result.zero_variance_groups == 0


def test_zero_variance_groups_are_counted_zeroed_and_optionally_dropped() -> None:
    # In float64 the mean of three 0.1s is not exactly 0.1, so without the explicit zeroing these rows
    # would get tiny non-zero advantages (~1e-13): "no gradient" must be exact.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 0.0, 0.5], [1.3, 1.3, 1.3]], dtype=torch.float64)
    kept = group_advantages(rewards)
    assert kept.zero_variance_groups == 2
    assert kept.advantages[:3].eq(0).all() and kept.advantages[6:].eq(0).all()
    # Middle group: centred [0.5, -0.5, 0], unbiased std 0.5.
    expected = torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64) / (0.5 + 1e-4)
    torch.testing.assert_close(kept.advantages[3:6], expected)
    assert kept.keep.all()
    dropped = group_advantages(rewards, drop_zero_variance=True)
    assert dropped.keep.tolist() == [False] * 3 + [True] * 3 + [False] * 3
    torch.testing.assert_close(dropped.advantages, kept.advantages)


def test_group_advantages_are_group_major_and_per_group() -> None:
    """Each group is normalised with its own statistics; row i belongs to group i // group_size."""
    rewards = torch.tensor([[0.0, 1.0], [10.0, 30.0]])
    result = group_advantages(rewards, std="biased", eps=0.0)
    torch.testing.assert_close(result.advantages, torch.tensor([-1.0, 1.0, -1.0, 1.0]))


def test_group_advantages_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="num_groups, group_size"):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="unknown std"):
        group_advantages(torch.zeros(1, 2), std="mad")


group_rewards = st.integers(1, 4).flatmap(
    lambda groups: st.integers(2, 6).flatmap(
        lambda size: st.lists(
            st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=size, max_size=size),
            min_size=groups,
            max_size=groups,
        )
    )
)


@settings(max_examples=40, deadline=None)
@given(group_rewards)
def test_advantages_sum_to_zero_per_group(rewards: list[list[float]]) -> None:
    tensor = torch.tensor(rewards, dtype=torch.float64)
    result = group_advantages(tensor)
    sums = result.advantages.reshape(tensor.shape).sum(dim=1)
    torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-9, rtol=0)


@settings(max_examples=40, deadline=None)
@given(group_rewards, st.floats(0.1, 10), st.floats(-3, 3))
def test_advantages_invariant_to_affine_reward_change(
    rewards: list[list[float]], scale: float, shift: float
) -> None:
    """With eps = 0, A depends only on ranks within the group's spread: A(a r + b) = A(r) for a > 0."""
    tensor = torch.tensor(rewards, dtype=torch.float64)
    spread = tensor.max(dim=1).values - tensor.min(dim=1).values
    tensor = tensor[spread > 1e-3]  # zero-variance groups are zeroed, tested above
    if tensor.numel() == 0:
        return
    base = group_advantages(tensor, eps=0.0).advantages
    moved = group_advantages(scale * tensor + shift, eps=0.0).advantages
    torch.testing.assert_close(moved, base, atol=1e-7, rtol=1e-7)


# ---- KL
def test_k3_is_zero_when_equal_and_positive_otherwise() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -0.3]])
    assert k3_kl(logprobs, logprobs).eq(0).all()
    assert (k3_kl(logprobs, logprobs + torch.tensor([[0.5, -0.5, 2.0]])) > 0).all()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-20, 0), st.floats(-20, 0)), min_size=1, max_size=10))
def test_k3_is_non_negative(pairs: list[tuple[float, float]]) -> None:
    logprobs, ref = torch.tensor(pairs, dtype=torch.float64).T
    assert (k3_kl(logprobs, ref) >= 0).all()


def test_k3_expectation_under_pi_is_the_exact_kl() -> None:
    """Sum_x p(x) k3(x) = KL(p || q) exactly over the full support (why k3 is unbiased, Schulman 2020)."""
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    expectation = (p * k3_kl(p.log(), q.log())).sum()
    torch.testing.assert_close(expectation, (p * (p / q).log()).sum())


# ---- clipped surrogate
def _surrogate_at(ratio: float, advantage: float, **clip: float) -> tuple[torch.Tensor, torch.Tensor, object]:
    logprobs = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    result = clipped_surrogate(
        logprobs,
        torch.zeros(1, 1, dtype=torch.float64),
        torch.tensor([advantage], dtype=torch.float64),
        **{"clip_eps_low": 0.2, "clip_eps_high": 0.2, **clip},
    )
    result.loss.sum().backward()
    return result.loss.detach().squeeze(), logprobs.grad.squeeze(), result


@pytest.mark.parametrize(
    "ratio, advantage, loss, clipped, flag",
    [
        (1.5, 1.0, -1.2, True, "clipped_high"),  # gain capped at 1 + eps
        (0.5, 1.0, -0.5, False, None),  # below the trust region with A > 0: unclipped, keeps pushing up
        (0.5, -1.0, 0.8, True, "clipped_low"),  # A < 0 and already pushed down past 1 - eps
        (1.5, -1.0, 1.5, False, None),  # A < 0 and ratio grew: unclipped, pulls it back
    ],
)
def test_clipped_surrogate_hand_cases(
    ratio: float, advantage: float, loss: float, clipped: bool, flag: str
) -> None:
    value, grad, result = _surrogate_at(ratio, advantage)
    assert float(value) == pytest.approx(loss)
    # d(-r A)/d logp = -r A where unclipped; exactly 0 where the clip is active.
    assert float(grad) == (0.0 if clipped else pytest.approx(-ratio * advantage))
    for name in ("clipped_low", "clipped_high"):
        assert bool(getattr(result, name)) == (name == flag)


def test_asymmetric_clip_uses_eps_high_for_positive_advantages() -> None:
    value, grad, _ = _surrogate_at(1.25, 1.0, clip_eps_high=0.28)
    assert float(value) == pytest.approx(-1.25) and float(grad) != 0  # inside [0.8, 1.28]
    value, grad, _ = _surrogate_at(1.3, 1.0, clip_eps_high=0.28)
    assert float(value) == pytest.approx(-1.28) and float(grad) == 0


@pytest.mark.parametrize(
    "ratio, advantage, loss, dual",
    [
        (5.0, -1.0, 3.0, True),  # A < 0, ratio past c: loss capped at c * |A|, no gradient
        (2.0, -1.0, 2.0, False),  # A < 0, ratio under c: plain PPO
        (5.0, 1.0, -1.2, False),  # A > 0: dual-clip never applies
        (5.0, -2.0, 6.0, True),  # the cap scales with |A|
    ],
)
def test_dual_clip(ratio: float, advantage: float, loss: float, dual: bool) -> None:
    value, grad, result = _surrogate_at(ratio, advantage, dual_clip_c=3.0)
    assert float(value) == pytest.approx(loss)
    assert bool(result.dual_clipped) == dual
    if dual:
        assert float(grad) == 0
    no_dual, _, _ = _surrogate_at(ratio, advantage)
    assert (float(no_dual) > float(value)) == dual


# ---- aggregation
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [2.0, 2.0, 0.0], [6.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    "normalization, expected",
    [
        ("token_mean", 20 / 7),  # sum of valid / number of valid
        ("sequence_mean", (2.0 + 4.0 + 2.0 + 6.0) / 4),  # per-row means, then their mean
        ("group_token_mean", (10 / 4 + 10 / 3) / 2),  # groups of 2 rows: per-group token means, then mean
        ("sum_over_max_len", 20 / (4 * 5)),  # constant normaliser batch * max_completion_len
    ],
)
def test_aggregate_hand_computed(normalization: str, expected: float) -> None:
    value = aggregate(PER_TOKEN, MASK, normalization, group_size=2, max_completion_len=5)
    assert float(value) == pytest.approx(expected)


def test_aggregate_ignores_padding_values_and_handles_empty_masks() -> None:
    poisoned = PER_TOKEN.masked_fill(~MASK, float("nan"))
    for normalization in ("token_mean", "sequence_mean", "group_token_mean", "sum_over_max_len"):
        value = aggregate(poisoned, MASK, normalization, group_size=2, max_completion_len=5)
        assert torch.isfinite(value)
        empty = aggregate(poisoned, torch.zeros_like(MASK), normalization, group_size=2, max_completion_len=5)
        assert float(empty) == 0.0


def test_token_mean_with_total_tokens_makes_micro_batches_add_up() -> None:
    """Gradient accumulation: micro-batch losses normalised by the step's token count sum to the full loss."""
    full = aggregate(PER_TOKEN, MASK, "token_mean")
    total = float(MASK.sum())
    halves = sum(
        aggregate(PER_TOKEN[i : i + 2], MASK[i : i + 2], "token_mean", total_tokens=total) for i in (0, 2)
    )
    torch.testing.assert_close(halves, full)


def test_aggregate_rejects_missing_settings() -> None:
    with pytest.raises(ValueError, match="group_size"):
        aggregate(PER_TOKEN, MASK, "group_token_mean", group_size=3)
    with pytest.raises(ValueError, match="max_completion_len"):
        aggregate(PER_TOKEN, MASK, "sum_over_max_len")
    with pytest.raises(ValueError, match="unknown normalization"):
        aggregate(PER_TOKEN, MASK, "per_token")


def test_masked_mean_counts_only_masked_entries() -> None:
    assert float(masked_mean(torch.tensor([1.0, 100.0, 3.0]), torch.tensor([1, 0, 1]))) == 2.0


# ---- the loss
def _batch(seed: int = 0, batch: int = 4, length: int = 5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=generator, dtype=torch.float64) * 3 - 0.1
    return {
        "logprobs": (old + 0.3 * torch.randn(batch, length, generator=generator, dtype=torch.float64)),
        "old_logprobs": old,
        "advantages": torch.randn(batch, generator=generator, dtype=torch.float64),
        "mask": torch.rand(batch, length, generator=generator) > 0.3,
        "ref_logprobs": old + 0.2 * torch.randn(batch, length, generator=generator, dtype=torch.float64),
        "rollout_logprobs": old + 0.4 * torch.randn(batch, length, generator=generator, dtype=torch.float64),
    }


def test_on_policy_loss_and_gradient_hand_computed() -> None:
    """Ratio 1, beta 0: loss = -sum_valid A / N_valid, d loss / d logp = -A / N_valid on valid tokens."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    advantages = torch.tensor([1.0, -2.0])
    result = grpo_loss(logprobs, logprobs.detach(), advantages, mask, PLAIN)
    assert float(result.loss.detach()) == pytest.approx(-(1 + 1 - 2) / 3)
    result.loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 3, -1 / 3, 0.0], [2 / 3, 0.0, 0.0]]))
    assert (
        float(result.ratio_mean) == 1.0 and float(result.clip_frac_low) == 0.0 and int(result.num_tokens) == 3
    )


def test_zero_advantage_rows_add_no_policy_gradient() -> None:
    inputs = _batch()
    inputs["advantages"][:2] = 0.0
    logprobs = inputs["old_logprobs"].clone().requires_grad_(True)  # on-policy: no clip cuts the gradient
    grpo_loss(logprobs, inputs["old_logprobs"], inputs["advantages"], inputs["mask"], PLAIN).loss.backward()
    assert logprobs.grad[:2].eq(0).all()
    assert logprobs.grad[2:][inputs["mask"][2:]].abs().min() > 0


@pytest.mark.parametrize("kl_ratio_weighted", [True, False])
def test_kl_term_value_and_gradient(kl_ratio_weighted: bool) -> None:
    """A = 0, on-policy: KL grad is beta*(logp - ref) if ratio-weighted, else beta*(1 - e^(ref - logp))."""
    mask = torch.ones(1, 2, dtype=torch.bool)
    logprobs = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    config = LossConfig(beta=0.5, tis_cap=None, kl_ratio_weighted=kl_ratio_weighted)
    result = grpo_loss(
        logprobs, logprobs.detach(), torch.zeros(1, dtype=torch.float64), mask, config, ref_logprobs=ref
    )
    result.loss.backward()
    d = ref - logprobs.detach()
    torch.testing.assert_close(result.kl_penalty, (d.exp() - d - 1).mean())
    assert float(result.loss.detach()) == pytest.approx(0.5 * float(result.kl_penalty))
    expected = -d if kl_ratio_weighted else 1 - d.exp()
    torch.testing.assert_close(logprobs.grad, 0.5 * expected / 2)


def test_kl_is_zero_when_policy_equals_reference() -> None:
    inputs = _batch()
    result = grpo_loss(**{**inputs, "ref_logprobs": inputs["logprobs"]}, config=LossConfig(tis_cap=None))
    assert float(result.kl_penalty) == 0.0 and float(result.kl_mean) == 0.0


def test_loss_is_the_sum_of_its_parts() -> None:
    for normalization in ("token_mean", "sequence_mean", "group_token_mean"):
        config = LossConfig(beta=0.3, normalization=normalization)
        result = grpo_loss(**_batch(), config=config, group_size=2)
        torch.testing.assert_close(result.loss.detach(), result.policy_loss + 0.3 * result.kl_penalty)


def test_tis_weight_is_one_when_rollout_matches_trainer() -> None:
    inputs = _batch()
    with_tis = grpo_loss(**{**inputs, "rollout_logprobs": inputs["old_logprobs"]}, config=LossConfig())
    without = grpo_loss(**{**inputs, "rollout_logprobs": None}, config=LossConfig())
    torch.testing.assert_close(with_tis.loss, without.loss)
    assert float(with_tis.logprob_diff_mean) == 0.0 and float(with_tis.is_ratio_max) == 1.0
    assert without.is_ratio_mean is None


def test_tis_truncates_large_weights_at_the_cap() -> None:
    """Trainer log-probs log(5) above the rollout's: raw ratio 5, weight min(5, 2) = 2 doubles the loss."""
    inputs = _batch()
    rollout = inputs["old_logprobs"] - math.log(5.0)
    base = grpo_loss(**{**inputs, "rollout_logprobs": None}, config=LossConfig(beta=0.0))
    tis = grpo_loss(**{**inputs, "rollout_logprobs": rollout}, config=LossConfig(beta=0.0, tis_cap=2.0))
    torch.testing.assert_close(tis.policy_loss, 2.0 * base.policy_loss)
    assert float(tis.is_ratio_max) == pytest.approx(5.0) and float(tis.is_truncated_frac) == 1.0
    assert float(tis.logprob_diff_max) == pytest.approx(math.log(5.0))
    no_cap = grpo_loss(**{**inputs, "rollout_logprobs": rollout}, config=LossConfig(beta=0.0, tis_cap=None))
    torch.testing.assert_close(no_cap.loss, base.loss)  # metrics only, no reweighting
    assert no_cap.is_truncated_frac is None and float(no_cap.is_ratio_min) == pytest.approx(5.0)


def test_truncated_is_weights_are_detached_and_capped() -> None:
    old = torch.tensor([[0.0, 0.0]], requires_grad=True)
    weights = truncated_is_weights(old, torch.tensor([[0.5, -2.0]]), cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[math.exp(-0.5), 2.0]]))
    assert not weights.requires_grad


def test_gradcheck_against_finite_differences() -> None:
    inputs = _batch(seed=3)
    config = LossConfig(beta=0.1, dual_clip_c=2.0, clip_eps_high=0.28, normalization="sequence_mean")
    rest = {k: v for k, v in inputs.items() if k != "logprobs"}
    logprobs = inputs["logprobs"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: grpo_loss(lp, config=config, **rest).loss, (logprobs,))


@pytest.mark.parametrize(
    "normalization", ["token_mean", "sequence_mean", "group_token_mean", "sum_over_max_len"]
)
def test_padding_never_contributes_even_when_poisoned(normalization: str) -> None:
    """NaN/inf in padded positions change neither the loss, its parts nor the gradient (zero there)."""
    inputs = _batch(seed=5)
    mask = inputs["mask"]
    config = LossConfig(normalization=normalization, beta=0.2, max_completion_len=8, dual_clip_c=3.0)
    clean_logprobs = inputs["logprobs"].clone().requires_grad_(True)
    clean = grpo_loss(**{**inputs, "logprobs": clean_logprobs}, config=config, group_size=2)
    clean.loss.backward()
    poisoned = {
        k: v.masked_fill(~mask, bad)
        for (k, v), bad in zip(
            [(k, inputs[k]) for k in ("logprobs", "old_logprobs", "ref_logprobs", "rollout_logprobs")],
            (float("nan"), float("inf"), float("-inf"), float("nan")),
        )
    }
    dirty_logprobs = poisoned.pop("logprobs").requires_grad_(True)
    dirty = grpo_loss(
        dirty_logprobs, advantages=inputs["advantages"], mask=mask, config=config, group_size=2, **poisoned
    )
    dirty.loss.backward()
    for name in (
        "loss",
        "policy_loss",
        "kl_penalty",
        "kl_mean",
        "clip_frac_high",
        "is_ratio_max",
        "logprob_diff_max",
    ):
        torch.testing.assert_close(getattr(dirty, name).detach(), getattr(clean, name).detach(), msg=name)
    torch.testing.assert_close(dirty_logprobs.grad, clean_logprobs.grad)
    assert dirty_logprobs.grad[~mask].eq(0).all()


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 6),
    st.integers(0, 3),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["token_mean", "sequence_mean", "sum_over_max_len"]),
)
def test_extra_padding_columns_do_not_change_the_loss(
    batch: int, length: int, extra: int, seed: int, normalization: str
) -> None:
    """Right-padding the completion axis leaves loss, metrics and gradients unchanged."""
    inputs = _batch(seed=seed, batch=batch, length=length)
    config = LossConfig(normalization=normalization, max_completion_len=16, dual_clip_c=3.0)
    padded = {
        k: torch.cat([v, torch.zeros(batch, extra, dtype=v.dtype)], dim=1) if v.dim() == 2 else v
        for k, v in inputs.items()
    }
    base_lp = inputs["logprobs"].clone().requires_grad_(True)
    padded_lp = padded["logprobs"].clone().requires_grad_(True)
    base = grpo_loss(**{**inputs, "logprobs": base_lp}, config=config)
    more = grpo_loss(**{**padded, "logprobs": padded_lp}, config=config)
    base.loss.backward()
    more.loss.backward()
    torch.testing.assert_close(more.loss, base.loss)
    torch.testing.assert_close(more.clip_frac_low, base.clip_frac_low)
    torch.testing.assert_close(padded_lp.grad[:, :length], base_lp.grad)
    assert int(more.num_tokens) == int(inputs["mask"].sum())


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_row_permutation_invariance(seed: int) -> None:
    """Every normalization but group_token_mean treats rows symmetrically: shuffling rows keeps the loss."""
    inputs = _batch(seed=seed, batch=6)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(seed))
    shuffled = {k: v[order] for k, v in inputs.items()}
    for normalization in ("token_mean", "sequence_mean"):
        config = LossConfig(normalization=normalization)
        torch.testing.assert_close(
            grpo_loss(**shuffled, config=config).loss, grpo_loss(**inputs, config=config).loss
        )


def test_grpo_loss_rejects_bad_inputs() -> None:
    inputs = _batch()
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        grpo_loss(**{**inputs, "ref_logprobs": None}, config=LossConfig(beta=0.1))
    with pytest.raises(ValueError, match="shape mismatch"):
        grpo_loss(**{**inputs, "advantages": inputs["advantages"][:2]})


@pytest.mark.parametrize(
    "bad",
    [
        {"dual_clip_c": 1.0},
        {"beta": -0.1},
        {"clip_eps_low": 1.0},
        {"clip_eps_high": -0.1},
        {"normalization": "per_token"},
        {"tis_cap": 0.0},
    ],
)
def test_loss_config_validates(bad: dict) -> None:
    with pytest.raises(ValueError):
        LossConfig(**bad)


# ---- the kept-set term
def test_kept_mass_loss_hand_computed() -> None:
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0])  # shares 0.4, 0.3, 0.2, 0.1
    masks = torch.tensor([[True, False, False, False], [True, True, True, False]])
    loss, kept_share = kept_mass_loss(scores, masks, torch.tensor([2.0, -1.0]))
    # Only the positive advantage counts: -(2 * log 0.4 + 0 * log 0.9) / 2.
    assert float(loss) == pytest.approx(-math.log(0.4))
    assert float(kept_share) == pytest.approx((0.4 + 0.9) / 2)


def test_kept_mass_gradient_moves_score_into_the_rewarded_set() -> None:
    logits = torch.zeros(6, requires_grad=True)
    masks = torch.tensor([[True, True, False, False, False, False], [True, True, True, True, True, False]])
    loss, _ = kept_mass_loss(logits.softmax(0), masks, torch.tensor([1.0, -1.0]))
    loss.backward()
    # Descent raises the kept tokens of the above-average rollout and lowers every other token.
    assert bool((logits.grad[:2] < 0).all()) and bool((logits.grad[2:] > 0).all())


def test_kept_mass_loss_is_zero_without_positive_advantages() -> None:
    scores = torch.rand(8, requires_grad=True)
    masks = torch.ones(3, 8, dtype=torch.bool)
    loss, _ = kept_mass_loss(scores, masks, torch.tensor([0.0, -0.5, -2.0]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((scores.grad == 0).all())


def test_kept_mass_loss_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        kept_mass_loss(torch.rand(4), torch.ones(2, 5, dtype=torch.bool), torch.zeros(2))
    with pytest.raises(ValueError, match="advantages"):
        kept_mass_loss(torch.rand(4), torch.ones(2, 4, dtype=torch.bool), torch.zeros(3))
    with pytest.raises(ValueError, match="at least one visual token"):
        kept_mass_loss(torch.rand(4), torch.zeros(2, 4, dtype=torch.bool), torch.zeros(2))

"""The GRPO update as pure tensor functions: advantages -> ratio -> clip -> IS correction -> KL -> loss.

Read top to bottom (cleanrl's ppo.py style). No I/O, no model code, no global state: the trainer computes
log-probs with the model and calls `group_advantages`, `filter_stale` and `grpo_loss`.

Shape names: `num_groups` prompts, each with `group_size` rollouts; `batch = num_groups * group_size` rows,
group-major (row i belongs to group i // group_size); `completion_len` = padded completion width.
Masks are (batch, completion_len), bool or 0/1 float; padded positions never contribute, even if they hold
NaN or inf (every token tensor is zeroed outside the mask before any arithmetic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple

import torch
from torch import Tensor

StdKind = Literal["unbiased", "biased", "none"]
Normalization = Literal["token_mean", "sequence_mean", "group_token_mean", "sum_over_max_len"]
NORMALIZATIONS: tuple[str, ...] = ("token_mean", "sequence_mean", "group_token_mean", "sum_over_max_len")

# torch.isclose(std, 0)'s default tolerance, which TRL uses to count zero-std groups (frac_reward_zero_std).
ZERO_STD_ATOL = 1e-8


# ---- staleness
def filter_stale(group_versions: Tensor, learner_version: int, max_staleness: int) -> Tensor:
    """Keep mask (num_groups,) bool: True where learner_version - group_versions <= max_staleness."""
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
    lag = learner_version - group_versions.long()
    if bool((lag < 0).any()):
        # A rollout from a version the learner has not published yet means a version bookkeeping bug upstream.
        raise ValueError(f"group version {int(group_versions.max())} is ahead of learner {learner_version}")
    return lag <= max_staleness


# ---- advantages
class GroupAdvantages(NamedTuple):
    """Per-rollout advantages plus the zero-variance bookkeeping."""

    advantages: Tensor  # (batch,) float, group-major
    keep: Tensor  # (batch,) bool; False only for rows of zero-variance groups when dropping is on
    zero_variance_groups: int  # groups whose rewards are all equal: they carry no learning signal


def group_advantages(
    rewards: Tensor, *, std: StdKind = "unbiased", eps: float = 1e-4, drop_zero_variance: bool = False
) -> GroupAdvantages:
    """A_i = (r_i - mean(r)) / (std(r) + eps) within each group; rewards: (num_groups, group_size).

    std: "unbiased" (Bessel-corrected, torch.std's default; what TRL and verl use, so our numbers compare
    directly with theirs; for a fixed group size it differs from "biased" only by the constant factor
    sqrt(G/(G-1)), i.e. a learning-rate rescale), "biased" (population std), or "none" (centre only, no
    scaling: Dr. GRPO, Liu et al. 2025, which argues the std division over-weights near-uniform groups).
    eps: 1e-4 as in TRL. Zero-variance groups get exactly zero advantage (so no policy gradient) and are
    counted; with drop_zero_variance their rows are also marked keep=False so the trainer can skip them.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (num_groups, group_size), got shape {tuple(rewards.shape)}")
    if std not in ("unbiased", "biased", "none"):
        raise ValueError(f"unknown std kind {std!r}")
    if rewards.shape[1] < 2:
        raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {rewards.shape[1]}")
    rewards = rewards.float() if not rewards.is_floating_point() else rewards
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    group_std = rewards.std(dim=1, keepdim=True, correction=0 if std == "biased" else 1)
    advantages = centered if std == "none" else centered / (group_std + eps)
    zero_variance = group_std.squeeze(1) <= ZERO_STD_ATOL  # (num_groups,)
    advantages = torch.where(zero_variance[:, None], torch.zeros_like(advantages), advantages)
    keep = ~zero_variance if drop_zero_variance else torch.ones_like(zero_variance)
    group_size = rewards.shape[1]
    return GroupAdvantages(
        advantages=advantages.reshape(-1),
        keep=keep.repeat_interleave(group_size),
        zero_variance_groups=int(zero_variance.sum()),
    )


# ---- per-token terms
def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): e^d - d - 1, d = ref - logp; (batch, len)."""
    # k3 (Schulman 2020, "Approximating KL divergence"): unbiased under samples from pi, always >= 0,
    # exactly 0 where pi == pi_ref, and lower variance than log(pi/pi_ref).
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def truncated_is_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, cap: float) -> Tensor:
    """Token-level truncated importance weights min(pi_trainer / pi_rollout, cap), detached; (batch, len)."""
    # TIS (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training", as in
    # verl): the rollout engine's sampler differs numerically from the trainer, so reweight each token by
    # the ratio of the two, truncated at `cap` to bound the variance. A weight, not a gradient path.
    return torch.exp(old_logprobs - rollout_logprobs).clamp(max=cap).detach()


class ClippedSurrogate(NamedTuple):
    """Per-token clipped policy loss and the masks that say which clip was active."""

    loss: Tensor  # (batch, len), to be minimised
    ratio: Tensor  # (batch, len), pi / pi_old
    clipped_low: Tensor  # (batch, len) bool: ratio < 1 - eps_low with A < 0 (gradient cut)
    clipped_high: Tensor  # (batch, len) bool: ratio > 1 + eps_high with A > 0 (gradient cut)
    dual_clipped: Tensor  # (batch, len) bool: ratio > dual_clip_c with A < 0 (loss capped at c * |A|)


def clipped_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, *, clip_eps_low: float, clip_eps_high: float,
    dual_clip_c: float | None = None,
) -> ClippedSurrogate:
    """PPO clipped objective per token, -min(r A, clip(r, 1-eps_low, 1+eps_high) A); advantages: (batch,)."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None].to(ratio.dtype)
    clipped_ratio = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    negative = adv < 0
    dual_clipped = torch.zeros_like(negative.expand_as(ratio))
    if dual_clip_c is not None:
        # Dual-clip PPO (Ye et al. 2020): with A < 0 the clipped loss -A*r is unbounded as r grows; cap it
        # at -A*c so one very off-policy token cannot dominate the batch.
        cap = -adv * dual_clip_c
        dual_clipped = negative & (loss > cap)
        loss = torch.where(negative, torch.min(loss, cap), loss)
    clipped_low = (ratio < 1.0 - clip_eps_low) & negative
    clipped_high = (ratio > 1.0 + clip_eps_high) & (adv > 0)
    return ClippedSurrogate(loss, ratio, clipped_low, clipped_high, dual_clipped)


# ---- reduction
def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values over mask == True (0 if the mask is empty); any shape, scalar out."""
    mask = mask.bool()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def row_token_weights(
    lengths: Tensor, group_index: Tensor, normalization: Normalization, *, max_completion_len: int | None = None,
) -> Tensor:
    """Per-row weight of each valid token so that sum(weight * per_token) is `aggregate` over the whole batch.

    lengths: (rows,) valid completion tokens per row; group_index: (rows,) the group each row belongs to. With
    these weights a batch can be cut into micro-batches of any rows (not whole groups) and the micro-batch
    losses still add up to the batch's loss exactly. Returns (rows,) float32.
    """
    lengths = lengths.to(torch.float32)
    rows = max(int(lengths.numel()), 1)
    if normalization == "token_mean":
        return torch.full_like(lengths, 1.0) / lengths.sum().clamp(min=1)
    if normalization == "sequence_mean":
        return 1.0 / (lengths.clamp(min=1) * rows)
    if normalization == "group_token_mean":
        groups, inverse = torch.unique(group_index, return_inverse=True)
        group_tokens = torch.zeros(len(groups)).index_add_(0, inverse, lengths)
        return 1.0 / (group_tokens[inverse].clamp(min=1) * len(groups))
    if normalization == "sum_over_max_len":
        if max_completion_len is None or max_completion_len < 1:
            raise ValueError(f"sum_over_max_len needs max_completion_len >= 1, got {max_completion_len}")
        return torch.full_like(lengths, 1.0 / (rows * max_completion_len))
    raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")


def aggregate(
    per_token: Tensor, mask: Tensor, normalization: Normalization, *, group_size: int | None = None,
    max_completion_len: int | None = None, total_tokens: float | None = None, row_weights: Tensor | None = None,
) -> Tensor:
    """Reduce a (batch, len) per-token loss to a scalar; `normalization` names the averaging (see below).

    "token_mean": sum over every valid token / number of valid tokens (DAPO, Yu et al. 2025; TRL "dapo" and
        "bnpo"). Each token weighs the same, so long completions are not down-weighted. `total_tokens`
        overrides the count, for micro-batches of one optimiser step (TRL's num_items_in_batch).
    "sequence_mean": mean over tokens within each sequence, then over sequences (GRPO paper, Shao et al. 2024;
        TRL "grpo"). Each rollout weighs the same; tokens of short rollouts weigh more.
    "group_token_mean": token mean within each group of `group_size` rows, then mean over groups. Each
        prompt weighs the same, whatever the lengths of its rollouts.
    "sum_over_max_len": sum over valid tokens / (batch * max_completion_len), a constant (Dr. GRPO, Liu et
        al. 2025; TRL "dr_grpo"). No length-dependent weighting at all.
    row_weights: (batch,) per-token weight of each row from `row_token_weights`, computed over the whole
        step; when given it replaces the normalization (the rows may be any slice of the step).
    """
    mask = mask.bool()
    masked = torch.where(mask, per_token, 0.0)
    if row_weights is not None:
        return (masked * row_weights.to(masked.dtype)[:, None]).sum()
    if normalization == "token_mean":
        count = mask.sum() if total_tokens is None else torch.as_tensor(total_tokens, dtype=per_token.dtype)
        return masked.sum() / count.clamp(min=1)
    if normalization == "sequence_mean":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if normalization == "group_token_mean":
        if group_size is None or group_size < 1 or per_token.shape[0] % group_size:
            raise ValueError(f"group_token_mean: group_size {group_size} must divide {per_token.shape[0]}")
        group_sums = masked.sum(dim=1).reshape(-1, group_size).sum(dim=1)
        group_counts = mask.sum(dim=1).reshape(-1, group_size).sum(dim=1)
        return (group_sums / group_counts.clamp(min=1)).mean()
    if normalization == "sum_over_max_len":
        if max_completion_len is None or max_completion_len < 1:
            raise ValueError(f"sum_over_max_len needs max_completion_len >= 1, got {max_completion_len}")
        return masked.sum() / (per_token.shape[0] * max_completion_len)
    raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")


# ---- the kept-set term (sparsity forcing through the selection)
def kept_mass_loss(scores: Tensor, kept_masks: Tensor, advantages: Tensor) -> tuple[Tensor, Tensor]:
    """-mean_i max(A_i, 0) * log(share of the scores on rollout i's kept set), and the mean kept share.

    scores: (N,) non-negative visual-token scores of one prompt, with grad (the scorer run on the current
    policy); kept_masks: (G, N) bool, each rollout's kept tokens; advantages: (G,).
    The keep set is chosen by a non-differentiable top-k / top-mass rule, so the policy loss alone never
    teaches the scorer's attention to concentrate. This term treats the keep set as part of the action:
    raising the mass of an above-average rollout's kept set makes the same tau keep fewer tokens next time.
    Only positive advantages count: a group's keep sets are nested (one ranking, several budgets), and
    pushing mass out of a below-average rollout's larger set would push it into the least important tokens.
    """
    if scores.dim() != 1 or kept_masks.dim() != 2 or kept_masks.shape[1] != scores.shape[0]:
        raise ValueError(f"shape mismatch: scores {tuple(scores.shape)}, kept_masks {tuple(kept_masks.shape)}")
    if advantages.shape != kept_masks.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} do not match kept_masks {tuple(kept_masks.shape)}")
    if not bool(kept_masks.any(dim=1).all()):
        raise ValueError("every rollout must keep at least one visual token")
    shares = scores.float() / scores.float().sum().clamp(min=torch.finfo(torch.float32).tiny)
    kept_share = (shares[None, :] * kept_masks.float()).sum(dim=1)
    weights = advantages.detach().float().clamp(min=0.0)
    loss = -(weights * torch.log(kept_share.clamp(min=torch.finfo(torch.float32).tiny))).mean()
    return loss, kept_share.detach().mean()


# ---- the loss
@dataclass(frozen=True)
class LossConfig:
    """Knobs of the GRPO loss; each default's source is in its comment."""

    clip_eps_low: float = 0.2  # PPO's epsilon (Schulman et al. 2017)
    clip_eps_high: float = 0.2  # set 0.28 for DAPO's clip-higher
    dual_clip_c: float | None = None  # e.g. 3.0 (Ye et al. 2020); None disables dual-clip
    beta: float = 0.04  # KL coefficient (DeepSeekMath / GRPO paper); 0 disables the KL term
    kl_ratio_weighted: bool = True  # k3 * (pi / pi_old): unbiased KL gradient off-policy (TRL's default)
    normalization: Normalization = "token_mean"  # TRL's default ("dapo"); no per-sequence length bias
    tis_cap: float | None = 2.0  # truncation of the rollout/trainer IS weight; None disables TIS
    max_completion_len: int | None = None  # generation cap; required by "sum_over_max_len"

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_eps_low < 1.0 or self.clip_eps_high < 0.0:
            raise ValueError(f"clip eps out of range: low {self.clip_eps_low}, high {self.clip_eps_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {self.dual_clip_c}")
        if self.beta < 0.0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; one of {NORMALIZATIONS}")
        if self.tis_cap is not None and self.tis_cap <= 0.0:
            raise ValueError(f"tis_cap must be > 0, got {self.tis_cap}")


class LossResult(NamedTuple):
    """Scalar loss (with grad), its detached parts and diagnostics; loss = policy_loss + beta * kl_penalty."""

    loss: Tensor
    policy_loss: Tensor  # aggregated clipped surrogate (IS-weighted when TIS is on)
    kl_penalty: Tensor  # aggregated k3 KL with the same normalization (0 when beta == 0 or no reference)
    kl_mean: Tensor  # token mean of the KL term over valid tokens, comparable across normalizations
    ratio_mean: Tensor  # token mean of pi / pi_old
    clip_frac_low: Tensor  # fraction of valid tokens with the low clip active
    clip_frac_high: Tensor  # fraction of valid tokens with the high clip active
    dual_clip_frac: Tensor  # fraction of valid tokens capped by dual-clip
    num_tokens: Tensor  # valid tokens in the batch
    # Rollout/trainer mismatch; None unless rollout_logprobs were given.
    logprob_diff_mean: Tensor | None = None  # mean |logp_old - logp_rollout| over valid tokens
    logprob_diff_max: Tensor | None = None
    is_ratio_mean: Tensor | None = None  # raw (untruncated) exp(logp_old - logp_rollout) stats
    is_ratio_min: Tensor | None = None
    is_ratio_max: Tensor | None = None
    is_truncated_frac: Tensor | None = None  # fraction of valid tokens whose IS weight hit tis_cap


def rollout_mismatch(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Trainer-vs-rollout-engine mismatch on valid tokens: |logp diff| mean/max, raw IS ratio mean/min/max."""
    mask = mask.bool()
    diff = torch.where(mask, old_logprobs - rollout_logprobs, 0.0)
    ratio = diff.exp()
    empty = not bool(mask.any())
    return {
        "logprob_diff_mean": masked_mean(diff.abs(), mask),
        "logprob_diff_max": diff.abs().max(),
        "is_ratio_mean": masked_mean(ratio, mask),
        "is_ratio_min": ratio.new_ones(()) if empty else torch.where(mask, ratio, math.inf).min(),
        "is_ratio_max": ratio.new_ones(()) if empty else torch.where(mask, ratio, -math.inf).max(),
    }


def grpo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
    config: LossConfig = LossConfig(), *, ref_logprobs: Tensor | None = None,
    rollout_logprobs: Tensor | None = None, group_size: int | None = None, total_tokens: float | None = None,
    row_weights: Tensor | None = None,
) -> LossResult:
    """aggregate(TIS * clipped surrogate + beta * k3 KL); token tensors (batch, len), advantages (batch,).

    logprobs: the trainer's log-probs of the sampled tokens, with grad. old_logprobs: the policy the PPO ratio
    is taken against, no grad: the trainer's own recompute before the first update on this batch when there
    is one (TRL/verl), else the rollout engine's log-probs. rollout_logprobs: the engine's log-probs; given
    together with config.tis_cap, each token is reweighted by min(exp(old - rollout), tis_cap).
    ref_logprobs: the frozen reference's log-probs, needed when beta > 0. row_weights: (batch,) from
    `row_token_weights`, for a micro-batch of a larger step (see `aggregate`).
    """
    mask = mask.bool()
    if logprobs.shape != mask.shape or old_logprobs.shape != mask.shape or advantages.shape != mask.shape[:1]:
        raise ValueError(
            f"shape mismatch: logprobs {tuple(logprobs.shape)}, old {tuple(old_logprobs.shape)}, "
            f"mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)}"
        )
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Zero the padding first: NaN/inf there would otherwise leak into values (0 * inf) and gradients.
    logprobs = torch.where(mask, logprobs, zero)
    old_logprobs = torch.where(mask, old_logprobs.detach(), zero)

    surrogate = clipped_surrogate(
        logprobs, old_logprobs, advantages, clip_eps_low=config.clip_eps_low,
        clip_eps_high=config.clip_eps_high, dual_clip_c=config.dual_clip_c,
    )
    per_token_policy = surrogate.loss
    mismatch: dict[str, Tensor] = {}
    if rollout_logprobs is not None:
        rollout_logprobs = torch.where(mask, rollout_logprobs.detach(), zero)
        mismatch = rollout_mismatch(old_logprobs, rollout_logprobs, mask)
        if config.tis_cap is not None:
            weights = truncated_is_weights(old_logprobs, rollout_logprobs, config.tis_cap)
            per_token_policy = per_token_policy * weights
            mismatch["is_truncated_frac"] = masked_mean((weights >= config.tis_cap).float(), mask)

    reduce = partial(
        aggregate, mask=mask, normalization=config.normalization, group_size=group_size,
        max_completion_len=config.max_completion_len, total_tokens=total_tokens, row_weights=row_weights,
    )
    policy_loss = reduce(per_token_policy)
    kl_penalty, kl_mean = zero, zero
    if config.beta > 0.0:
        if ref_logprobs is None:
            raise ValueError(f"beta={config.beta} > 0 needs ref_logprobs")
        per_token_kl = k3_kl(logprobs, torch.where(mask, ref_logprobs.detach(), zero))
        if config.kl_ratio_weighted:
            # Tokens come from pi_old, not pi: weighting k3 by the (differentiable) ratio makes its gradient
            # E_pi[log(pi/pi_ref) grad log pi], the exact reverse-KL gradient (DeepSeek-V3.2, 2025).
            per_token_kl = per_token_kl * surrogate.ratio
        kl_penalty = reduce(per_token_kl)
        kl_mean = masked_mean(per_token_kl, mask).detach()
    loss = policy_loss + config.beta * kl_penalty

    return LossResult(
        loss=loss, policy_loss=policy_loss.detach(), kl_penalty=kl_penalty.detach(), kl_mean=kl_mean,
        ratio_mean=masked_mean(surrogate.ratio, mask).detach(),
        clip_frac_low=masked_mean(surrogate.clipped_low.float(), mask),
        clip_frac_high=masked_mean(surrogate.clipped_high.float(), mask),
        dual_clip_frac=masked_mean(surrogate.dual_clipped.float(), mask), num_tokens=mask.sum(),
        **{name: value.detach() for name, value in mismatch.items()},
    )

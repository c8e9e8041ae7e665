"""Cross-check learner.algorithms against TRL 1.16.0's GRPOTrainer on identical inputs.

TRL does not expose its GRPO math as standalone functions: the advantages are computed inline in
`GRPOTrainer._generate_and_score_completions` and the loss inline in `GRPOTrainer._compute_loss`
(trl/trainer/grpo_trainer.py). So we build a real GRPOTrainer on a tiny random Qwen2 (saved to a temp
folder, no hub access) and call those two methods:
- a `rollout_func` (TRL's own hook) returns fixed completions and sampling log-probs, and the reward
  function returns fixed rewards, so `_generate_and_score_completions` computes TRL's advantages, the
  trainer's old log-probs, the reference log-probs and, for TIS, TRL's truncated IS ratio;
- `_compute_loss` receives a tiny stand-in model whose forward returns prepared per-token log-probs
  (a leaf tensor), so TRL's loss and ours see the same log-probs, and gradients can be compared too.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from learner.algorithms import LossConfig, group_advantages, grpo_loss, truncated_is_weights

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

GROUP_SIZE = 4
NUM_GROUPS = 3
BATCH = GROUP_SIZE * NUM_GROUPS
MAX_LEN = 6
PROMPT_IDS = [2, 3, 4]
# Completion lengths vary so the mask has real padding; one row has a single token.
LENGTHS = [2, 6, 3, 5, 1, 4, 6, 2, 3, 6, 5, 4]
# Group 0 mixed, group 1 mixed with the efficiency term, group 2 all equal (zero variance).
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.3, 0.0, 1.75, 1.1, 0.1, 0.1, 0.1, 0.1]
ATOL = 1e-6


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 1-layer Qwen2 and a word-level tokenizer saved to a folder (what TRL loads by path)."""
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(30)}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>"
    )
    config = transformers.Qwen2Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


def _rollout_func(prompts: list, trainer: object) -> dict:
    """Fixed completions (token ids 5.. never EOS) and sampling log-probs spread around the model's ~-3.5."""
    generator = torch.Generator().manual_seed(1)
    completion_ids = [[5 + (i + t) % 20 for t in range(LENGTHS[i])] for i in range(len(prompts))]
    logprobs = [
        (-3.5 + 0.6 * torch.randn(LENGTHS[i], generator=generator)).tolist() for i in range(len(prompts))
    ]
    return {"prompt_ids": [PROMPT_IDS] * len(prompts), "completion_ids": completion_ids, "logprobs": logprobs}


def _reward_from_column(prompts: list, completions: list, reward: list, **kwargs: object) -> list[float]:
    """Return the dataset's `reward` column unchanged, so TRL sees exactly REWARDS."""
    return list(reward)


def _trainer(model_dir: str, *, with_tis: bool = False, **config: object) -> object:
    """A real GRPOTrainer on the tiny model; with_tis turns on TRL's token_truncate IS path (see below)."""
    args = trl.GRPOConfig(
        output_dir=model_dir,
        use_cpu=True,
        num_generations=GROUP_SIZE,
        per_device_train_batch_size=BATCH,
        max_completion_length=MAX_LEN,
        report_to="none",
        num_iterations=2,
        vllm_importance_sampling_mode="token_truncate",
        vllm_importance_sampling_clip_max=2.0,
        **config,
    )
    dataset = datasets.Dataset.from_dict({"prompt": ["w1 w2"] * BATCH, "reward": REWARDS})
    trainer = trl.GRPOTrainer(
        model=model_dir,
        reward_funcs=_reward_from_column,
        args=args,
        train_dataset=dataset,
        processing_class=transformers.AutoTokenizer.from_pretrained(model_dir),
        rollout_func=_rollout_func,
    )
    trainer.model.train()  # num_iterations=2 above makes TRL compute old log-probs (a PPO ratio != 1)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, which we do not run
    if with_tis:
        # TRL applies its vLLM IS correction only when use_vllm; turning it on at construction would start a
        # vLLM engine. The correction itself needs only sampling log-probs, which rollout_func provides.
        trainer.use_vllm = True
        trainer._last_loaded_step = trainer.state.global_step  # skip the vLLM weight sync in _generate
    return trainer


class _FixedLogprobModel(torch.nn.Module):
    """Stand-in policy for `_compute_loss`: returns fixed completion log-probs as TRL's fused-head output."""

    def __init__(self, completion_logprobs: torch.Tensor) -> None:
        super().__init__()
        self.completion_logprobs = completion_logprobs

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> SimpleNamespace:
        prompt_part = torch.zeros(input_ids.shape[0], input_ids.shape[1] - self.completion_logprobs.shape[1])
        log_probs = torch.cat([prompt_part, self.completion_logprobs], dim=1)
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs))


def _policy_logprobs(old: torch.Tensor) -> torch.Tensor:
    """Current log-probs near the old ones, with some tokens pushed past the clip and dual-clip bounds."""
    generator = torch.Generator().manual_seed(2)
    shift = 0.25 * torch.randn(old.shape, generator=generator)
    shift[0, 0], shift[1, 1], shift[5, 2], shift[6, 0] = 1.5, -1.2, 1.4, 1.3  # ratio ~4.5, 0.3, 4.1, 3.7
    return (old + shift).detach().requires_grad_(True)


@pytest.mark.parametrize("scale_rewards, std", [("group", "unbiased"), ("none", "none")])
def test_advantages_match_trl(tiny_model_dir: str, scale_rewards: str, std: str) -> None:
    """Our group_advantages equals the advantages TRL's trainer computes from the same rewards."""
    trainer = _trainer(tiny_model_dir, scale_rewards=scale_rewards)
    inputs = [{"prompt": "w1 w2", "reward": reward} for reward in REWARDS]
    trl_out = trainer._generate_and_score_completions(inputs)

    ours = group_advantages(torch.tensor(REWARDS).reshape(NUM_GROUPS, GROUP_SIZE), std=std)

    torch.testing.assert_close(ours.advantages, trl_out["advantages"].float(), atol=ATOL, rtol=0)
    assert ours.advantages.abs().max() > 0.5  # the comparison is not between two zero vectors
    assert ours.zero_variance_groups / NUM_GROUPS == pytest.approx(
        trainer._metrics["train"]["frac_reward_zero_std"][-1]
    )


# (TRL config, our LossConfig) pairs: each of our normalizations that has a TRL loss_type, plus dual-clip
# (TRL's `delta`, INTELLECT-2's two-sided clip, equals dual-clip when delta > 1 + epsilon_high) and TIS.
LOSS_CASES = {
    "grpo=sequence_mean": (
        {"loss_type": "grpo", "beta": 0.04},
        LossConfig(normalization="sequence_mean", tis_cap=None),
    ),
    "bnpo=token_mean": (
        {"loss_type": "bnpo", "beta": 0.04},
        LossConfig(normalization="token_mean", tis_cap=None),
    ),
    "dapo=token_mean,clip_higher": (
        {"loss_type": "dapo", "beta": 0.04, "epsilon_high": 0.28},
        LossConfig(normalization="token_mean", clip_eps_high=0.28, tis_cap=None),
    ),
    "dr_grpo=sum_over_max_len": (
        {"loss_type": "dr_grpo", "beta": 0.04},
        LossConfig(normalization="sum_over_max_len", max_completion_len=MAX_LEN, tis_cap=None),
    ),
    "bnpo,plain_k3": (
        {"loss_type": "bnpo", "beta": 0.1, "use_bias_correction_kl": False},
        LossConfig(normalization="token_mean", beta=0.1, kl_ratio_weighted=False, tis_cap=None),
    ),
    "delta=dual_clip": (
        {"loss_type": "dapo", "beta": 0.0, "delta": 3.0},
        LossConfig(normalization="token_mean", dual_clip_c=3.0, beta=0.0, tis_cap=None),
    ),
    "token_truncate=tis": (
        {"loss_type": "dapo", "beta": 0.04},
        LossConfig(normalization="token_mean", tis_cap=2.0),
    ),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_and_gradient_match_trl(tiny_model_dir: str, case: str) -> None:
    """grpo_loss's value, gradient and clip/KL metrics equal TRL's _compute_loss on the same tensors."""
    trl_config, our_config = LOSS_CASES[case]
    with_tis = our_config.tis_cap is not None
    trainer = _trainer(tiny_model_dir, with_tis=with_tis, **trl_config)
    inputs = trainer._generate_and_score_completions([{"prompt": "w1 w2", "reward": r} for r in REWARDS])
    mask = inputs["completion_mask"].bool()
    old = inputs["old_per_token_logps"].detach()

    trl_logprobs = _policy_logprobs(old)
    trl_loss = trainer._compute_loss(_FixedLogprobModel(trl_logprobs), inputs)
    trl_loss.backward()

    our_logprobs = trl_logprobs.detach().clone().requires_grad_(True)
    ours = grpo_loss(
        our_logprobs,
        old,
        inputs["advantages"],
        mask,
        our_config,
        ref_logprobs=inputs.get("ref_per_token_logps"),
        rollout_logprobs=inputs["sampling_per_token_logps"] if with_tis else None,
    )
    ours.loss.backward()

    torch.testing.assert_close(ours.loss, trl_loss.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(our_logprobs.grad, trl_logprobs.grad, atol=ATOL, rtol=0)
    assert our_logprobs.grad[~mask].abs().max() == 0
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items() if values}
    assert float(ours.clip_frac_low) == pytest.approx(metrics["clip_ratio/low_mean"], abs=ATOL)
    assert float(ours.clip_frac_high) == pytest.approx(metrics["clip_ratio/high_mean"], abs=ATOL)
    assert float(ours.clip_frac_low) + float(ours.clip_frac_high) > 0  # the clip was exercised
    if our_config.beta > 0:
        assert float(ours.kl_mean) == pytest.approx(metrics["kl"], abs=ATOL)
        assert float(ours.kl_mean) > 0
    if our_config.dual_clip_c is not None:
        assert float(ours.dual_clip_frac) > 0  # the rows pushed past ratio 3 with A < 0 hit the cap
    if with_tis:
        ours_weights = truncated_is_weights(old, inputs["sampling_per_token_logps"], cap=2.0)
        torch.testing.assert_close(torch.where(mask, ours_weights, 1.0), inputs["importance_sampling_ratio"])
        assert float(ours.logprob_diff_mean) == pytest.approx(
            metrics["sampling/sampling_logp_difference/mean"], abs=ATOL
        )
        assert float(ours.logprob_diff_max) == pytest.approx(
            metrics["sampling/sampling_logp_difference/max"], abs=ATOL
        )
        # TRL reports the truncated ratio; ours reports the raw one plus the fraction truncated.
        assert min(float(ours.is_ratio_max), 2.0) == pytest.approx(
            metrics["sampling/importance_sampling_ratio/max"], abs=ATOL
        )
        assert float(ours.is_ratio_min) == pytest.approx(
            metrics["sampling/importance_sampling_ratio/min"], abs=ATOL
        )
        assert 0 < float(ours.is_truncated_frac) < 1

"""Make real TrajectoryGroups without vLLM: keep sets from the real scorer, log-probs from the real pruned forward.

For tests, smoke runs and the weight-sync bench. Completions are fixed texts (the reference answer for even
rollout indices, a wrong answer for odd ones), so every group has reward variance and the recorded inputs
repeat exactly. The recorded log-probs are the model's own under the recorded keep set, as a rollout engine
that matches the trainer would report them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from services.data.loader import DatasetItem, open_media
from services.modeling.batched_forward import RowSpec, rows_completion_logprobs
from services.rollout.pruned import score_prompt
from services.schemas import AnswerType, Budget, RewardBreakdown, Rollout, Task, TrajectoryGroup
from services.sparsity.budgets import budget_from_wire, select
from services.sparsity.scorers import FeatureNormScorer

ANSWER_END = "<|im_end|>"


def wrong_answer(task: Task) -> str:
    """An answer that the task's checker rejects."""
    if task.answer_type is AnswerType.YES_NO:
        return "no" if task.answer.strip().lower() == "yes" else "yes"
    if task.answer_type is AnswerType.CHOICE and task.choices:
        return next(choice for choice in task.choices + [task.answer + "x"] if choice != task.answer)
    return "1" if task.answer.strip() != "1" else "2"


def recorded_reward(correct: bool, reduction_ratio: float, efficiency_weight: float = 0.5) -> RewardBreakdown:
    """r = r_acc + lambda * r_eff * [correct], as the reward server combines them (no format term)."""
    accuracy = 1.0 if correct else 0.0
    return RewardBreakdown(
        correct=correct, accuracy=accuracy, efficiency=reduction_ratio, format=0.0,
        total=accuracy + efficiency_weight * reduction_ratio * accuracy,
    )


@torch.no_grad()
def record_group(
    model: torch.nn.Module, processor: Any, item: DatasetItem, budgets: Sequence[Budget], *, group_id: str,
    policy_version: int = 0, worker_id: str = "recorder", epoch: int = 0,
) -> TrajectoryGroup:
    """One group of len(budgets) rollouts of `item` (an image or a video task), one budget each, with rewards."""
    inputs = score_prompt(model, processor, None, open_media(item), item.task.question).inputs
    scores = FeatureNormScorer().score(model, inputs)
    prompt_ids = inputs.input_ids[0].tolist()
    selections = [select(scores, budget_from_wire(budget)) for budget in budgets]
    texts = [item.task.answer if index % 2 == 0 else wrong_answer(item.task) for index in range(len(budgets))]
    completions = [processor.tokenizer(text + ANSWER_END, add_special_tokens=False)["input_ids"] for text in texts]
    rows = [RowSpec(prompt_ids, completion, selection.kept_indices)
            for completion, selection in zip(completions, selections, strict=True)]
    every_logprobs, _ = rows_completion_logprobs(model, rows, inputs.pixel_values, inputs.image_grid_thw,
                                                 [inputs.video_seconds_per_grid])
    rollouts, rewards = [], []
    for index, budget in enumerate(budgets):
        selection, text, completion = selections[index], texts[index], completions[index]
        correct = index % 2 == 0
        logprobs = every_logprobs[index, :len(completion)]
        rollouts.append(Rollout(
            task_id=item.task.id, rollout_index=index, budget=budget, prompt_token_ids=prompt_ids,
            completion_token_ids=completion, completion_logprobs=[min(v, 0.0) for v in logprobs.tolist()],
            completion_text=text, kept_indices=list(selection.kept_indices),
            visual_tokens_kept=selection.visual_tokens_kept, visual_tokens_total=selection.visual_tokens_total,
            policy_version=policy_version,
        ))
        rewards.append(recorded_reward(correct, selection.reduction_ratio))
    return TrajectoryGroup(
        group_id=group_id, task=item.task, epoch=epoch, rollouts=rollouts, rewards=rewards,
        policy_version=policy_version, worker_id=worker_id,
    )


def record_groups(
    model: torch.nn.Module, processor: Any, items: Sequence[DatasetItem], budgets: Sequence[Budget],
    *, policy_version: int = 0, prefix: str = "recorded",
) -> list[TrajectoryGroup]:
    """One recorded group per item, with group ids '<prefix>-<task id>'."""
    return [
        record_group(model, processor, item, budgets, group_id=f"{prefix}-{item.task.id}", policy_version=policy_version)
        for item in items
    ]


def prepare_recorded_run(
    out_dir: Path, num_tasks: int = 8, budgets: Sequence[Budget] | None = None, seed: int = 0,
) -> tuple[Path, Path, list[TrajectoryGroup]]:
    """A random-weight tiny model, a digits dataset of num_tasks and one recorded group per task, under out_dir.

    Returns (model folder, dataset JSONL, groups). For tests, smoke runs and benches that need real inputs
    without the trained assets or vLLM.
    """
    from services.data import SplitSizes, build_family, load_dataset
    from services.modeling import TinyModelSpec, build_tiny_model, load_model_and_processor

    out_dir = Path(out_dir)
    model_dir = build_tiny_model(out_dir / "model", TinyModelSpec(seed=seed))
    dataset = build_family("digits", out_dir / "data", seed=seed, splits=("train",),
                           sizes=SplitSizes(train=num_tasks, val=0, test=0))["train"]
    budgets = budgets or [Budget(kind="keep_ratio", value=value) for value in (1.0, 0.5, 0.25, 0.125)]
    model, processor = load_model_and_processor(model_dir)
    return model_dir, dataset, record_groups(model, processor, load_dataset(dataset), budgets)

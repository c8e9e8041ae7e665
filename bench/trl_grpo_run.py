"""The TRL side of bench/vs_trl.py: TRL's own GRPOTrainer on our tiny model and bundled task, in its own process.

Not a benchmark by itself: `bench/vs_trl.py` starts it as `python bench/trl_grpo_run.py SPEC.json OUT.json` (so its
memory is measured apart from ours) and reads OUT.json. The spec carries the knobs both sides share (group size,
prompts per step, max new tokens, learning rate, steps, beta, temperature, clip, ...), taken from our resolved
settings. TRL generates with its own path (transformers `generate`, use_vllm=False) and scores with a reward
function that calls the reward server's answer checker, so its reward is exactly our accuracy reward.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def trl_dataset(train_jsonl: Path) -> Any:
    """Our JSONL task file as TRL's conversational VLM format: `prompt` messages with an image slot, plus `image`."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    from services.data.loader import load_dataset
    from services.modeling.prompts import chat_messages

    rows = [{"prompt": chat_messages(item.task.question), "image": str(item.image_path), "answer": item.task.answer,
             "answer_type": item.task.answer_type.value, "choices": list(item.task.choices or [])}
            for item in load_dataset(train_jsonl)]
    return Dataset.from_list(rows).cast_column("image", ImageFeature())


def accuracy(completions: list, answer: list[str], answer_type: list[str], choices: list[list[str]],
             **_columns: Any) -> list[float]:
    """TRL reward function: 1.0 when the reward server's checker accepts the completion, else 0.0."""
    from reward_server.rewards import check_answer
    from services.schemas.models import AnswerType

    rewards = []
    for completion, reference, kind, options in zip(completions, answer, answer_type, choices, strict=True):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        rewards.append(1.0 if check_answer(text, reference, AnswerType(kind), options or None).correct else 0.0)
    return rewards


def grpo_config(spec: dict[str, Any], output_dir: Path) -> Any:
    """GRPOConfig with the spec's shared knobs; one optimizer step = prompts_per_step groups of group_size."""
    from trl import GRPOConfig

    rollouts = spec["prompts_per_step"] * spec["group_size"]
    micro = spec["micro_batch_groups"] * spec["group_size"]
    accumulation = rollouts // micro if rollouts % micro == 0 else 1
    return GRPOConfig(
        output_dir=str(output_dir), use_cpu=True, use_vllm=False, bf16=False, fp16=False, seed=spec["seed"],
        per_device_train_batch_size=rollouts // accumulation, gradient_accumulation_steps=accumulation,
        num_generations=spec["group_size"], max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"], top_p=spec["top_p"], learning_rate=spec["learning_rate"],
        lr_scheduler_type=spec["lr_schedule"], warmup_steps=spec["warmup_steps"], max_grad_norm=spec["grad_clip"],
        weight_decay=spec["weight_decay"], beta=spec["beta"], epsilon=spec["clip_eps_low"],
        epsilon_high=spec["clip_eps_high"], loss_type="dapo", scale_rewards="group", num_iterations=1,
        max_steps=spec["steps"], logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False,
    )


def make_step_recorder() -> Any:
    """A TrainerCallback recording each optimizer step's end time and the metrics TRL logs for it."""
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.train_begin: float | None = None
            self.steps: list[dict[str, Any]] = []
            self._step_started = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.train_begin = time.time()

        def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self._step_started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.steps.append({"step": state.global_step, "time": time.time(),
                               "step_seconds": time.perf_counter() - self._step_started})

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **_: Any) -> None:
            if logs and "reward" in logs and self.steps and self.steps[-1]["step"] == state.global_step:
                self.steps[-1].update({key: value for key, value in logs.items() if isinstance(value, int | float)})

    return StepRecorder()


def run(spec: dict[str, Any], out_path: Path) -> None:
    """Train with TRL's GRPOTrainer and write the per-step records, with the run's timestamps, to out_path."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import GRPOTrainer

    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])
    dataset = trl_dataset(Path(spec["train_jsonl"]))
    model = AutoModelForImageTextToText.from_pretrained(spec["model_path"], dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(spec["model_path"])
    recorder = make_step_recorder()
    trainer = GRPOTrainer(model=model, reward_funcs=accuracy, args=grpo_config(spec, out_path.parent / "trl-output"),
                          train_dataset=dataset, processing_class=processor, callbacks=[recorder])
    trainer.train()
    out_path.write_text(json.dumps({
        "train_begin": recorder.train_begin, "steps": recorder.steps,
        "torch_threads": torch.get_num_threads(), "trl_version": __import__("trl").__version__,
        "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
    }, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: trl_grpo_run.py SPEC.json OUT.json (started by bench/vs_trl.py)")
    run(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))

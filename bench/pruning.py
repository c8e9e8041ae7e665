"""Pruning bench: dense vs keep ratios 0.5 / 0.25 / 0.125 in one vLLM engine, 448x448 images (256 tokens).

For each condition, on fresh images (so no encoder or prefix cache can serve a repeat):
- prefill: wall time of a batch with max_tokens=1, once from pixels (vision tower + LLM prefill) and
  once from precomputed image embeddings (LLM prefill alone; the vision tower runs on every pixel in
  every condition, because the kept tokens' features depend on the whole image);
- decode tokens/s: the extra tokens of a max_tokens=D batch over a max_tokens=E batch, divided by
  the extra time (prefill and the vision tower cancel out);
- end-to-end requests/s: R / (scoring time + generation time of the max_tokens=E batch). Dense needs
  no scoring. A GRPO group scores its prompt once for all G budgets, so the scoring share is also
  given divided by G, and left out. "reuse" is the deployed option ``reuse_image_embeds``: vLLM takes
  the scorer's vision features, so the vision tower runs once per image (compared with dense pixels);
- KV cache per request: tokens held (prompt + completion), blocks ceil(tokens / block_size), and the
  visual KV entries (kept visual tokens).
Every number is also given as a ratio to dense. Run: ``python bench/pruning.py [--model DIR]``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import RESULTS_DIR, print_table, save_results
from PIL import Image
from tqdm import tqdm

from services.modeling import TinyModelSpec, build_tiny_model, load_model_and_processor
from services.rollout.pruned import ScoredPrompt, engine_request, score_prompt
from services.sparsity import KeepRatio, Selection, select
from services.sparsity.scorers import build_scorer
from services.vllm_plugin.qwen2_5_vl import KEPT_INDICES_KWARG, VISUAL_TOKENS_TOTAL_KWARG

REPO = Path(__file__).resolve().parents[1]
KEEP_RATIOS = (0.5, 0.25, 0.125)
IMAGE_SIDE = 448
QUESTION = "What colour is the circle?"


def _images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)) for _ in range(count)]


def _embeds_request(model: Any, prepared: ScoredPrompt, selection: Selection | None) -> dict[str, Any]:
    """A vLLM request that brings its image as merged embeddings, skipping the vision tower."""
    with torch.no_grad():
        features = model.model.get_image_features(
            prepared.inputs.pixel_values, prepared.inputs.image_grid_thw, return_dict=True
        ).pooler_output[0]
    request: dict[str, Any] = {
        "prompt": prepared.prompt,
        "multi_modal_data": {
            "image": {"image_embeds": features, "image_grid_thw": prepared.inputs.image_grid_thw}
        },
    }
    if selection is not None:
        request["mm_processor_kwargs"] = {
            KEPT_INDICES_KWARG: list(selection.kept_indices),
            VISUAL_TOKENS_TOTAL_KWARG: selection.visual_tokens_total,
        }
    return request


def _timed_generate(llm: Any, requests: list[dict[str, Any]], params: Any) -> tuple[float, list[Any]]:
    started = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    return time.perf_counter() - started, outputs


def _score_all(
    model: Any, processor: Any, scorer: Any, images: list[Image.Image], keep_image_embeds: bool = False
) -> tuple[list, float]:
    started = time.perf_counter()
    scored = [score_prompt(model, processor, scorer, image, QUESTION, keep_image_embeds=keep_image_embeds)
              for image in tqdm(images, desc="scoring")]
    return scored, time.perf_counter() - started


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every condition; returns the JSON payload."""
    from vllm import LLM, SamplingParams

    model, processor = load_model_and_processor(args.model)
    scorer = build_scorer(args.scorer, args.layer)
    llm = LLM(model=str(args.model), enforce_eager=True, dtype="float32", max_model_len=2048, seed=0,
              enable_prefix_caching=False, enable_mm_embeds=True, limit_mm_per_prompt={"image": 1})
    block_size = int(llm.llm_engine.vllm_config.cache_config.block_size)
    params = {
        "prefill": SamplingParams(temperature=0.0, max_tokens=1),
        "embeds": SamplingParams(temperature=0.0, max_tokens=1),
        "decode": SamplingParams(temperature=0.0, max_tokens=args.decode_tokens, ignore_eos=True),
        "e2e": SamplingParams(temperature=0.0, max_tokens=args.e2e_tokens, ignore_eos=True),
        "e2e_reuse": SamplingParams(temperature=0.0, max_tokens=args.e2e_tokens, ignore_eos=True),
    }
    conditions: list[tuple[str, float | None]] = [("dense", None)] + [(f"r={r:g}", r) for r in KEEP_RATIOS]
    # Fresh images for every (repetition, phase): no batch can reuse another's encoder output or KV.
    batches = {}
    for rep in range(args.repeats + 1):
        for index, phase in enumerate(params):
            images = _images(args.requests, seed=1000 * rep + index)
            reuse = phase == "e2e_reuse"
            batches[rep, phase] = (images, *_score_all(model, processor, scorer, images, keep_image_embeds=reuse))
    timings: dict[str, dict[str, list[float]]] = {name: {phase: [] for phase in params} for name, _ in conditions}
    outputs: dict[str, Any] = {}
    for rep in tqdm(range(args.repeats + 1), desc="repetitions"):
        # Repetition 0 warms the engine up and is not counted; the order of conditions rotates so that
        # noise from other processes on the machine spreads over all of them.
        for name, ratio in conditions[rep % len(conditions):] + conditions[: rep % len(conditions)]:
            for phase, sampling in params.items():
                images, scored, _ = batches[rep, phase]
                keep = [None if ratio is None else select(p.scores, KeepRatio(ratio)) for p in scored]
                if phase == "embeds":
                    requests = [_embeds_request(model, p, k) for p, k in zip(scored, keep)]
                elif phase == "e2e_reuse" and ratio is not None:
                    # The deployed pruned path: vLLM takes the scorer's vision features (no second tower).
                    requests = [engine_request(p.prompt, img, k, p.inputs) for p, img, k in zip(scored, images, keep)]
                else:
                    requests = [engine_request(p.prompt, img, k) for p, img, k in zip(scored, images, keep)]
                seconds, outputs[name, phase] = _timed_generate(llm, requests, sampling)
                if rep > 0:
                    timings[name][phase].append(seconds)
    score_s = {phase: min(batches[rep, phase][2] for rep in range(1, args.repeats + 1))
               for phase in ("e2e", "e2e_reuse")}
    image_token_id = int(model.config.image_token_id)
    no_scoring = dict.fromkeys(score_s, 0.0)
    rows = {name: _row(args, timings[name], outputs, name, no_scoring if ratio is None else score_s, block_size,
                       image_token_id) for name, ratio in conditions}
    return {"config": {**vars(args), "model": str(args.model), "results_dir": str(args.results_dir),
                       "block_size": block_size, "image_side": IMAGE_SIDE, "timing": "min over repeats"},
            "results": rows, "vs_dense": _ratios(rows)}


def _row(args: argparse.Namespace, timings: dict[str, list[float]], outputs: dict, name: str,
         score_s: dict[str, float], block_size: int, image_token_id: int) -> dict[str, float]:
    """One condition's metrics from its best (minimum) timings."""
    best = {phase: min(values) for phase, values in timings.items()}
    prefill_out = outputs[name, "prefill"]
    decode_tokens = sum(len(o.outputs[0].token_ids) for o in outputs[name, "decode"])
    extra_tokens = decode_tokens - args.requests * args.e2e_tokens
    kv_tokens = [len(o.prompt_token_ids) + args.e2e_tokens for o in prefill_out]
    return {
        "prefill_s": best["prefill"],
        "llm_prefill_s": best["embeds"],
        "decode_tokens_per_s": extra_tokens / max(1e-9, best["decode"] - best["e2e"]),
        "requests_per_s": args.requests / (score_s["e2e"] + best["e2e"]),
        "requests_per_s_group_scoring": args.requests / (score_s["e2e"] / args.group_size + best["e2e"]),
        "requests_per_s_without_scoring": args.requests / best["e2e"],
        "requests_per_s_reused_features": args.requests / (score_s["e2e_reuse"] + best["e2e_reuse"]),
        "requests_per_s_reused_features_group": args.requests
        / (score_s["e2e_reuse"] / args.group_size + best["e2e_reuse"]),
        "scoring_s": score_s["e2e"],
        "scoring_with_features_s": score_s["e2e_reuse"],
        "prompt_tokens": float(np.mean([len(o.prompt_token_ids) for o in prefill_out])),
        "visual_kv_entries": float(np.mean([o.prompt_token_ids.count(image_token_id) for o in prefill_out])),
        "kv_tokens_per_request": float(np.mean(kv_tokens)),
        "kv_blocks_per_request": float(np.mean([math.ceil(t / block_size) for t in kv_tokens])),
    }


def _ratios(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each metric as 'times better than dense' (speed-ups for times, savings for memory)."""
    dense = rows["dense"]
    return {
        name: {
            "prefill_speedup": dense["prefill_s"] / row["prefill_s"],
            "llm_prefill_speedup": dense["llm_prefill_s"] / row["llm_prefill_s"],
            "decode_speedup": row["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
            "requests_per_s_speedup": row["requests_per_s"] / dense["requests_per_s"],
            "requests_per_s_speedup_group_scoring": row["requests_per_s_group_scoring"]
            / dense["requests_per_s_group_scoring"],
            "requests_per_s_speedup_without_scoring": row["requests_per_s_without_scoring"]
            / dense["requests_per_s_without_scoring"],
            "requests_per_s_speedup_reused_features": row["requests_per_s_reused_features"]
            / dense["requests_per_s"],
            "requests_per_s_speedup_reused_features_group": row["requests_per_s_reused_features_group"]
            / dense["requests_per_s"],
            "kv_tokens_saving": dense["kv_tokens_per_request"] / row["kv_tokens_per_request"],
            "kv_blocks_saving": dense["kv_blocks_per_request"] / row["kv_blocks_per_request"],
            "visual_kv_saving": dense["visual_kv_entries"] / row["visual_kv_entries"],
        }
        for name, row in rows.items()
    }


def main() -> None:
    """Parse arguments, run the bench, print the table and write bench/results/pruning.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="HF model folder (default: the tiny model).")
    parser.add_argument("--requests", type=int, default=32, help="Requests per batch.")
    parser.add_argument("--decode-tokens", type=int, default=144, help="max_tokens of the decode batch.")
    parser.add_argument("--e2e-tokens", type=int, default=16, help="max_tokens of the end-to-end batch.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repetitions (the minimum is kept).")
    parser.add_argument("--group-size", type=int, default=8, help="G: budgets sharing one scoring pass.")
    parser.add_argument("--scorer", default="text_attention", help="Scorer name.")
    parser.add_argument("--layer", type=int, default=2, help="Scorer layer K.")
    parser.add_argument("--llm-hidden-size", type=int, default=None,
                        help="Build a random model with this LLM width (heads of 64 dims) instead of the tiny one.")
    parser.add_argument("--llm-layers", type=int, default=8, help="LLM layers of the --llm-hidden-size model.")
    parser.add_argument("--output", default="pruning", help="Result name: bench/results/<output>.json.")
    parser.add_argument("--kv-cache-gb", default="1", help="VLLM_CPU_KVCACHE_SPACE for the CPU backend.")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 requests, few tokens, one repeat")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where <output>.json goes")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.decode_tokens, args.e2e_tokens, args.repeats = 4, 8, 4, 1
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", args.kv_cache_gb)
    if args.model is None and args.llm_hidden_size:
        # The tiny model's vision tower costs more than its 4-layer LLM, unlike real Qwen2.5-VL sizes,
        # where the LLM dominates prefill; a wider, deeper random LLM shows the LLM-side savings.
        spec = TinyModelSpec(hidden_size=args.llm_hidden_size, intermediate_size=4 * args.llm_hidden_size,
                             num_hidden_layers=args.llm_layers, num_attention_heads=args.llm_hidden_size // 64,
                             num_key_value_heads=max(1, args.llm_hidden_size // 256))
        args.model = build_tiny_model(Path(tempfile.mkdtemp(prefix="sf-bench-wide-")), spec)
    if args.model is None:
        trained = REPO / "assets" / "tiny-qwen25vl"
        args.model = trained if (trained / "config.json").is_file() else build_tiny_model(
            Path(tempfile.mkdtemp(prefix="sf-bench-tiny-")))
    payload = run(args)
    columns = ["condition", "prefill s", "LLM prefill s", "decode tok/s", "req/s", "KV tok/req",
               "visual KV", "prefill x", "LLM prefill x", "decode x", "req/s x", "req/s x (G)", "req/s x (no score)",
               "req/s x (reuse)", "req/s x (reuse, G)", "KV tok x", "KV blocks x", "visual KV x"]
    table = []
    for name, row in payload["results"].items():
        ratio = payload["vs_dense"][name]
        table.append([name, row["prefill_s"], row["llm_prefill_s"], row["decode_tokens_per_s"],
                      row["requests_per_s"], row["kv_tokens_per_request"], row["visual_kv_entries"],
                      ratio["prefill_speedup"], ratio["llm_prefill_speedup"], ratio["decode_speedup"],
                      ratio["requests_per_s_speedup"], ratio["requests_per_s_speedup_group_scoring"],
                      ratio["requests_per_s_speedup_without_scoring"],
                      ratio["requests_per_s_speedup_reused_features"],
                      ratio["requests_per_s_speedup_reused_features_group"], ratio["kv_tokens_saving"],
                      ratio["kv_blocks_saving"], ratio["visual_kv_saving"]])
    print_table(f"Pruning vs dense ({args.requests} requests, {IMAGE_SIDE}px images)", columns, table)
    print(f"wrote {save_results(args.output, payload, args.results_dir)}")


if __name__ == "__main__":
    main()

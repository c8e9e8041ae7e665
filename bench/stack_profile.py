"""Where our stack's time goes: py-spy on the learner actor and vLLM's processes, samples grouped into phases.

Used by bench/vs_trl.py on its dense run: after a few learner steps it records the learner (Ray actor), the
vLLM model worker and the vLLM engine core for a window, then reports each one's busy share and phase shares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
from process_probes import (
    any_frame,
    cmdline_contains,
    find_descendant,
    phase_shares,
    read_collapsed,
    start_py_spy,
    top_leaf_frames,
    wait_for,
)

from learner.report import read_step_records

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 20 * 60

PROFILED = {"learner": "ray::TrainerActor", "vllm_worker": "VLLM::Worker", "engine_core": "VLLM::EngineCore"}
VLLM_WORKER_PHASES = [  # vLLM 0.32's model runner (the CPU runner subclasses the GPU one), in its worker process
    ("vision encoder", any_frame("_execute_mm_encoder")),
    ("decoder forward", any_frame("_model_forward")),
    ("sampling", any_frame("sample_tokens", "_sample (")),
    ("input preparation (model runner)", any_frame("execute_model")),
    ("waiting for work (shm queue)", any_frame("acquire_read", "dequeue")),
]
ENGINE_CORE_PHASES = [  # the engine core schedules and hands batches to the worker process
    ("spin-waiting on the worker (sched_yield)", any_frame("sched_yield")),
    ("scheduling + KV-cache bookkeeping", any_frame("schedule (", "update_from_output", "kv_cache_manager")),
    ("messaging (zmq, shm)", any_frame("zmq/", "shm_broadcast")),
]


def learner_phases(step_source: Path) -> list[tuple[str, Any]]:
    """py-spy phase matchers for the learner actor (the reference forward is found by its lines in learner/step.py)."""
    lines = step_source.read_text().splitlines()
    ref_lines = [f"step.py:{i}" for i, text in enumerate(lines, 1)
                 if "(reference," in text and ("logprobs(" in text or "image_features(" in text)]
    return [
        ("weight publish", any_frame("publish_policy")), ("checkpoint", any_frame("save_checkpoint")),
        ("reference forward (no grad)", lambda frames: any(("_micro_batch_logprobs" in f or "_chunk_features" in f)
                                                          and any(r in f for r in ref_lines) for f in frames)),
        ("backward", any_frame("backward (", "_engine_run_backward")),
        ("kept-set term (scorer pass)", any_frame("_kept_mass_terms")),
        ("policy forward: vision tower", any_frame("image_features")),
        ("policy forward: LLM + log-probs", any_frame("batched_completion_logprobs", "pruned_completion_logprobs")),
        ("planning batches (CPU)", any_frame("plan_batch")),
        ("optimizer + grad clip", any_frame("clip_grad_norm_", "optimizer.py", "adamw.py")),
        ("pixel inputs (image processor)", any_frame("_pixel_inputs")),
        ("collecting groups (Redis, decode)", any_frame("collect_batch")),
    ]


def profile_verdict(run_dir: Path, duration_s: int, rate_hz: int = 20) -> dict[str, Any]:
    """Where the profiled run's time went: each process's phase shares, and how busy its busiest thread was."""
    verdict: dict[str, Any] = {"tool": f"py-spy record --nonblocking, {rate_hz} Hz, {duration_s} s after step 3"}
    parts = {"learner": learner_phases(ROOT / "learner" / "step.py"), "vllm_worker": VLLM_WORKER_PHASES,
             "engine_core": ENGINE_CORE_PHASES}
    for name, phases in parts.items():
        stacks = read_collapsed(run_dir / f"py-spy-{name}.txt")
        shares, samples = phase_shares(stacks, phases)
        if samples:
            verdict[name] = {"busy_share": samples / (rate_hz * duration_s), "phases": shares,
                             "top_self_frames": top_leaf_frames(stacks)}
    return verdict


def profile_ours(run_dir: Path, duration_s: int, warm_steps: int) -> Any:
    """A callback for run_child: after warm_steps learner steps, py-spy every PROFILED process for duration_s."""
    def attach(root_pid: int) -> None:
        metrics = run_dir / "metrics.jsonl"

        def warm_or_gone() -> bool:
            return len(read_step_records(metrics)) >= warm_steps or not psutil.pid_exists(root_pid)

        if not wait_for(warm_or_gone, WAIT_S) or not psutil.pid_exists(root_pid):
            return
        targets = {name: find_descendant(root_pid, cmdline_contains(title)) for name, title in PROFILED.items()}
        spies = [start_py_spy(pid, run_dir / f"py-spy-{name}.txt", duration_s)
                 for name, pid in targets.items() if pid is not None]
        for spy in spies:
            if spy is not None:
                spy.wait(timeout=duration_s + 60)
    return attach


def where_time_goes(dense: dict[str, Any], verdict: dict[str, Any]) -> list[str]:
    """Plain-language lines from the dense run's summary and its profile: who is the bottleneck, and why."""
    busy = dense["busy_share"]
    lines = [f"learner busy {busy:.0%} of the training wall: "
             + ("it is the bottleneck (rollouts wait for it)" if busy >= 0.8 else "it waits for rollouts part of the time")]
    if dense.get("rollouts_generated"):
        lines.append(f"the worker generated {dense['worker_rollouts_per_s'] / dense['rollouts_per_s']:.1f}x the rollouts "
                     f"trained on; {dense['generated_not_trained_share']:.0%} were never trained "
                     f"({dense['stale_groups_dropped']} groups dropped as stale, the rest still queued at the end)")
    for part in PROFILED:
        if part in verdict:
            phases = sorted(verdict[part]["phases"].items(), key=lambda kv: -kv[1])
            lines.append(f"{part} (py-spy, busiest thread active {verdict[part]['busy_share']:.0%} of the window): "
                         + ", ".join(f"{name} {share:.0%}" for name, share in phases))
    return lines

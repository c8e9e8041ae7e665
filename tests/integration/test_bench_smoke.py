"""Benchmarks run end to end in their quick modes and write their JSON (keeps the scripts from rotting)."""

import json
from pathlib import Path

import pytest
from support import run_quick_bench

pytestmark = pytest.mark.heavy  # starts vLLM, Ray or a benchmark: not in make test-fast


def test_queue_bench_quick_mode_writes_results(tmp_path: Path) -> None:
    result = run_quick_bench("bench/queue_throughput.py", tmp_path, timeout=300)
    written = json.loads((tmp_path / "queue_throughput.json").read_text())
    assert [row["batch"] for row in written["queue"]] == [1, 16, 128]
    assert all(row["entries_per_s"] > 0 for row in written["queue"])
    assert written["redis_benchmark_xadd_per_s"] > 0 and "vs raw XADD" in result.stdout


def test_rollout_worker_bench_quick_mode_writes_results(tmp_path: Path) -> None:
    run_quick_bench("bench/rollout_worker.py", tmp_path, timeout=600)
    written = json.loads((tmp_path / "rollout_worker.json").read_text())
    assert [row["budget_set"] for row in written["rows"]] == ["dense (all 1.0)", "mixed {1, .5, .25, .125}"]
    for row in written["rows"]:
        assert row["rollouts"] == 4 * 8 and row["rollouts_per_s"] > 0
        assert 0 < row["generate_share"] <= 1


def test_vs_trl_bench_quick_mode_writes_results(tmp_path: Path) -> None:
    result = run_quick_bench("bench/vs_trl.py", tmp_path, timeout=900)
    written = json.loads((tmp_path / "vs_trl.json").read_text())
    assert set(written["sides"]) == {"trl", "dense", "sparse"}
    for side in written["sides"].values():
        assert side["steps"] == 2 and side["rollouts_per_s"] > 0 and side["peak_memory_gib"] > 0
        assert len(side["curve"]) == 2
    assert written["ratios"]["dense"]["rollouts_per_s_vs_trl"] > 0
    assert (tmp_path / "vs_trl.png").stat().st_size > 0 and "goal rollouts_per_s_vs_trl" in result.stdout


def test_reward_server_bench_quick_mode_writes_results(tmp_path: Path) -> None:
    run_quick_bench("bench/reward_server.py", tmp_path, timeout=300)
    written = json.loads((tmp_path / "reward_server.json").read_text())
    assert [(row["via"], row["batch"]) for row in written["rows"]][:3] == [("httpx", 1), ("httpx", 64), ("httpx", 512)]
    assert all(row["items_per_s"] > 0 for row in written["rows"])


def test_pruning_bench_quick_mode_writes_results(tmp_path: Path) -> None:
    run_quick_bench("bench/pruning.py", tmp_path, timeout=600)
    written = json.loads((tmp_path / "pruning.json").read_text())
    assert list(written["results"]) == ["dense", "r=0.5", "r=0.25", "r=0.125"]
    assert written["vs_dense"]["r=0.25"]["visual_kv_saving"] == 4.0


def test_learner_step_bench_quick_mode_times_all_conditions(tmp_path: Path) -> None:
    result = run_quick_bench("bench/learner_step.py", tmp_path, timeout=300)
    written = json.loads((tmp_path / "learner_step.json").read_text())
    assert [row["condition"] for row in written["results"]] == [
        "per-rollout (old path)", "batched (new path)", "batched, GRPO only (kept_mass_weight 0)",
        "dense groups, a row per rollout", "dense groups, shared prompts"]
    assert all(row["step_s_mean"] > 0 and len(row["step_s"]) == 2 and row["peak_rss_mb_above_start_max"] >= 0
               for row in written["results"])
    assert [row["ratio_to_baseline"] for row in written["results"][::3]] == [1.0, 1.0]
    assert written["speedup_new_vs_old"] > 0 and written["speedup_shared_prompts_dense"] > 0
    assert "× baseline" in result.stdout and "shared prompts vs a row per rollout" in result.stdout


def test_gpu_learner_bench_quick_mode_runs_every_section_on_toy_shapes(tmp_path: Path) -> None:
    run_quick_bench("bench/gpu_learner.py", tmp_path, timeout=600)
    written = json.loads((tmp_path / "gpu_learner.json").read_text())
    assert written["errors"] == {} and written["config"]["tiny"]
    step = written["a_grpo_step"]
    assert step["batched_G8"]["step"]["median_s"] > 0 and step["per_rollout_G4_old_path"]["group_size"] == 4
    survival = written["c_update_survival"]
    assert (survival["fp32_master_bf16_autocast"]["fraction_changed_where_grad_nonzero"]
            > survival["bf16_weights_in_place"]["fraction_changed_where_grad_nonzero"])
    assert set(written["b_pruned_forward_backward"]["per_keep_ratio"]) == {"r=1", "r=0.5", "r=0.25", "r=0.125"}
    assert written["d_vision_attention"]["speedup_packed"] > 0


def test_fidelity_bench_quick_mode_trains_evaluates_and_judges_the_claims(tmp_path: Path) -> None:
    result = run_quick_bench("bench/fidelity.py", tmp_path, timeout=900)
    written = json.loads((tmp_path / "fidelity.json").read_text())
    (row,) = written["rows"]
    assert written["failed"] == []
    assert (row["family"], row["seed"], row["steps"]) == ("digits", 0, 2)
    assert written["config"]["eval_seed"] == 2026 and written["config"]["eval_items"] == 8
    for key in ("base_dense", "base_r025", "trained_dense", "trained_r025", "trained_tau0975_accuracy",
                "trained_tau0975_reduction", "base_tau0975_reduction"):
        low, high = row[f"{key}_ci95"]
        assert 0.0 <= low <= row[key] <= high <= 1.0
    assert row["budgets"]["trained"]["r=0.25"]["reduction"] == 0.75 and row["budgets"]["base"]["r=1"]["items"] == 8
    assert all(isinstance(claim["met"], bool) for claim in row["claims"].values())
    assert written["summary"]["digits"]["seeds"] == [0]
    assert (tmp_path / "fidelity.png").stat().st_size > 0
    assert result.stdout.count("[fidelity +") >= 6 and "trained 2 steps" in result.stdout

"""bench/weight_sync.py --quick runs end to end (real redis-server, real worker processes) and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import run_quick_bench

pytestmark = pytest.mark.heavy  # starts vLLM, Ray or a benchmark: not in make test-fast


def test_weight_sync_bench_quick_mode_measures_every_phase(tmp_path: Path) -> None:
    run_quick_bench("bench/weight_sync.py", tmp_path, timeout=300)
    result = json.loads((tmp_path / "weight_sync.json").read_text())
    assert result["rows"][0]["case"] == "tiny model"
    for row in result["rows"]:
        assert row["bytes"] > 0 and row["memcpy_GBps"] > 0
        assert row["end_to_end_s"] >= row["save_s"] + row["copy_hash_s"] > 0
        assert row["end_to_end_over_memcpy"] > 1  # nothing beats moving the bytes once through memory


def test_weight_sync_stages_quick_mode_times_every_stage_against_memcpy(tmp_path: Path) -> None:
    run_quick_bench("bench/weight_sync_stages.py", tmp_path, timeout=300)
    result = json.loads((tmp_path / "weight_sync_stages.json").read_text())
    stages = {row["stage"]: row for row in result["rows"]}
    assert len(stages) == 10 and stages["memcpy (torch copy_)"]["over_memcpy"] == 1.0
    for row in result["rows"]:
        assert len(row["each_s"]) == result["rounds"] and row["best_s"] == min(row["each_s"]) > 0
    # a verified load reads and hashes every byte: never as cheap as copying them once
    assert stages["verified in-place load (read + blake3)"]["over_memcpy"] > 1

"""Prometheus alert rules under deploy/prometheus: promtool accepts them, they name exported metrics only,
and each alert fires on the series it is meant for (promtool's rule unit tests)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from support import exported_sample_names

from services.telemetry import Telemetry

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy/prometheus"


def rule_files() -> list[Path]:
    """The rule files prometheus.yml loads (its rule_files are relative to it)."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    return [PROMETHEUS_DIR / name for name in config.get("rule_files", [])]


def alert_rules() -> dict[str, dict]:
    return {
        rule["alert"]: rule
        for path in rule_files()
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def promtool(*args: str) -> None:
    result = subprocess.run(["promtool", *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_loads_rule_files_that_promtool_accepts() -> None:
    files = rule_files()
    assert files and all(path.is_file() for path in files), files
    promtool("check", "rules", *map(str, files))


def test_every_alert_names_an_exported_metric() -> None:
    telemetry = Telemetry("rules-test").define("queue", "rollout", "reward_server", "learner", "weights")
    exported = exported_sample_names(telemetry.exposition().decode())
    rules = alert_rules()
    assert "DeadLettersTrimmed" in rules
    for name, rule in rules.items():
        metrics = re.findall(r"\bsf_[a-z0-9_]+", rule["expr"])
        assert metrics, f"{name} names no sf_* metric"
        for metric in metrics:
            assert metric in exported, f"alert {name} uses unknown {metric}"


def test_dead_letters_trimmed_fires_while_trimming_and_resolves_after(tmp_path: Path) -> None:
    # Annotations are templates checked by `promtool check rules`; without them this test is about when the
    # alert fires, and it does not break when their wording changes.
    groups = [
        {**group, "rules": [{key: value for key, value in rule.items() if key != "annotations"}
                            for rule in group["rules"]]}
        for path in rule_files() for group in yaml.safe_load(path.read_text())["groups"]
    ]
    rules_path = tmp_path / "rules.yml"
    rules_path.write_text(yaml.safe_dump({"groups": groups}))
    trimmed = 'sf_queue_dead_letters_trimmed_total{{stream="{}", job="learner"}}'
    unit_test = {
        "rule_files": [str(rules_path)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # sf:tasks: quiet for 10 minutes, trimmed for 20 (a flood of bad task lines), then quiet again.
                {"series": trimmed.format("sf:tasks"), "values": "0x10 0+100x20 2000x40"},
                {"series": trimmed.format("sf:trajectories"), "values": "0x70"},
            ],
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": "DeadLettersTrimmed", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "DeadLettersTrimmed",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "stream": "sf:tasks"}}]},
                {"eval_time": "60m", "alertname": "DeadLettersTrimmed", "exp_alerts": []},
            ],
        }],
    }
    test_path = tmp_path / "rules_test.yml"
    test_path.write_text(yaml.safe_dump(unit_test))
    promtool("test", "rules", str(test_path))

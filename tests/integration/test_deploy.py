"""Deployment files, checked as far as this machine allows (no Docker engine): compose, Prometheus, Grafana."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from support import dashboard_metric_uses, exported_sample_names

from services.telemetry import Telemetry

REPO = Path(__file__).resolve().parents[2]
COMPOSE_SCHEMA = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")
ENV_FOR_COMPOSE = {"REDIS_PASSWORD": "x", "REWARD_TOKEN": "y", "GRAFANA_ADMIN_PASSWORD": "z", "RAY_TOKEN": "r"}


def run_compose_config(*files: str) -> dict:
    """`docker-compose config` on the given files, with the .env.example variables set."""
    env_example = dict(
        line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    result = subprocess.run(
        ["docker-compose", *[arg for file in files for arg in ("-f", file)], "config"],
        cwd=REPO, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env_example}, check=False,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


class ComposeLoader(yaml.SafeLoader):
    """YAML loader that understands Compose's `!reset` tag (drop the base file's value)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: "__RESET__")


def interpolate(node, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution, then its cast of numeric strings."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if isinstance(node, str):
        def substitute(match: re.Match) -> str:
            name, operator, default = match.group(1), match.group(2), match.group(3) or ""
            if name in env:
                return env[name]
            assert operator != ":?", f"${{{name}}} is required: {default}"
            return default

        text = re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", substitute, node)
        return int(text) if text.isdigit() and text != node else text
    return node


def merge_compose(base: dict, override: dict) -> dict:
    """Compose's merge: mappings merge key by key, `!reset` removes, other values replace."""
    merged = dict(base)
    for key, value in override.items():
        if value == "__RESET__":
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_compose(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is installed by make setup")
def test_compose_file_is_valid_and_complete() -> None:
    config = run_compose_config("docker-compose.yml")
    services = config["services"]
    assert {"redis", "ray-head", "learner-job", "rollout-worker", "reward-server", "prometheus", "grafana"} <= set(
        services
    )
    assert "--requirepass" in services["redis"]["command"] and "--appendonly" in services["redis"]["command"]
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendfsync") + 1] == "always"  # a crash loses no entry
    gpu = services["rollout-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    for name in ("reward-server", "rollout-worker", "ray-head"):
        assert services[name]["environment"]["SF_REDIS__PASSWORD"] == "change-me-to-a-long-random-string"
    for name in ("ray-head", "learner-job"):  # the job API runs submitted code: it must want a token
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token"
        assert services[name]["environment"]["RAY_AUTH_TOKEN"] == "change-me-for-ray"


def test_cpu_override_drops_gpu_reservations_and_stays_valid() -> None:
    base = yaml.load((REPO / "docker-compose.yml").read_text(), Loader=ComposeLoader)
    override = yaml.load((REPO / "docker-compose.cpu.yml").read_text(), Loader=ComposeLoader)
    merged = interpolate(merge_compose(base, override), ENV_FOR_COMPOSE)
    jsonschema.validate(merged, json.loads(COMPOSE_SCHEMA.read_text()))
    for name in ("rollout-worker", "ray-head"):
        assert "devices" not in merged["services"][name]["deploy"]["resources"]["reservations"]
        assert merged["services"][name]["image"] == "sparsity-forcing:cpu"
        assert merged["services"][name]["build"]["args"]["FLAVOR"] == "cpu"


def test_prometheus_config_passes_promtool() -> None:
    result = subprocess.run(
        ["promtool", "check", "config", str(REPO / "deploy/prometheus/prometheus.yml")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_through_the_same_setup_script_as_make() -> None:
    dockerfile = (REPO / "deploy/docker/Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^\s+bash scripts/setup\.sh$", makefile, re.MULTILINE)
    install_lines = [
        line for line in dockerfile.splitlines() if not line.startswith("#") and re.search(r"pip |setup\.sh", line)
    ]
    assert install_lines and all("bash scripts/setup.sh" in line for line in install_lines), install_lines
    assert re.search(r"^USER sf$", dockerfile, re.MULTILINE), "containers must run as non-root"
    assert "REDIS_PASSWORD" not in dockerfile and "TOKEN" not in dockerfile, "no secrets baked in"


def test_every_dashboard_query_names_an_exported_metric() -> None:
    telemetry = Telemetry("deploy-test")
    for group in ("queue", "rollout", "reward_server", "learner", "weights"):
        getattr(telemetry, group)
    exported = exported_sample_names(telemetry.exposition().decode())
    assert len(list((REPO / "deploy/grafana/dashboards").glob("*.json"))) >= 2
    for where, metric in dashboard_metric_uses(REPO / "deploy/grafana/dashboards"):
        assert metric in exported, f"{where} uses unknown {metric}"


def test_every_config_the_compose_commands_name_loads_together() -> None:
    from services.settings import load_settings

    for compose_file in ("docker-compose.yml", "docker-compose.cpu.yml"):
        compose = yaml.load((REPO / compose_file).read_text(), Loader=ComposeLoader)
        for name, service in compose["services"].items():
            command = service.get("command") or []
            configs = [command[i + 1] for i, arg in enumerate(command) if arg == "--config"]
            if configs:
                settings = load_settings([REPO / config for config in configs], environ={})
                assert settings.reward_server.auth_required, f"{compose_file}:{name} must keep auth on"


RUNS_WRITERS = {"ray-head"}  # the learner runs there as a Ray job: checkpoints and weight versions


@pytest.mark.parametrize("files", [("docker-compose.yml",), ("docker-compose.yml", "docker-compose.cpu.yml")])
def test_only_the_learner_can_write_runs(files: tuple[str, ...]) -> None:
    # A worker or reward-server container that is taken over must not be able to plant files the learner
    # loads on resume (checkpoints) or that other workers load (weight versions).
    merged: dict = {}
    for file in files:
        merged = merge_compose(merged, yaml.load((REPO / file).read_text(), Loader=ComposeLoader))
    mounts = {
        name: [volume for volume in service.get("volumes", []) if volume.split(":")[0] == "runs"]
        for name, service in merged["services"].items()
    }
    assert {name for name, found in mounts.items() if found} >= RUNS_WRITERS | {"rollout-worker"}
    for name, found in mounts.items():
        for volume in found:
            assert volume.endswith(":ro") != (name in RUNS_WRITERS), f"{name}: {volume}"

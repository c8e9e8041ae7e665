"""Settings compose YAML < SF_* env < overrides, and refuse unknown keys and bad values by name."""

import argparse
from pathlib import Path

import pytest
import yaml

from services.settings import (
    Settings,
    SettingsError,
    add_settings_arguments,
    load_settings,
    settings_from_args,
)
from services.settings.loader import read_yaml_config


def write_yaml(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_load_without_any_source() -> None:
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.queues.tasks_stream == "sf:tasks"


def test_layers_apply_in_order_files_then_env_then_overrides(tmp_path: Path) -> None:
    base = write_yaml(tmp_path, "base.yaml", "queues:\n  max_length: 100\n  block_ms: 5\nrun_name: base\n")
    run = write_yaml(tmp_path, "run.yaml", "queues:\n  max_length: 200\n")
    settings = load_settings(
        [base, run],
        overrides=["run_name=from-cli"],
        environ={"SF_QUEUES__MAX_LENGTH": "300", "SF_RUN_NAME": "from-env", "UNRELATED": "x"},
    )
    assert settings.queues.max_length == 300  # env beats both files
    assert settings.queues.block_ms == 5  # a file's sibling key survives the later file's merge
    assert settings.run_name == "from-cli"  # overrides beat env


def test_env_and_override_values_parse_as_yaml_scalars() -> None:
    settings = load_settings(
        overrides=["redis.insecure_local=true", "queues.claim_idle_ms=250"], environ={"SF_QUEUES__CODEC": "json"}
    )
    assert settings.redis.insecure_local is True
    assert settings.queues.claim_idle_ms == 250
    assert settings.queues.codec == "json"


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"overrides": ["queues.max_lenght=5"]}, "queues.max_lenght"),
        ({"environ": {"SF_QUEUES__NOPE": "1"}}, "SF_QUEUES__NOPE"),
        ({"overrides": ["nosuchsection.key=1"]}, "nosuchsection"),
        ({"overrides": ["queues.max_length=-1"]}, "queues.max_length"),
        ({"overrides": ["queues.codec=xml"]}, "queues.codec"),
        ({"overrides": ["queues.max_length"]}, "section.key=value"),
    ],
)
def test_unknown_keys_and_bad_values_are_refused_by_name(kwargs: dict, named: str) -> None:
    kwargs.setdefault("environ", {})
    with pytest.raises(SettingsError, match=named.replace(".", r"\.")):
        load_settings(**kwargs)


def test_bad_file_key_names_the_file_and_key(tmp_path: Path) -> None:
    bad = write_yaml(tmp_path, "bad.yaml", "queues:\n  max_length: 10\n  typo_key: 3\n")
    with pytest.raises(SettingsError) as raised:
        load_settings([bad], environ={})
    assert "bad.yaml" in str(raised.value) and "queues.typo_key" in str(raised.value)


def test_missing_or_malformed_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings([tmp_path / "absent.yaml"], environ={})
    with pytest.raises(SettingsError, match="mapping"):
        load_settings([write_yaml(tmp_path, "list.yaml", "- 1\n- 2\n")], environ={})
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings([write_yaml(tmp_path, "broken.yaml", "a: [1, 2\n")], environ={})


def test_secrets_do_not_leak_into_repr() -> None:
    settings = load_settings(overrides=["redis.password=hunter2"], environ={})
    assert settings.redis.password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings)


def test_every_bundled_config_file_loads() -> None:
    configs = sorted((Path(__file__).parents[3] / "configs").glob("*.yaml"))
    assert configs, "configs/ should hold at least the default settings file"
    for path in configs:
        load_settings([path], environ={})


def test_the_insecure_local_flag_sets_redis_insecure_local() -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    assert settings_from_args(parser.parse_args(["--insecure-local"])).redis.insecure_local is True
    assert settings_from_args(parser.parse_args([])).redis.insecure_local is False


CONFIGS = Path(__file__).parents[3] / "configs"
# What each bundled file is layered on (its header says so); a file not named here stands on the defaults.
CONFIG_BASES = {
    "demo.yaml": ["default.yaml"],
    "learner-local.yaml": ["default.yaml"],
    "gpu.example.yaml": ["default.yaml", "demo.yaml"],
    "deploy-cpu.yaml": ["deploy.yaml"],
}


def leaf_keys(mapping: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a YAML mapping that holds a value rather than a section."""
    keys = []
    for key, value in mapping.items():
        keys += leaf_keys(value, (*prefix, key)) if isinstance(value, dict) else [(*prefix, key)]
    return keys


def restated_keys(path: Path, bases: list[Path]) -> list[str]:
    """Keys of `path` that leave the value they override (defaults < bases) as it was.

    A restatement on purpose says why in a comment on its line, and is not counted.
    """
    before = load_settings(bases, environ={}).model_dump(mode="json")
    after = load_settings([*bases, path], environ={}).model_dump(mode="json")
    lines = path.read_text().splitlines()
    restated = []
    for keys in leaf_keys(read_yaml_config(path)):
        old, new = before, after
        for key in keys:
            old, new = old[key], new[key]
        commented = any(line.strip().startswith(f"{keys[-1]}:") and "#" in line for line in lines)
        if old == new and not commented:
            restated.append(".".join(keys))
    return restated


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_bundled_config_key_changes_what_it_overrides(path: Path) -> None:
    bases = [CONFIGS / name for name in CONFIG_BASES.get(path.name, [])]
    assert restated_keys(path, bases) == []


def test_a_restated_default_is_reported_and_a_commented_one_is_not(tmp_path: Path) -> None:
    config = write_yaml(tmp_path, "run.yaml", "queues:\n  max_length: 10000\n  block_ms: 5\n"
                                              "  codec: msgpack  # kept explicit: workers on another version\n")
    assert restated_keys(config, []) == ["queues.max_length"]


def test_print_settings_prints_the_resolved_yaml_with_secrets_masked_and_exits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    args = parser.parse_args(["--print-settings", "--set", "queues.max_length=77", "--set", "redis.password=hunter2"])
    with pytest.raises(SystemExit) as exited:
        settings_from_args(args)
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert "hunter2" not in printed
    resolved = yaml.safe_load(printed)
    assert resolved["queues"]["max_length"] == 77 and resolved["redis"]["password"] == "**********"
    resolved["redis"]["password"] = None
    assert Settings.model_validate(resolved) == load_settings(overrides=["queues.max_length=77"], environ={})

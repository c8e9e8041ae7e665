"""Settings compose YAML < SF_* env < overrides, and refuse unknown keys and bad values by name."""

import argparse
from pathlib import Path

import pytest

from services.settings import (
    Settings,
    SettingsError,
    add_settings_arguments,
    load_settings,
    settings_from_args,
)


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

"""Compose Settings from YAML files, then SF_* environment variables, then CLI overrides (last wins)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from services.settings.models import Settings

ENV_PREFIX = "SF_"
ENV_NESTING = "__"


class SettingsError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names the key and source."""


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return base updated by override, merging nested mappings key by key instead of replacing them."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml_config(path: Path) -> dict[str, Any]:
    """Read one YAML settings file; it must hold a mapping at the top."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise SettingsError(f"config file not found: {path}") from error
    except yaml.YAMLError as error:
        raise SettingsError(f"config file {path} is not valid YAML: {error}") from error
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SettingsError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
    return loaded


def _field_model(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The nested settings model behind model.key, or None when key is a leaf field."""
    annotation = model.model_fields[key].annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _resolve_path(dotted: str, source: str) -> list[str]:
    """Split 'a.b.c' into field names, refusing any part that Settings does not have."""
    parts = [part for part in dotted.split(".") if part]
    model: type[BaseModel] | None = Settings
    for depth, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            known = sorted(model.model_fields) if model is not None else []
            where = ".".join(parts[: depth + 1])
            raise SettingsError(f"unknown setting '{where}' (from {source}); known here: {known}")
        model = _field_model(model, part)
    if not parts:
        raise SettingsError(f"empty setting name (from {source})")
    return parts


def _nest(parts: Sequence[str], value: Any) -> dict[str, Any]:
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    return nested


def _parse_scalar(raw: str) -> Any:
    """Parse an env/CLI value as a YAML scalar or flow collection ('3', 'true', '[1.0, 0.5]')."""
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


def settings_from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    """Map SF_SECTION__KEY=value variables onto nested settings, refusing unknown names."""
    collected: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace(ENV_NESTING, ".")
        parts = _resolve_path(dotted, f"environment variable {name}")
        collected = deep_merge(collected, _nest(parts, _parse_scalar(raw)))
    return collected


def settings_from_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Map 'section.key=value' overrides (from --set) onto nested settings."""
    collected: dict[str, Any] = {}
    for override in overrides:
        if "=" not in override:
            raise SettingsError(f"override '{override}' must look like section.key=value")
        dotted, raw = override.split("=", 1)
        parts = _resolve_path(dotted.strip(), f"override '{override}'")
        collected = deep_merge(collected, _nest(parts, _parse_scalar(raw)))
    return collected


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "invalid settings:\n" + "\n".join(lines)


def load_settings(
    config_files: Iterable[Path | str] = (),
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build Settings: defaults < YAML files (in order) < SF_* variables < overrides."""
    layered: dict[str, Any] = {}
    for path in config_files:
        file_settings = read_yaml_config(Path(path))
        try:  # validated alone first, so an error names the file that holds the bad key
            Settings.model_validate(file_settings)
        except ValidationError as error:
            raise SettingsError(f"config file {path}: {_describe(error)}") from error
        layered = deep_merge(layered, file_settings)
    layered = deep_merge(layered, settings_from_environ(os.environ if environ is None else environ))
    layered = deep_merge(layered, settings_from_overrides(overrides))
    try:
        return Settings.model_validate(layered)
    except ValidationError as error:
        raise SettingsError(_describe(error)) from error


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the --config and --set flags every service entrypoint shares."""
    parser.add_argument(
        "--config", action="append", default=[], type=Path, metavar="YAML",
        help="settings file; repeat to layer several (later files win)",
    )
    parser.add_argument(
        "--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
        help="override one setting, e.g. --set queues.max_length=5000 (wins over files and SF_* vars)",
    )
    parser.add_argument(
        "--insecure-local", action="store_true",
        help="allow a Redis without authentication, on a loopback host only (redis.insecure_local=true)",
    )
    parser.add_argument(
        "--print-settings", action="store_true",
        help="print the resolved settings (defaults + files + SF_* + --set) as YAML and exit",
    )


def settings_document(settings: Settings) -> dict[str, Any]:
    """The resolved settings as plain data; a secret that is set shows as '**********', never its value."""
    return settings.model_dump(mode="json")


def settings_yaml(settings: Settings) -> str:
    """The resolved settings as YAML, in the models' field order (secrets masked)."""
    return yaml.safe_dump(settings_document(settings), sort_keys=False)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Load Settings from the flags that add_settings_arguments defined; --print-settings prints them and exits."""
    insecure = ["redis.insecure_local=true"] if getattr(args, "insecure_local", False) else []
    settings = load_settings(args.config, [*args.overrides, *insecure])
    if getattr(args, "print_settings", False):
        # Like --help: every entrypoint that reads its settings this way answers the flag the same way.
        print(settings_yaml(settings), end="", flush=True)
        raise SystemExit(0)
    return settings

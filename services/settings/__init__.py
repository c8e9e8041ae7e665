"""One settings system for every service: YAML files, then SF_* env variables, then CLI overrides."""

from services.settings.loader import (
    SettingsError,
    add_settings_arguments,
    deep_merge,
    load_settings,
    settings_document,
    settings_from_args,
    settings_yaml,
)
from services.settings.models import (
    QueueSettings,
    RedisSettings,
    RewardServerSettings,
    RewardSettings,
    RolloutSettings,
    Settings,
    TelemetrySettings,
)

__all__ = [
    "QueueSettings",
    "RedisSettings",
    "RewardServerSettings",
    "RewardSettings",
    "RolloutSettings",
    "Settings",
    "SettingsError",
    "TelemetrySettings",
    "add_settings_arguments",
    "deep_merge",
    "load_settings",
    "settings_document",
    "settings_from_args",
    "settings_yaml",
]

"""Experiment trackers get the learner's step records: TensorBoard's event files read back hold the values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from services.settings import TelemetrySettings, load_settings, settings_document
from services.telemetry.trackers import TrackerUnavailable, numeric_fields, open_trackers


def step_record(step: int) -> dict[str, object]:
    return {"step": step, "time": 1_700_000_000.0 + step, "loss": 0.5 / step, "reward_total": 0.25 * step,
            "accuracy": 0.125 * step, "reduction_ratio": 0.1 * step, "policy_version": step,
            "skipped_nonfinite": False, "group_ids": ["a", "b"], "turned_away": {"stale": step},
            "accuracy_by_budget": {"tau=0.94": 0.5, "tau=0.975": 0.25 * step}}


def test_numeric_fields_flatten_nested_numbers_and_leave_out_ids_and_the_clock() -> None:
    numbers = numeric_fields(step_record(2))
    assert numbers["accuracy_by_budget/tau=0.975"] == 0.5 and numbers["turned_away/stale"] == 2.0
    assert numbers["skipped_nonfinite"] == 0.0 and numbers["policy_version"] == 2.0
    assert "step" not in numbers and "time" not in numbers and "group_ids" not in numbers


def test_tensorboard_event_files_hold_every_step_record(tmp_path: Path) -> None:
    settings = load_settings(overrides=["telemetry.trackers=[tensorboard]"], environ={})
    with open_trackers(settings.telemetry, tmp_path, "tb-test", settings_document(settings)) as trackers:
        for step in (1, 2, 3):
            trackers(step_record(step))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "reward_total", "accuracy", "reduction_ratio", "accuracy_by_budget/tau=0.975"} <= set(
        events.Tags()["scalars"])
    for tag, expected in (("reward_total", [0.25, 0.5, 0.75]), ("accuracy_by_budget/tau=0.975", [0.25, 0.5, 0.75]),
                          ("loss", [0.5, 0.25, 0.5 / 3])):
        scalars = events.Scalars(tag)
        assert [event.step for event in scalars] == [1, 2, 3]
        assert [event.value for event in scalars] == pytest.approx(expected)


def test_no_tracker_is_opened_or_imported_unless_chosen(tmp_path: Path) -> None:
    with open_trackers(TelemetrySettings(), tmp_path, "none", {}) as trackers:
        trackers(step_record(1))
    assert list(tmp_path.iterdir()) == [] and "wandb" not in sys.modules and "mlflow" not in sys.modules


def test_a_chosen_tracker_that_is_not_installed_is_refused_by_package_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A None entry in sys.modules is how Python marks a module as not importable.
    monkeypatch.setitem(sys.modules, "wandb", None)
    settings = TelemetrySettings(trackers=["tensorboard", "wandb"])
    with pytest.raises(TrackerUnavailable, match="pip install wandb"):
        open_trackers(settings, tmp_path, "missing", {})
    assert not (tmp_path / "tensorboard").exists()  # refused before any tracker was opened


def test_an_unknown_tracker_name_is_a_settings_error() -> None:
    with pytest.raises(ValueError, match="telemetry.trackers"):
        load_settings(overrides=["telemetry.trackers=[comet]"], environ={})

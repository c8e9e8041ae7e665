"""Experiment trackers: the learner's step records, as numbers, to TensorBoard, Weights & Biases or MLflow.

`telemetry.trackers` names which (none by default). Each writes under the run folder: TensorBoard event
files in <run_dir>/tensorboard, W&B's run files in <run_dir>/wandb (WANDB_MODE=offline keeps them there
without a network; `wandb sync` uploads them later), MLflow's local store in <run_dir>/mlflow.db (SQLite:
MLflow 3 refuses its ./mlruns folder store, which it keeps in maintenance mode). A tracker's
package is imported only when it is chosen, and a chosen one that is not installed is refused before any
record is sent (TrackerUnavailable). Prometheus stays the live view; these keep a run's history where users
of TRL and verl look for it.
"""

from __future__ import annotations

import importlib.util
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from services.settings.models import TelemetrySettings

# The module each tracker imports, and the pip package that provides it.
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                   "mlflow": ("mlflow", "mlflow")}
NOT_METRICS = ("step", "time")  # the x axis and the wall clock, not series


class TrackerUnavailable(RuntimeError):
    """A tracker named in telemetry.trackers is not installed."""


class Tracker(Protocol):
    """What every adapter does: take one step's numbers, and flush and close at the end."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record the step's numbers."""

    def close(self) -> None:
        """Flush and release the tracker's files or run."""


def numeric_fields(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """A step record's numbers by name; nested mappings become 'parent/key' (accuracy_by_budget/tau=0.94).

    Strings and lists (group ids, budget labels) are not series and are left out; booleans count as 0/1.
    """
    numbers: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if not prefix and key in NOT_METRICS:
            continue
        if isinstance(value, Mapping):
            numbers |= numeric_fields(value, f"{name}/")
        elif isinstance(value, bool | int | float):
            numbers[name] = float(value)
    return numbers


def flat_settings(settings: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Resolved settings as 'section.key' -> text: the hyperparameters W&B and MLflow show beside the run."""
    flat: dict[str, str] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat |= flat_settings(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class TensorBoardTracker:
    """Scalars in TensorBoard event files (torch's SummaryWriter), one series per record field."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """One scalar per field at this step; flushed, so a running TensorBoard sees each step."""
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        """Close the event file."""
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run (online, or offline with WANDB_MODE=offline) with the settings as its config."""

    def __init__(self, run_dir: Path, run_name: str, project: str, settings: Mapping[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=project, name=run_name, dir=str(run_dir), config=dict(settings))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """The step's numbers at the learner's step (not W&B's own counter, so resumed runs line up)."""
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        """Finish the run (offline: its files stay in <run_dir>/wandb)."""
        self.run.finish()


class MlflowTracker:
    """An MLflow run in a local SQLite store, through MlflowClient (no process-wide active run)."""

    # MLflow refuses metric and param names outside these characters ('=' of budget labels among them).
    INVALID_NAME = re.compile(r"[^\w\-. /]")

    def __init__(self, run_dir: Path, run_name: str, project: str, settings: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir).resolve()
        self.client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            project, artifact_location=(run_dir / "mlartifacts").as_uri())  # not ./mlartifacts of the cwd
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(self.INVALID_NAME.sub("_", key), value[:500]) for key, value in flat_settings(settings).items()]
        for start in range(0, len(params), 100):  # log_batch takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """The step's finite numbers in one batch (MLflow refuses NaN in some stores)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(self.INVALID_NAME.sub("_", name), value, now, step)
                 for name, value in metrics.items() if math.isfinite(value)]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def close(self) -> None:
        """Mark the run finished."""
        self.client.set_terminated(self.run_id)


class Trackers:
    """The chosen trackers behind one on_step callback; a context manager that closes them all."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    def __call__(self, record: Mapping[str, Any]) -> None:
        """Send one step record's numbers to every tracker."""
        if not self.trackers:
            return
        metrics = numeric_fields(record)
        for tracker in self.trackers:
            tracker.log(int(record["step"]), metrics)

    def close(self) -> None:
        """Flush and close every tracker."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def check_trackers_installed(names: Sequence[str]) -> None:
    """Refuse, naming the pip packages, when a chosen tracker cannot be imported."""
    missing = [TRACKER_MODULES[name][1] for name in names if importlib.util.find_spec(TRACKER_MODULES[name][0]) is None]
    if missing:
        raise TrackerUnavailable(
            f"telemetry.trackers names {', '.join(missing)}, which is not installed here: "
            f"pip install {' '.join(missing)} (or take it out of telemetry.trackers)"
        )


def open_trackers(settings: TelemetrySettings, run_dir: Path, run_name: str,
                  resolved_settings: Mapping[str, Any]) -> Trackers:
    """The trackers telemetry.trackers names, writing under run_dir; none imported unless named."""
    check_trackers_installed(settings.trackers)
    run_dir = Path(run_dir)
    trackers = Trackers()
    try:
        for name in dict.fromkeys(settings.trackers):  # each once, in the order given
            if name == "tensorboard":
                trackers.trackers.append(TensorBoardTracker(run_dir / "tensorboard"))
            elif name == "wandb":
                trackers.trackers.append(WandbTracker(run_dir, run_name, settings.tracker_project, resolved_settings))
            else:
                trackers.trackers.append(
                    MlflowTracker(run_dir, run_name, settings.tracker_project, resolved_settings))
    except BaseException:
        trackers.close()  # the ones already open, so no half-set-up run is left behind
        raise
    return trackers

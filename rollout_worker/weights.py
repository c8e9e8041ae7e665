"""Follow the learner's weight announcements: copy each new version privately, verify the copy, load it.

A reload is all-or-nothing. The announced folder is copied into this worker's own staging folder while its
hash is computed over the bytes written (services.weights.store.copy_verified_weights), and the engine loads
that copy: a version pruned, truncated or rewritten in the shared folder after the check is never what the
engine reads. If the engine's load fails part-way (it reloads its generator and its scorer one after the
other), the last good folder is loaded again into every part, so the worker keeps serving one version.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import redis

from services.schemas import DecodeError, WeightVersion
from services.telemetry import WeightSyncMetrics
from services.weights.store import WeightIntegrityError, copy_verified_weights, latest_weight_version

log = logging.getLogger(__name__)


class WeightRollbackError(RuntimeError):
    """A failed load could not be undone: the engine's parts may hold two versions, so it must not serve."""


class WeightWatcher:
    """Polls the run's latest WeightVersion and loads newer ones; a bad or failed one leaves the old in place.

    initial_folder is the folder the engine was started from: the one reloaded if the first load fails.
    A version whose hash does not match is refused at once; one whose folder is missing or whose load fails
    is retried on later polls, max_attempts times in all, then refused.
    """

    def __init__(
        self,
        client: redis.Redis,
        run_name: str,
        load: Callable[[Path], None],
        *,
        initial_version: int = 0,
        initial_folder: Path | None = None,
        poll_s: float = 1.0,
        metrics: WeightSyncMetrics | None = None,
        service: str = "rollout_worker",
        staging_root: Path | None = None,
        max_attempts: int = 3,
    ) -> None:
        self.client = client
        self.run_name = run_name
        self.load = load
        self.version = initial_version
        self.folder = Path(initial_folder) if initial_folder is not None else None  # what the engine runs now
        self.poll_s = poll_s
        self.metrics = metrics
        self.service = service
        self.max_attempts = max_attempts
        self.refused: dict[int, str] = {}
        self.attempts: dict[int, int] = {}
        self._next_poll_at = 0.0
        # Private (mode 0700) and local: nothing else can change a copy between its check and its load.
        self.staging = Path(tempfile.mkdtemp(prefix="sf-weights-", dir=staging_root))
        self._remove_staging = weakref.finalize(self, shutil.rmtree, self.staging, ignore_errors=True)
        if metrics:
            metrics.policy_version.labels(service).set(initial_version)

    def close(self) -> None:
        """Remove this watcher's private copies (the engine holds the weights in memory)."""
        self._remove_staging()

    def maybe_update(self, force: bool = False) -> bool:
        """Load the latest announced version if it is newer and verifies; True when weights changed."""
        now = time.monotonic()
        if not force and now < self._next_poll_at:
            return False
        self._next_poll_at = now + self.poll_s
        try:
            announced = latest_weight_version(self.client, self.run_name)
        except DecodeError as error:
            self._refuse(-1, "unreadable", f"unreadable announcement: {error}")
            return False
        if announced is None or announced.version <= self.version or announced.version in self.refused:
            return False
        return self._load(announced)

    def _load(self, announced: WeightVersion) -> bool:
        started = time.perf_counter()
        copy = self.staging / f"v{announced.version:06d}"
        shutil.rmtree(copy, ignore_errors=True)  # a failed attempt's leftovers
        try:
            copy_verified_weights(announced, copy)
        except WeightIntegrityError as error:
            shutil.rmtree(copy, ignore_errors=True)
            self._refuse(announced.version, "integrity", str(error))
            return False
        except OSError as error:  # the folder is gone or not visible yet, or a file vanished mid-copy
            shutil.rmtree(copy, ignore_errors=True)
            self._failed(announced.version, "io", f"{type(error).__name__}: {error}")
            return False
        try:
            self.load(copy)
        except Exception as error:  # noqa: BLE001 - any engine error: some parts may hold the new weights
            self._roll_back(announced.version, error)
            shutil.rmtree(copy, ignore_errors=True)
            self._failed(announced.version, "load", f"{type(error).__name__}: {error}")
            return False
        previous, self.folder = self.folder, copy
        if previous is not None and previous.is_relative_to(self.staging):
            shutil.rmtree(previous, ignore_errors=True)
        elapsed = time.perf_counter() - started
        self.version = announced.version
        if self.metrics:
            self.metrics.sync_seconds.observe(elapsed)
            self.metrics.policy_version.labels(self.service).set(announced.version)
        log.info("loaded weights", extra={"version": announced.version, "seconds": round(elapsed, 3)})
        return True

    def _roll_back(self, version: int, error: Exception) -> None:
        """Load the last good folder into every part of the engine again, after v`version` failed part-way."""
        if self.folder is None:
            raise WeightRollbackError(
                f"loading weights v{version} failed and no earlier folder is known to reload: {error}"
            ) from error
        log.warning("weight load failed; reloading the previous version",
                    extra={"version": version, "previous": self.version, "error": str(error)})
        try:
            self.load(self.folder)
        except Exception as rollback_error:
            raise WeightRollbackError(
                f"loading weights v{version} failed ({error}), and reloading v{self.version} from {self.folder} "
                f"failed too: {rollback_error}"
            ) from rollback_error

    def _failed(self, version: int, kind: str, reason: str) -> None:
        """Count a failed attempt; the version is retried on later polls until max_attempts, then refused."""
        self.attempts[version] = self.attempts.get(version, 0) + 1
        if self.attempts[version] >= self.max_attempts:
            self._refuse(version, kind, f"{reason} (after {self.attempts[version]} attempts)")
            return
        if self.metrics:
            self.metrics.sync_failures.labels(kind).inc()
        log.error("weight load failed; keeping the old version",
                  extra={"version": version, "attempt": self.attempts[version], "reason": reason})

    def _refuse(self, version: int, kind: str, reason: str) -> None:
        self.refused[version] = reason
        if self.metrics:
            self.metrics.sync_failures.labels(kind).inc()
        log.error("refused weights", extra={"version": version, "reason": reason})

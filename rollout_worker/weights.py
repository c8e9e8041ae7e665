"""Follow the learner's weight announcements: verify each new version's hash, then hand it to the engine."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import redis

from services.schemas import DecodeError, WeightVersion
from services.telemetry import WeightSyncMetrics
from services.weights import WeightIntegrityError, latest_weight_version, verify_weights

log = logging.getLogger(__name__)


class WeightWatcher:
    """Polls the run's latest WeightVersion and loads newer ones; a bad blob is refused, the old kept."""

    def __init__(
        self,
        client: redis.Redis,
        run_name: str,
        load: Callable[[Path], None],
        *,
        initial_version: int = 0,
        poll_s: float = 1.0,
        metrics: WeightSyncMetrics | None = None,
        service: str = "rollout_worker",
    ) -> None:
        self.client = client
        self.run_name = run_name
        self.load = load
        self.version = initial_version
        self.poll_s = poll_s
        self.metrics = metrics
        self.service = service
        self.refused: dict[int, str] = {}
        self._next_poll_at = 0.0
        if metrics:
            metrics.policy_version.labels(service).set(initial_version)

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
        try:
            folder = verify_weights(announced)
            self.load(folder)
        except WeightIntegrityError as error:
            self._refuse(announced.version, "integrity", str(error))
            return False
        elapsed = time.perf_counter() - started
        self.version = announced.version
        if self.metrics:
            self.metrics.sync_seconds.observe(elapsed)
            self.metrics.policy_version.labels(self.service).set(announced.version)
        log.info("loaded weights", extra={"version": announced.version, "seconds": round(elapsed, 3)})
        return True

    def _refuse(self, version: int, kind: str, reason: str) -> None:
        self.refused[version] = reason
        if self.metrics:
            self.metrics.sync_failures.labels(kind).inc()
        log.error("refused weights", extra={"version": version, "reason": reason})

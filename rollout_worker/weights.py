"""Follow the learner's weight announcements: verify each new version as it is loaded, or keep the old one.

A reload is all-or-nothing, and what is checked is what is loaded. Two ways, by what the engine offers:
- in place (``load_verified``, for versions written in one pass with a chunk manifest): the worker hard-links
  the version's files into its own staging folder (free on the same tmpfs; it keeps the bytes alive if the
  learner prunes the version) and the engine reads them once into its weights, each chunk hashed in the
  worker's memory as it arrives (services.weights.stream.verified_tensors). A chunk that does not match
  fails the load, and the previous version is loaded again, verified the same way.
- by folder (``load``): the version is first copied into the worker's private folder while its hash is
  computed over the bytes written (services.weights.store.copy_verified_weights), and the engine loads the copy.
If the engine's load fails part-way (it reloads its generator and its scorer one after the other), the last
good version is loaded again into every part, so the worker keeps serving one version.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from services.schemas import DecodeError, WeightVersion
from services.telemetry import WeightSyncMetrics
from services.weights.store import WeightIntegrityError, copy_verified_weights, latest_weight_version
from services.weights.stream import link_version, verified_tensors

log = logging.getLogger(__name__)


def worker_folder_prefix() -> str:
    """Name start of this host's worker folders in a weights root; the owner's process tag follows."""
    return f".worker-{socket.gethostname()}-"


def process_tag(pid: int) -> str | None:
    """'<pid>.<start time>' of a live process (its start time tells a reused pid apart), or None if none runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{pid}.{stat.rsplit(')', 1)[1].split()[19]}"  # field 22, counted after the parenthesised name


def remove_dead_worker_folders(root: Path) -> list[Path]:
    """Remove the folders that workers on this host left in the weights root when they died (killed before
    ``close``): their hard links would pin versions in a tmpfs's memory. Returns what was removed."""
    removed = []
    for folder in Path(root).glob(f"{worker_folder_prefix()}*"):
        tag = folder.name.removeprefix(worker_folder_prefix()).split("-", 1)[0]
        pid = tag.split(".", 1)[0]
        if pid.isdigit() and process_tag(int(pid)) != tag:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def reload_vllm_verified(llm: Any, weight_version: WeightVersion) -> None:
    """Reload a vLLM engine's weights in place from a manifest version, each chunk verified as it is read.

    The tensors go through vLLM's own ``reload_weights(weights_iterator=...)`` (its loader maps checkpoint
    names and fuses q/k/v as on a folder reload), so the engine core must run in this process
    (rollout.vllm_in_process): a generator cannot cross to another one. Raises WeightIntegrityError on a
    chunk that does not match, or if vLLM stopped reading before the last chunk was checked.
    """
    finished: list[bool] = []

    def every_tensor() -> Iterator[tuple[str, Any]]:
        yield from verified_tensors(weight_version)
        finished.append(True)  # reached only after the last chunk's check

    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": every_tensor()})
    if not finished:
        raise WeightIntegrityError(f"weights v{weight_version.version}: vLLM stopped reading before the end, so "
                                   "the last chunks were never checked")


class WeightRollbackError(RuntimeError):
    """A failed load could not be undone: the engine's parts may hold two versions, so it must not serve."""


class WeightWatcher:
    """Polls the run's latest WeightVersion and loads newer ones; a bad or failed one leaves the old in place.

    initial_folder is the folder the engine was started from: the one reloaded if the first load fails.
    load_verified(version): loads a manifest version in place, raising WeightIntegrityError on a chunk that
    does not match (the engine's ``load_verified``); without it every version goes through ``load``.
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
        load_verified: Callable[[WeightVersion], None] | None = None,
    ) -> None:
        self.client = client
        self.run_name = run_name
        self.load = load
        self.load_verified = load_verified
        self.loaded: WeightVersion | None = None  # the running version, when it was loaded in place
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
        self._links: dict[Path, Path] = {}  # weights root -> this worker's private folder in it
        self._cleanups = [weakref.finalize(self, shutil.rmtree, self.staging, ignore_errors=True)]
        if metrics:
            metrics.policy_version.labels(service).set(initial_version)

    def close(self) -> None:
        """Remove this watcher's private copies and links (the engine holds the weights in memory)."""
        for cleanup in self._cleanups:
            cleanup()

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
        in_place = announced.manifest_blake3 is not None and self.load_verified is not None
        local = self._own_folder(announced) / f"v{announced.version:06d}"
        shutil.rmtree(local, ignore_errors=True)  # a failed attempt's leftovers
        try:
            if in_place:
                target: WeightVersion | Path = link_version(announced, local)
            else:
                target = copy_verified_weights(announced, local)
        except WeightIntegrityError as error:
            shutil.rmtree(local, ignore_errors=True)
            self._refuse(announced.version, "integrity", str(error))
            return False
        except OSError as error:  # the folder is gone or not visible yet, or a file vanished mid-copy
            shutil.rmtree(local, ignore_errors=True)
            self._failed(announced.version, "io", f"{type(error).__name__}: {error}")
            return False
        try:
            self._run_load(target)
        except Exception as error:  # noqa: BLE001 - any engine error: some parts may hold the new weights
            self._roll_back(announced.version, error)
            shutil.rmtree(local, ignore_errors=True)
            if isinstance(error, WeightIntegrityError):  # the bytes are bad: no retry will make them good
                self._refuse(announced.version, "integrity", str(error))
            else:
                self._failed(announced.version, "load", f"{type(error).__name__}: {error}")
            return False
        previous, self.folder = self.folder, local
        self.loaded = target if isinstance(target, WeightVersion) else None
        if previous is not None and any(previous.is_relative_to(own) for own in (self.staging, *self._links.values())):
            shutil.rmtree(previous, ignore_errors=True)  # the old links: the learner's prune can free its bytes
        elapsed = time.perf_counter() - started
        self.version = announced.version
        if self.metrics:
            self.metrics.sync_seconds.observe(elapsed)
            self.metrics.policy_version.labels(self.service).set(announced.version)
        log.info("loaded weights", extra={"version": announced.version, "seconds": round(elapsed, 3),
                                          "in_place": in_place})
        return True

    def _own_folder(self, announced: WeightVersion) -> Path:
        """This worker's private folder beside the announced version, made once per weights root: hard links
        cannot cross file systems, and a private copy on the same tmpfs stays in memory. The staging folder
        when that one cannot be made (link_version then copies)."""
        root = Path(announced.uri).parent
        if root not in self._links:
            try:
                remove_dead_worker_folders(root)
                folder = Path(tempfile.mkdtemp(prefix=f"{worker_folder_prefix()}{process_tag(os.getpid())}-", dir=root))
                self._cleanups.append(weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True))
            except OSError:  # not there yet, or not writable for this worker
                return self.staging
            self._links[root] = folder
        return self._links[root]

    def _run_load(self, target: WeightVersion | Path) -> None:
        """Load a linked manifest version in place (verified as read), or a verified private folder."""
        if isinstance(target, WeightVersion):
            assert self.load_verified is not None  # a WeightVersion target is only made when it is set
            self.load_verified(target)
        else:
            self.load(target)

    def _roll_back(self, version: int, error: Exception) -> None:
        """Load the last good version into every part of the engine again, after v`version` failed part-way."""
        if self.folder is None:
            raise WeightRollbackError(
                f"loading weights v{version} failed and no earlier folder is known to reload: {error}"
            ) from error
        log.warning("weight load failed; reloading the previous version",
                    extra={"version": version, "previous": self.version, "error": str(error)})
        try:
            self._run_load(self.loaded if self.loaded is not None else self.folder)
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

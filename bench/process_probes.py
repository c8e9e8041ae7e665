"""Watching a process tree from outside: peak memory (summed PSS) and py-spy profiles grouped into phases.

Used by bench/vs_trl.py, which runs each side as a child process and measures every process under it
(redis, reward server, vLLM worker and engine core, Ray and the learner for our stack; one Python for TRL).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

import psutil


def tree_memory_bytes(root_pid: int) -> int:
    """Summed proportional set size (PSS: shared pages split between their users) of root_pid and descendants."""
    try:
        root = psutil.Process(root_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            info = process.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


class MemorySampler:
    """Samples a process tree's summed PSS in a thread; `peak_bytes` is the largest sample."""

    def __init__(self, root_pid: int, interval_s: float = 1.0) -> None:
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_memory_bytes(self.root_pid))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def find_descendant(root_pid: int, matches: Callable[[psutil.Process], bool]) -> int | None:
    """The pid of the first descendant of root_pid that `matches`, or None."""
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for process in children:
        try:
            if matches(process):
                return process.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


def cmdline_contains(text: str) -> Callable[[psutil.Process], bool]:
    """A matcher for find_descendant: the process title or command line contains text."""
    return lambda process: text in " ".join(process.cmdline()) or text in process.name()


def py_spy_binary() -> str | None:
    """py-spy next to this interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.is_file() else shutil.which("py-spy")


def start_py_spy(pid: int, out_path: Path, duration_s: int, rate_hz: int = 20) -> subprocess.Popen | None:
    """`py-spy record` of pid in collapsed-stack form (non-blocking: the target is never paused); None if absent."""
    binary = py_spy_binary()
    if binary is None:
        return None
    return subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--duration", str(duration_s), "--rate", str(rate_hz),
         "--nonblocking", "--threads", "--format", "raw", "--output", str(out_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def read_collapsed(path: Path, busiest_thread_only: bool = True) -> list[tuple[list[str], int]]:
    """py-spy's raw output (recorded with --threads): (frames root-first, sample count) per distinct stack.

    With busiest_thread_only, only the thread with the most samples is kept (a trainer's or an engine's main
    loop; helper threads would otherwise add their own samples on top of it).
    """
    stacks: list[tuple[list[str], int]] = []
    if not path.is_file():
        return stacks
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    if busiest_thread_only and stacks:
        per_thread: Counter[str] = Counter()
        for frames, count in stacks:
            per_thread[frames[0]] += count
        busiest = per_thread.most_common(1)[0][0]
        stacks = [(frames[1:], count) for frames, count in stacks if frames[0] == busiest]
    return stacks


def top_leaf_frames(stacks: list[tuple[list[str], int]], count: int = 8) -> list[tuple[str, float]]:
    """The frames the samples ended in most often (self time), with their share of the samples."""
    leaves: Counter[str] = Counter()
    for frames, samples in stacks:
        if frames:
            leaves[frames[-1]] += samples
    total = sum(leaves.values()) or 1
    return [(frame, samples / total) for frame, samples in leaves.most_common(count)]


def phase_shares(stacks: list[tuple[list[str], int]], phases: Sequence[tuple[str, Callable[[list[str]], bool]]],
                 ) -> tuple[dict[str, float], int]:
    """Share of the samples in each phase (first matching phase wins; the rest is 'other'), and the sample count."""
    counts: Counter[str] = Counter()
    for frames, count in stacks:
        name = next((name for name, matches in phases if matches(frames)), "other")
        counts[name] += count
    total = sum(counts.values())
    return ({name: counts[name] / total for name in [*(p for p, _ in phases), "other"] if counts[name]}
            if total else {}), total


def any_frame(*needles: str) -> Callable[[list[str]], bool]:
    """A phase matcher: some frame of the stack contains one of the needles."""
    return lambda frames: any(needle in frame for frame in frames for needle in needles)


def wait_for(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.5) -> bool:
    """Poll until predicate() is true or timeout_s passes; returns whether it became true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return False

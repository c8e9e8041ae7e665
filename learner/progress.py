"""Progress of long work that reads well anywhere: a live rich view on a terminal, and one plain line per
learner step or per chunk of work when stdout is a file or a pipe (`make demo > demo.log`, `ray job logs`),
where a live view would show nothing until it ends.

The plain lines are also the interface between processes: the demo reads sf-eval's chunk lines from its
pipe (`parse_chunk_line`) and draws them as its own progress bars.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import rich
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

CHUNK_LINE = re.compile(r"^(?P<label>[^:\n]+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\S+) \(\d+%\)")
RATE_WINDOW = 10  # recent records the rate and the ETA are measured over


def format_step(record: dict[str, object]) -> str:
    """One progress line for a step's log record."""
    return (
        f"step {record['step']} loss={record['loss']:.4f} kl={record.get('kl_mean', 0.0):.4g} "
        f"reward={record['reward_total']:.3f} acc={record['accuracy']:.3f} "
        f"reduction={record['reduction_ratio']:.3f} grad_norm={record['grad_norm']:.3g} "
        f"version={record['policy_version']} step_s={record['step_seconds']:.2f}"
    )


def format_duration(seconds: float | None) -> str:
    """H:MM:SS, or '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def step_line(record: dict[str, object], total_steps: int | None, rollouts_per_s: float | None,
              eta_s: float | None) -> str:
    """The plain line of one learner step: format_step, then throughput, steps done of planned, and ETA."""
    rate = "?" if rollouts_per_s is None else f"{rollouts_per_s:.2f}"
    return (f"{format_step(record)} rollouts/s={rate} steps={record['step']}/{total_steps or '?'} "
            f"eta={format_duration(eta_s)}")


def stdout_is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether progress should be drawn live (a terminal) or written as plain lines (file, pipe, Ray log)."""
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except ValueError:  # a closed stream
        return False


def planned_steps(max_steps: int | None, dataset_paths: Iterable[Path], epochs: int, groups_per_step: int) -> int | None:
    """Steps the learner will take: max_steps, or fewer when the data runs out first (None if unknown).

    Counts the datasets' non-blank lines, as the trainer feeds them (a bad line, even one that is not UTF-8,
    makes the count one high: the trainer dead-letters it, and the estimate need not be exact).
    """
    lines = 0
    for path in dataset_paths:
        try:
            with Path(path).open("rb") as handle:
                lines += sum(1 for line in handle if line.strip())
        except OSError:
            return max_steps
    by_data = max(1, math.ceil(lines * epochs / groups_per_step))
    return min(max_steps, by_data) if max_steps else by_data


class StepClock:
    """Rollouts/s and ETA of a learner run from its step records' wall times (the last RATE_WINDOW steps)."""

    def __init__(self, total_steps: int | None, rollouts_per_group: int, started: float | None = None) -> None:
        self.total_steps = total_steps
        self.rollouts_per_group = rollouts_per_group
        # Until two records arrived, the run's start is the only earlier point (start-up time included).
        self.points: deque[tuple[float, int, int]] = deque(maxlen=RATE_WINDOW + 1)
        self.started = time.time() if started is None else started

    def update(self, record: dict[str, Any]) -> tuple[float | None, float | None]:
        """Take one step record; return (trained rollouts per second, seconds to the planned last step)."""
        rollouts = len(record.get("group_ids") or []) * self.rollouts_per_group
        now = float(record.get("time") or time.time())
        total = (self.points[-1][2] if self.points else 0) + rollouts
        first = self.points[0] if self.points else (self.started, int(record["step"]) - 1, 0)
        self.points.append((now, int(record["step"]), total))
        elapsed, steps = now - first[0], int(record["step"]) - first[1]
        if elapsed <= 0 or steps <= 0:
            return None, None
        rate = (total - first[2]) / elapsed
        eta = None
        if self.total_steps is not None:
            eta = max(0, self.total_steps - int(record["step"])) * elapsed / steps
        return rate, eta


def live_progress(console: Console) -> Progress:
    """A rich progress display: label, bar, done/total, elapsed and remaining time."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console)


class StepProgress:
    """The learner's on_step view: a rich bar with the last step's numbers on a terminal, else plain lines.

    Plain lines start with `prefix` ('progress: ' in sf-train, which `ray job logs` readers grep for).
    """

    def __init__(self, total_steps: int | None, rollouts_per_group: int, *, live: bool | None = None,
                 prefix: str = "progress: ", console: Console | None = None) -> None:
        self.clock = StepClock(total_steps, rollouts_per_group)
        self.live = stdout_is_terminal() if live is None else live
        self.prefix = prefix
        self.progress: Progress | None = None
        if self.live:
            self.progress = live_progress(console or rich.get_console())
            self.task = self.progress.add_task("learner: waiting for the first step", total=total_steps)
            self.progress.start()

    def __call__(self, record: dict[str, Any]) -> None:
        """Show one step record."""
        rate, eta = self.clock.update(record)
        if self.progress is None:
            print(self.prefix + step_line(record, self.clock.total_steps, rate, eta), flush=True)
            return
        self.progress.update(self.task, completed=int(record["step"]), description=(
            f"step {record['step']} reward {record['reward_total']:.3f} acc {record['accuracy']:.3f} "
            f"reduction {record['reduction_ratio']:.3f} KL {record.get('kl_mean', 0.0):.4f} "
            f"v{record['policy_version']} {0.0 if rate is None else rate:.1f} rollouts/s"))

    def close(self) -> None:
        """Stop the live bar (a no-op for plain lines)."""
        if self.progress is not None:
            self.progress.stop()


class ChunkProgress:
    """Work done in chunks of a known total (evaluation batches, SFT steps): a rich bar on a terminal,
    one plain `label: done/total unit (pct%) rate unit/s eta H:MM:SS key=value...` line per chunk otherwise."""

    def __init__(self, label: str, total: int, unit: str = "items", *, live: bool | None = None,
                 console: Console | None = None) -> None:
        self.label, self.total, self.unit, self.done = label, total, unit, 0
        self.live = stdout_is_terminal() if live is None else live
        self.console = console or rich.get_console()
        self.started = time.monotonic()
        self.progress: Progress | None = None

    def __enter__(self) -> Self:
        if self.live:
            self.progress = live_progress(self.console)
            self.task = self.progress.add_task(self.label, total=self.total)
            self.progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.progress is not None:
            self.progress.stop()

    def advance(self, amount: int = 1, **fields: object) -> None:
        """Count `amount` more units done; `fields` (e.g. loss=0.12) go on the line or the bar's label."""
        self.done += amount
        extra = " ".join(f"{key}={value}" for key, value in fields.items())
        if self.progress is not None:
            self.progress.update(self.task, advance=amount, description=f"{self.label} {extra}".strip())
            return
        print(chunk_line(self.label, self.done, self.total, self.unit, time.monotonic() - self.started, extra),
              flush=True)

    def note(self, text: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)


def chunk_line(label: str, done: int, total: int, unit: str, elapsed_s: float, extra: str = "") -> str:
    """The plain line of one finished chunk: done/total, percentage, rate and ETA (CHUNK_LINE parses it)."""
    rate = done / elapsed_s if elapsed_s > 0 else None
    eta = (total - done) / rate if rate else None
    share = 100 * done // total if total else 100
    line = (f"{label}: {done}/{total} {unit} ({share}%) "
            f"{'?' if rate is None else f'{rate:.2f}'} {unit}/s eta {format_duration(eta)}")
    return f"{line} {extra}" if extra else line


def parse_chunk_line(line: str) -> tuple[str, int, int] | None:
    """(label, done, total) of a chunk_line, or None for any other line."""
    match = CHUNK_LINE.match(line.strip())
    if match is None:
        return None
    return match["label"], int(match["done"]), int(match["total"])

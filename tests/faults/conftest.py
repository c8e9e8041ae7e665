"""Fixtures of the fault-injection suite (`make test-faults`), and the table it prints at the end.

Each scenario appends one row to the session's table: tasks in, trained, dead-lettered, lost, trained twice
and valid tasks not trained (each must be 0), the time to recover and what else it measured. The table is printed after the run and written to runs/faults/fault_table.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fault_harness import REPO, FaultLoop, write_dataset

ROWS = pytest.StashKey[list]()
TABLE_JSON = REPO / "runs" / "faults" / "fault_table.json"
COLUMNS = ("scenario", "tasks_in", "trained", "dead_lettered", "lost", "trained_twice", "valid_not_trained",
           "recover_s", "note")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[ROWS] = []


@pytest.fixture()
def fault_table(request: pytest.FixtureRequest) -> list[dict[str, object]]:
    """The session's rows; a scenario appends its ledger's row."""
    return request.config.stash[ROWS]


@pytest.fixture()
def fault_loop(tmp_path: Path) -> Iterator[Callable[..., FaultLoop]]:
    """Make a FaultLoop on `tasks` bundled scene tasks (+ extra raw lines, bad on purpose) with the scenario's
    settings overrides; everything it started is stopped when the test ends, pass or fail."""
    loops: list[FaultLoop] = []

    def make(name: str, tasks: int = 12, extra_lines: tuple[bytes, ...] = (), settings: dict | None = None) -> FaultLoop:
        dataset = write_dataset(tmp_path / "tasks", tasks, extra_lines)
        loop = FaultLoop(name, tmp_path, dataset, bad_lines=len(extra_lines), overrides=settings or {})
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.close()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    rows = config.stash.get(ROWS, [])
    if not rows:
        return
    widths = {column: max(len(column), *(len(str(row[column])) for row in rows)) for column in COLUMNS}
    terminalreporter.section("fault injection: every task trained once or dead-lettered")
    terminalreporter.write_line("  ".join(column.ljust(widths[column]) for column in COLUMNS))
    for row in rows:
        cells = ["—" if row.get(column) in (None, "") else str(row[column]) for column in COLUMNS]
        terminalreporter.write_line("  ".join(cell.ljust(widths[column]) for cell, column in zip(cells, COLUMNS)))
    TABLE_JSON.parent.mkdir(parents=True, exist_ok=True)
    TABLE_JSON.write_text(json.dumps({"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}, indent=1))
    terminalreporter.write_line(f"written to {TABLE_JSON.relative_to(REPO)}")

"""The supervisor of service processes leaves no file handle of its own open."""

from __future__ import annotations

import gc
import sys
import warnings
from pathlib import Path

from services.processes import Supervisor


def test_starting_and_stopping_a_service_leaks_no_file_handle(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)  # an unclosed file warns when it is collected
        with Supervisor(tmp_path) as supervisor:
            service = supervisor.start("echo", [sys.executable, "-c", "print('hello from the child')"])
            service.process.wait(timeout=60)
        gc.collect()
    leaks = [str(warning.message) for warning in caught if issubclass(warning.category, ResourceWarning)]
    assert leaks == []
    assert "hello from the child" in service.log_tail()  # the child still wrote to its log

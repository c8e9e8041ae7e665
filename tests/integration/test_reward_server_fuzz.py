"""Schema-based fuzzing of the live reward server: schemathesis reads the server's /openapi.json, generates
valid and invalid requests (coverage + fuzzing phases), and fails on any 5xx or on a response that breaks the
documented schema, status codes or content types.

The schemathesis CLI is used rather than its pytest plugin: `schemathesis.pytest.from_fixture` (4.32) breaks
on pytest 9 (`'Function' object has no attribute '_nodeid'`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
MAX_EXAMPLES = 150  # per operation and phase; about 5 s here


def test_fuzzing_the_openapi_schema_finds_no_server_error(reward_server, tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("st")),
        "run",
        f"{reward_server.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {reward_server.token}",
        "--checks",
        CHECKS,
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "20260424",
        "--workers",
        "1",
        "--phases",
        "examples,coverage,fuzzing",
    ]
    done = subprocess.run(command, cwd=tmp_path, check=False, capture_output=True, text=True, timeout=300)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-6000:]
    assert "No issues found" in report, report[-3000:]
    assert "Tested: 4" in report, report[-3000:]  # score, healthz, readyz, metrics

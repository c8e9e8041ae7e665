"""Nothing that reads requests, stream payloads or published weights may deserialize pickles or run code.

The code that handles input from outside the process (the reward server's HTTP edge, the queues and their
codecs, the rollout worker, weight announcements and the vLLM plugin's per-request keep sets) is parsed,
and every import or call that can execute what it reads is refused: pickle and friends, eval/exec,
yaml.load, torch.load, numpy.load with pickles, and trust_remote_code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
REQUEST_FACING = ["reward_server", "rollout_worker", "services/schemas", "services/queues", "services/weights",
                  "services/vllm_plugin", "services/rollout"]
CODE_RUNNING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
CODE_RUNNING_BUILTINS = {"eval", "exec", "compile", "__import__"}
CODE_RUNNING_CALLS = {("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("torch", "load")}


def findings(source: str, where: str) -> list[str]:
    """What in one module can run code from its input (empty when nothing can)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [f"{where}:{node.lineno} imports {name}" for name in names
                      if name.split(".")[0] in CODE_RUNNING_MODULES]
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        if isinstance(function, ast.Name) and function.id in CODE_RUNNING_BUILTINS:
            found.append(f"{where}:{node.lineno} calls {function.id}()")
        if isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name):
            call = (function.value.id, function.attr)
            if call in CODE_RUNNING_CALLS or (call[1] == "load" and any(
                    keyword.arg == "allow_pickle" for keyword in node.keywords)):
                found.append(f"{where}:{node.lineno} calls {'.'.join(call)}()")
        for keyword in node.keywords:
            if keyword.arg == "trust_remote_code" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                found.append(f"{where}:{node.lineno} passes trust_remote_code")
    return found


@pytest.mark.parametrize("package", REQUEST_FACING)
def test_request_facing_code_never_runs_what_it_reads(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, package
    problems = [problem for path in files for problem in findings(path.read_text(), str(path.relative_to(REPO)))]
    assert problems == []


def test_the_scan_sees_each_kind_of_code_execution() -> None:
    lines = ["import pickle", "from dill import loads", "eval(text)", "yaml.load(body)", "torch.load(blob)",
             "np.load(path, allow_pickle=True)", "AutoModel.from_pretrained(path, trust_remote_code=True)",
             "yaml.safe_load(body)", "json.loads(body)", "AutoModel.from_pretrained(path, trust_remote_code=False)"]
    source = "\n".join(lines)
    assert [problem.split(" ", 1)[1] for problem in findings(source, "m.py")] == [
        "imports pickle", "imports dill", "calls eval()", "calls yaml.load()", "calls torch.load()",
        "calls np.load()", "passes trust_remote_code",
    ]

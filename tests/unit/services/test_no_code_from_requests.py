"""Nothing that reads requests, stream payloads or published weights may deserialize pickles or run code.

The code that handles input from outside the process (the reward server's HTTP edge, the queues and their
codecs, the rollout worker, weight announcements and the vLLM plugin's per-request keep sets) is parsed,
and every import or call that can execute what it reads is refused: pickle and friends, eval/exec,
yaml.load, torch.load, numpy.load with pickles, and trust_remote_code.

Every other module (the learner reads checkpoints from /runs, which other containers can write) may load
tensors, but never unpickle: no pickle-family load/loads/Unpickler, and torch.load only with weights_only=True.
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
UNPICKLING_FUNCTIONS = {"load", "loads", "Unpickler"}
# Not the project's own code: the test suite (it builds hostile pickles on purpose) and installed packages.
NOT_SCANNED = {"tests", ".venv", "venv", "node_modules", "runs", "build", "dist"}


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


def unpickling_findings(source: str, where: str) -> list[str]:
    """Calls in one module that unpickle: pickle-family load/loads/Unpickler, torch.load without
    weights_only=True, or any weights_only that is not the constant True (empty when there are none)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        if isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name):
            call = (function.value.id, function.attr)
            if call[0] in CODE_RUNNING_MODULES and call[1] in UNPICKLING_FUNCTIONS:
                found.append(f"{where}:{node.lineno} calls {'.'.join(call)}()")
            if call == ("torch", "load") and not any(keyword.arg == "weights_only" for keyword in node.keywords):
                found.append(f"{where}:{node.lineno} calls torch.load() without weights_only=True")
        for keyword in node.keywords:
            if keyword.arg == "weights_only" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is True):
                found.append(f"{where}:{node.lineno} passes weights_only={ast.unparse(keyword.value)}")
    return found


def project_modules() -> list[Path]:
    """Every .py file of the project's own code: outside tests, virtualenvs, run outputs and hidden folders."""
    return sorted(
        path for path in REPO.rglob("*.py")
        if not any(part in NOT_SCANNED or part.startswith(".") for part in path.relative_to(REPO).parts[:-1])
    )


def test_no_project_code_unpickles() -> None:
    files = project_modules()
    assert REPO / "learner" / "checkpoint.py" in files and not any("tests" in p.parts for p in files)
    problems = [problem for path in files
                for problem in unpickling_findings(path.read_text(), str(path.relative_to(REPO)))]
    assert problems == []


def test_the_unpickling_scan_sees_each_kind() -> None:
    lines = ["pickle.load(handle)", "pickle.loads(blob)", "cloudpickle.loads(blob)", "pickle.Unpickler(handle)",
             "torch.load(path)", "torch.load(path, weights_only=False)", "torch.load(path, weights_only=flag)",
             "torch.load(path, weights_only=True)", "pickle.dumps(value)", "json.loads(body)"]
    assert [problem.split(" ", 1)[1] for problem in unpickling_findings("\n".join(lines), "m.py")] == [
        "calls pickle.load()", "calls pickle.loads()", "calls cloudpickle.loads()", "calls pickle.Unpickler()",
        "calls torch.load() without weights_only=True", "passes weights_only=False", "passes weights_only=flag",
    ]


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

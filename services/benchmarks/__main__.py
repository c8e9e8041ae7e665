"""`python -m services.benchmarks FORMAT PATH --out DIR`: a benchmark as a task JSONL the learner trains on.

Writes DIR/tasks.jsonl (one Task per line, images relative to it) and copies the images to DIR/images/.
Point `learner.datasets` at DIR/tasks.jsonl to RL-train on the benchmark's questions with the same judge
(answer types yes_no, choice, vqa, relaxed) that sf-eval uses on it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from services.benchmarks import FORMATS, Benchmark, load_benchmark
from services.data.loader import DatasetError

JSONL_NAME = "tasks.jsonl"


def write_tasks(benchmark: Benchmark, out: Path) -> Path:
    """benchmark's tasks as out/tasks.jsonl with their images copied under out/images/; returns the JSONL path."""
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for entry in benchmark.items:
        relative = Path("images") / entry.item.task.image
        target = out / relative
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(entry.item.image_path, target)
        lines.append(entry.item.task.model_copy(update={"image": relative.as_posix()}).model_dump_json(
            exclude_none=True) + "\n")
    jsonl = out / JSONL_NAME
    jsonl.write_text("".join(lines), encoding="utf-8")
    return jsonl


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, convert, print where the JSONL is; exit 2 with the reasons on a bad benchmark file."""
    parser = argparse.ArgumentParser(prog="python -m services.benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("format", choices=[name for name in FORMATS if name != "tasks"], help="benchmark format")
    parser.add_argument("path", type=Path, help="; ".join(f"{name}: {what}" for name, what in FORMATS.items()))
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for tasks.jsonl and images/")
    parser.add_argument("--circular", action="store_true", help="mmbench: one task per rotation of the options")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as decoded:
            jsonl = write_tasks(load_benchmark(args.format, args.path, Path(decoded), args.circular), args.out)
    except (DatasetError, FileNotFoundError, ValueError) as error:
        print(f"python -m services.benchmarks: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {jsonl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

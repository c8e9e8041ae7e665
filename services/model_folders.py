"""Is a path a model checkpoint folder? Answered without importing torch, so a CLI can refuse a wrong path at once."""

from __future__ import annotations

from pathlib import Path

REQUIRED_FILES = ("config.json",)


class ModelFolderMissing(FileNotFoundError):
    """The path given as a model is not a checkpoint folder (or lacks its config.json)."""


def check_model_folder(path: str | Path) -> Path:
    """The path as a Path, or ModelFolderMissing naming what is missing."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelFolderMissing(f"{folder} is not a model folder: no such directory")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelFolderMissing(f"{folder} is not a model folder: missing {', '.join(missing)}")
    return folder

"""Read a task JSONL file: every line validated, every bad line reported as file:line, none skipped."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from pydantic import ValidationError

from services.data.video import Video, load_video
from services.schemas.models import Task

MAX_REPORTED_ERRORS = 50


class DatasetError(ValueError):
    """A dataset file has bad lines; `errors` lists each as 'file:line: reason'."""

    def __init__(self, path: Path, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        shown = errors[:MAX_REPORTED_ERRORS]
        more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        super().__init__(f"{len(errors)} bad line(s) in {path}:\n" + "\n".join(shown) + more)


@dataclass(frozen=True)
class DatasetItem:
    """A validated task with the absolute path of its image, or of its video (a frame folder or a file)."""

    task: Task
    image_path: Path

    @property
    def is_video(self) -> bool:
        """Whether ``image_path`` names a video (``services.data.video.load_video`` reads it)."""
        return self.task.is_video


def _reason(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in issue['loc']) or 'line'}: {issue['msg']}" for issue in error.errors()
    )


def resolve_image(root: Path, relative: str) -> Path:
    """The image's path inside `root`; refuse absolute paths and ones that escape it (e.g. '../')."""
    if Path(relative).is_absolute():
        raise ValueError(f"image={relative!r} is absolute; it must be relative to the JSONL file")
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise ValueError(f"image={relative!r} escapes the dataset folder {root}")
    return resolved


def parse_line(text: str, root: Path, check_image: bool = True) -> DatasetItem:
    """Validate one JSONL line against the Task schema and locate its image; raise ValueError with the reason."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")  # noqa: TRY004 (a line error)
    try:
        task = Task.model_validate(raw)
    except ValidationError as error:
        raise ValueError(_reason(error)) from None
    field = "video" if task.is_video else "image"
    try:
        media_path = resolve_image(root, task.media)
    except ValueError as error:
        raise ValueError(str(error).replace("image=", f"{field}=", 1)) from None
    if check_image and task.is_video and not (media_path.is_dir() or media_path.is_file()):
        raise ValueError(f"video={task.media!r} does not exist ({media_path}); expected a frame folder or a file")
    if check_image and not task.is_video and not media_path.is_file():
        raise ValueError(f"image={task.media!r} does not exist ({media_path})")
    return DatasetItem(task=task, image_path=media_path)


def load_dataset(path: str | Path, check_images: bool = True) -> list[DatasetItem]:
    """All items of a JSONL file; raise DatasetError listing every bad line (file:line: reason)."""
    jsonl_path = Path(path)
    if not jsonl_path.is_file():
        raise FileNotFoundError(f"dataset file {jsonl_path} does not exist")
    root = jsonl_path.parent
    items: list[DatasetItem] = []
    errors: list[str] = []
    seen_ids: dict[str, int] = {}
    with jsonl_path.open(encoding="utf-8") as lines:
        for line_number, text in enumerate(lines, start=1):
            if not text.strip():
                errors.append(f"{jsonl_path}:{line_number}: empty line")
                continue
            try:
                item = parse_line(text, root, check_image=check_images)
            except ValueError as error:
                errors.append(f"{jsonl_path}:{line_number}: {error}")
                continue
            if item.task.id in seen_ids:
                errors.append(
                    f"{jsonl_path}:{line_number}: id={item.task.id!r} repeats line {seen_ids[item.task.id]}"
                )
                continue
            seen_ids[item.task.id] = line_number
            items.append(item)
    if errors:
        raise DatasetError(jsonl_path, errors)
    if not items:
        raise DatasetError(jsonl_path, [f"{jsonl_path}:0: the file holds no tasks"])
    return items


def open_media(item: DatasetItem) -> Image.Image | Video:
    """The item's image as RGB, or its video's frames (``services.data.video.load_video``)."""
    return load_video(item.image_path) if item.is_video else open_image(item.image_path)


def open_image(path: str | Path) -> Image.Image:
    """Open an image as RGB (the bundled digit grids are stored greyscale)."""
    with Image.open(path) as image:
        return image.convert("RGB")

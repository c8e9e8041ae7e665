"""Read a task's video: a folder of PNG frames or a video file (OpenCV), as RGB frames plus their frame rate.

Qwen2.5-VL merges every ``temporal_patch_size`` (2) consecutive frames into one temporal slot of visual
tokens, so a video needs at least two frames. A folder of frames plays at ``FOLDER_FPS`` frames per second
(its frames are read in file-name order); a file plays at the rate it records. Every failure is a
``VideoError`` that names the path and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MIN_FRAMES = 2  # one temporal patch of Qwen2.5-VL's vision tower
MAX_FRAMES = 768  # the bundled processor's max_frames
FOLDER_FPS = 2.0  # a frame folder plays at 2 frames per second: one temporal slot per second
FRAME_SUFFIXES = (".png",)


class VideoError(ValueError):
    """A video that cannot be used: missing, unreadable, too short, or with frames of different sizes."""


@dataclass(frozen=True)
class Video:
    """Decoded frames (T, H, W, 3) uint8 RGB and the rate they play at (frames per second)."""

    frames: np.ndarray
    fps: float

    @property
    def num_frames(self) -> int:
        """T, the number of frames."""
        return int(self.frames.shape[0])

    def metadata(self) -> dict[str, Any]:
        """The per-video metadata vLLM's Qwen2.5-VL processor takes beside the frames (every frame is used)."""
        return {
            "fps": self.fps, "duration": self.num_frames / self.fps, "total_num_frames": self.num_frames,
            "frames_indices": list(range(self.num_frames)), "video_backend": "opencv", "do_sample_frames": False,
        }

    def seconds_per_grid(self, temporal_patch_size: int = 2) -> float:
        """Seconds one temporal slot of visual tokens spans: temporal_patch_size / fps."""
        return temporal_patch_size / self.fps


def _checked(frames: list[np.ndarray], path: Path, fps: float) -> Video:
    if len(frames) < MIN_FRAMES:
        raise VideoError(f"video {path} has {len(frames)} frame(s); at least {MIN_FRAMES} are needed")
    if len(frames) > MAX_FRAMES:
        raise VideoError(f"video {path} has {len(frames)} frames; at most {MAX_FRAMES} are read")
    shapes = {frame.shape for frame in frames}
    if len(shapes) != 1:
        raise VideoError(f"video {path} has frames of different sizes: {sorted(shapes)}")
    if not fps > 0:
        raise VideoError(f"video {path} reports a frame rate of {fps}; it must be positive")
    return Video(frames=np.stack(frames), fps=float(fps))


def _read_folder(path: Path) -> Video:
    names = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    frames = []
    for name in names:
        try:
            with Image.open(name) as image:
                frames.append(np.asarray(image.convert("RGB")))
        except OSError as error:
            raise VideoError(f"frame {name} of video {path} is not a readable image ({error})") from None
    return _checked(frames, path, FOLDER_FPS)


def _read_file(path: Path) -> Video:
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise VideoError(f"video file {path} cannot be opened by OpenCV (not a video, or an unknown codec)")
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        frames = []
        while len(frames) <= MAX_FRAMES:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    return _checked(frames, path, fps)


def load_video(path: str | Path) -> Video:
    """Frames and frame rate of a frame folder or a video file; raise VideoError with the reason."""
    video_path = Path(path)
    if video_path.is_dir():
        return _read_folder(video_path)
    if video_path.is_file():
        return _read_file(video_path)
    raise VideoError(f"video {video_path} does not exist (expected a folder of PNG frames or a video file)")


def frame_images(video: Video) -> list[Image.Image]:
    """The frames as PIL images (what the HF video processor takes)."""
    return [Image.fromarray(frame) for frame in video.frames]

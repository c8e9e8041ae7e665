"""Write the bundled task families' splits, deterministically by seed.

Two consumers, two files: `make base-model` (learner/sft.py) trains on the `train` split and its `train-*`
parts, and RL (the learner, `make demo`) on the `rl` split, drawn from a random stream SFT never uses (the
same digit-image pool as train, never val's or test's). Nothing here runs unasked: the learner only reads
its datasets, and a missing one is a `MissingDataset` error that names the command that builds it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.data.digits import DigitGridSpec, generate_digit_grids
from services.data.moving_digits import MovingDigitSpec, generate_moving_digits
from services.data.scenes import SceneSpec, generate_scenes
from services.data.writer import SPLITS, split_seed, write_split

TASK_FAMILIES: tuple[str, ...] = ("scenes", "digits")  # the image families the bundled base model learns
VIDEO_FAMILIES: tuple[str, ...] = ("video",)  # moving digits (services.data.moving_digits), built when asked
ALL_FAMILIES: tuple[str, ...] = TASK_FAMILIES + VIDEO_FAMILIES
_FAMILY_SALT = {"scenes": 11, "digits": 23, "video": 37}
RL_SPLIT = "rl"  # RL's own split; SFT's parts are named train and train-<px>, so no file or stream is shared
RL_ITEMS = 2000
BUNDLED_SPLITS: tuple[str, ...] = (*SPLITS, RL_SPLIT)


class MissingDataset(FileNotFoundError):
    """A dataset file that is not there; the message says which command builds it."""


class SplitSizes(BaseModel):
    """How many items each split holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: int = Field(6000, ge=0, description="Training items.")
    val: int = Field(200, ge=0, description="Validation items.")
    test: int = Field(300, ge=0, description="Test items.")
    rl: int = Field(RL_ITEMS, ge=0, description="RL training items (the learner's split; SFT never reads it).")


def _generate(
    family: str, seed: int, name: str, count: int, scene_spec: SceneSpec | None, digit_spec: DigitGridSpec | None,
    pool: str, video_spec: MovingDigitSpec | None = None,
):
    """The family's item generator for split or part `name`, seeded by (seed, name, family)."""
    rng = np.random.default_rng(split_seed(seed, name, _FAMILY_SALT[family]))
    if family == "scenes":
        return generate_scenes(rng, scene_spec or SceneSpec(), name, count)
    if family == "video":
        return generate_moving_digits(rng, video_spec or MovingDigitSpec(), name, count, pool=pool)
    return generate_digit_grids(rng, digit_spec or DigitGridSpec(), name, count, pool=pool)


def build_family(
    family: str,
    out_dir: str | Path,
    seed: int = 0,
    sizes: SplitSizes | None = None,
    scene_spec: SceneSpec | None = None,
    digit_spec: DigitGridSpec | None = None,
    splits: tuple[str, ...] = SPLITS,
    video_spec: MovingDigitSpec | None = None,
) -> dict[str, Path]:
    """Generate the requested splits of one family into out_dir/<family>/; return split -> JSONL path.

    The rl split draws from the train digit pool (held apart from val and test) on its own random stream.
    """
    if family not in ALL_FAMILIES:
        raise ValueError(f"family={family!r} is not one of {ALL_FAMILIES}")
    sizes = sizes or SplitSizes()
    family_dir = Path(out_dir) / family
    written: dict[str, Path] = {}
    for split in splits:
        count = getattr(sizes, split)
        pool = "train" if split == RL_SPLIT else split
        items = _generate(family, seed, split, count, scene_spec, digit_spec, pool=pool, video_spec=video_spec)
        written[split] = write_split(items, family_dir, split, total=count, label=family)
    return written


def build_part(
    family: str,
    out_dir: str | Path,
    name: str,
    count: int,
    seed: int = 0,
    scene_spec: SceneSpec | None = None,
    digit_spec: DigitGridSpec | None = None,
) -> Path:
    """Generate a named extra training part (e.g. 'train-56', small images) from the train digit pool."""
    if family not in ALL_FAMILIES:
        raise ValueError(f"family={family!r} is not one of {ALL_FAMILIES}")
    if name in ("val", "test", RL_SPLIT):
        raise ValueError(f"part name={name!r} would overwrite an evaluation or the RL split")
    items = _generate(family, seed, name, count, scene_spec, digit_spec, pool="train")
    return write_split(items, Path(out_dir) / family, name, total=count, label=family)


def build_all(
    out_dir: str | Path,
    seed: int = 0,
    sizes: SplitSizes | None = None,
    scene_spec: SceneSpec | None = None,
    digit_spec: DigitGridSpec | None = None,
    splits: tuple[str, ...] = BUNDLED_SPLITS,
) -> dict[str, dict[str, Path]]:
    """Generate every bundled family (every split, the RL one included); return family -> split -> JSONL path."""
    return {
        family: build_family(family, out_dir, seed, sizes, scene_spec, digit_spec, splits)
        for family in TASK_FAMILIES
    }


def bundled_family(jsonl_path: str | Path) -> str | None:
    """The family of a bundled split path (<root>/<family>/<split>.jsonl), or None for any other file."""
    path = Path(jsonl_path)
    return path.parent.name if path.parent.name in ALL_FAMILIES else None


def build_command(jsonl_path: str | Path) -> str:
    """The command that builds a bundled RL split at jsonl_path."""
    path = Path(jsonl_path)
    return f"python -m services.data --out {path.parent.parent} --family {path.parent.name} --split {RL_SPLIT}"


def require_dataset(jsonl_path: str | Path) -> Path:
    """The path of an existing dataset file; a missing one raises MissingDataset naming what builds it."""
    path = Path(jsonl_path)
    if path.is_file():
        return path
    if bundled_family(path) and path.stem == RL_SPLIT:
        hint = f"build it with `{build_command(path)}` (`make demo` builds it before it starts)"
    elif bundled_family(path) and path.stem.startswith("train"):
        hint = (f"it is SFT data, written by `make base-model`; RL trains on {path.with_name(RL_SPLIT + '.jsonl')}"
                f" (`{build_command(path)}`)")
    else:
        hint = "check learner.datasets"
    raise MissingDataset(f"dataset file {path} does not exist; {hint}")


def prepare_rl_split(
    jsonl_path: str | Path, count: int = RL_ITEMS, seed: int = 0, say: Callable[[str], None] = print
) -> Path:
    """An explicit preparation step: build a missing bundled RL split, saying what it writes.

    Any other missing file raises MissingDataset; an existing file is left as it is.
    """
    path = Path(jsonl_path)
    if path.is_file() or not (bundled_family(path) and path.stem == RL_SPLIT):
        return require_dataset(path)
    say(f"building the RL split: {count} {path.parent.name} tasks into {path} (as `{build_command(path)}`)")
    sizes = SplitSizes(**{name: (count if name == RL_SPLIT else 0) for name in BUNDLED_SPLITS})
    return build_family(path.parent.name, path.parent.parent, seed=seed, sizes=sizes, splits=(RL_SPLIT,))[RL_SPLIT]

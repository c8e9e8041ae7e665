"""Write the bundled task families' train/val/test splits, deterministically by seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.data.digits import DigitGridSpec, generate_digit_grids
from services.data.scenes import SceneSpec, generate_scenes
from services.data.writer import SPLITS, split_seed, write_split

TASK_FAMILIES: tuple[str, ...] = ("scenes", "digits")
_FAMILY_SALT = {"scenes": 11, "digits": 23}


class SplitSizes(BaseModel):
    """How many items each split holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: int = Field(6000, ge=0, description="Training items.")
    val: int = Field(200, ge=0, description="Validation items.")
    test: int = Field(300, ge=0, description="Test items.")


def _generate(
    family: str, seed: int, name: str, count: int, scene_spec: SceneSpec | None, digit_spec: DigitGridSpec | None,
    pool: str,
):
    """The family's item generator for split or part `name`, seeded by (seed, name, family)."""
    rng = np.random.default_rng(split_seed(seed, name, _FAMILY_SALT[family]))
    if family == "scenes":
        return generate_scenes(rng, scene_spec or SceneSpec(), name, count)
    return generate_digit_grids(rng, digit_spec or DigitGridSpec(), name, count, pool=pool)


def build_family(
    family: str,
    out_dir: str | Path,
    seed: int = 0,
    sizes: SplitSizes | None = None,
    scene_spec: SceneSpec | None = None,
    digit_spec: DigitGridSpec | None = None,
    splits: tuple[str, ...] = SPLITS,
) -> dict[str, Path]:
    """Generate the requested splits of one family into out_dir/<family>/; return split -> JSONL path."""
    if family not in TASK_FAMILIES:
        raise ValueError(f"family={family!r} is not one of {TASK_FAMILIES}")
    sizes = sizes or SplitSizes()
    family_dir = Path(out_dir) / family
    written: dict[str, Path] = {}
    for split in splits:
        count = getattr(sizes, split)
        items = _generate(family, seed, split, count, scene_spec, digit_spec, pool=split)
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
    if family not in TASK_FAMILIES:
        raise ValueError(f"family={family!r} is not one of {TASK_FAMILIES}")
    if name in ("val", "test"):
        raise ValueError(f"part name={name!r} would overwrite an evaluation split")
    items = _generate(family, seed, name, count, scene_spec, digit_spec, pool="train")
    return write_split(items, Path(out_dir) / family, name, total=count, label=family)


def build_all(
    out_dir: str | Path,
    seed: int = 0,
    sizes: SplitSizes | None = None,
    scene_spec: SceneSpec | None = None,
    digit_spec: DigitGridSpec | None = None,
    splits: tuple[str, ...] = SPLITS,
) -> dict[str, dict[str, Path]]:
    """Generate every bundled family; return family -> split -> JSONL path."""
    return {
        family: build_family(family, out_dir, seed, sizes, scene_spec, digit_spec, splits)
        for family in TASK_FAMILIES
    }


def ensure_bundled_split(jsonl_path: str | Path, count: int, seed: int = 0) -> Path:
    """Generate a missing bundled split (<root>/<family>/<split>.jsonl) deterministically; others must exist.

    The train splits are not committed (they regenerate from the seed), so a fresh clone builds them on
    first use; a path that is not a bundled family's split is only checked.
    """
    path = Path(jsonl_path)
    if path.is_file():
        return path
    family, split = path.parent.name, path.stem
    if family not in TASK_FAMILIES or split not in SPLITS:
        raise FileNotFoundError(f"dataset file {path} does not exist")
    sizes = SplitSizes(**{name: (count if name == split else 0) for name in SPLITS})
    return build_family(family, path.parent.parent, seed=seed, sizes=sizes, splits=(split,))[split]

"""Fresh evaluation splits: the committed split's generator recipe, drawn again from a seed no recipe was tuned on.

The committed val/test splits have been looked at while recipes were tuned (SFT, the demo's knobs), so
their accuracy flatters; a split generated at evaluation time from another seed does not. The generator
parameters come from the committed split's `<split>.recipe.json`, so only the draw differs.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.data.build import SplitSizes, build_family
from services.data.digits import DigitGridSpec
from services.data.scenes import SceneSpec

# Never used to generate or tune anything: the SFT recipe, the demo and the benches draw from seed 0.
FRESH_SEED = 2026


def _recipe_path(split_path: Path) -> Path:
    return split_path.with_name(f"{split_path.stem}.recipe.json")


def fresh_split(committed: Path, out_root: Path, seed: int = FRESH_SEED, items: int | None = None) -> Path:
    """Generate out_root/<family>/<split>.jsonl like the committed split (its recorded recipe), from `seed`.

    Reuses an existing one whose recipe matches; refuses the committed split's own seed (that is no fresh draw).
    """
    recipe = json.loads(_recipe_path(committed).read_text())
    if seed == recipe["seed"]:
        raise ValueError(f"seed {seed} is the seed {committed} was drawn from; a fresh split needs another")
    family, split = recipe["family"], recipe["split"]
    fresh_recipe = {**recipe, "seed": seed, "items": items or recipe["items"], "fresh_from": str(committed)}
    path = Path(out_root) / family / f"{split}.jsonl"
    if path.is_file() and _recipe_path(path).is_file() and json.loads(_recipe_path(path).read_text()) == fresh_recipe:
        return path
    spec = recipe["spec"]
    sizes = SplitSizes(**{name: fresh_recipe["items"] if name == split else 0 for name in SplitSizes.model_fields})
    written = build_family(
        family, out_root, seed, sizes, scene_spec=SceneSpec(**spec) if family == "scenes" else None,
        digit_spec=DigitGridSpec(**spec) if family == "digits" else None, splits=(split,))[split]
    _recipe_path(written).write_text(json.dumps(fresh_recipe, indent=2) + "\n")
    return written

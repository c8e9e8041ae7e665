"""CLI: python -m services.data --out DIR [--split rl] [--seed N] [--train N --val N --test N --rl N] ...

The one builder of the bundled task splits: train/val/test (SFT and evaluation) and rl (the learner's)."""

from __future__ import annotations

import argparse
import json

from services.data.build import ALL_FAMILIES, BUNDLED_SPLITS, TASK_FAMILIES, SplitSizes, build_family
from services.data.digits import DigitGridSpec
from services.data.scenes import SceneSpec


def _mix(text: str) -> dict[str, float]:
    """Parse 'kind=weight,kind=weight'."""
    pairs = [part.split("=", 1) for part in text.split(",") if part]
    if any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError(f"question mix {text!r} is not 'kind=weight,...'")
    return {kind.strip(): float(weight) for kind, weight in pairs}


def main(argv: list[str] | None = None) -> None:
    """Generate the bundled task splits."""
    parser = argparse.ArgumentParser(prog="python -m services.data", description=__doc__)
    parser.add_argument("--out", required=True, help="Output folder (one subfolder per family).")
    parser.add_argument("--family", choices=ALL_FAMILIES, action="append",
                        help="Default: every image family (the video family is built when named).")
    parser.add_argument("--split", choices=BUNDLED_SPLITS, action="append", help="Default: every split.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=SplitSizes().train)
    parser.add_argument("--val", type=int, default=SplitSizes().val)
    parser.add_argument("--test", type=int, default=SplitSizes().test)
    parser.add_argument("--rl", type=int, default=SplitSizes().rl, help="Items of the RL split (the learner's).")
    parser.add_argument("--image-size", type=int, default=224, help="Image side in px (224 -> 64 tokens).")
    parser.add_argument("--grid-size", type=int, default=DigitGridSpec().grid_size, help="Digit grid side.")
    parser.add_argument("--min-objects", type=int, default=SceneSpec().min_objects)
    parser.add_argument("--max-objects", type=int, default=SceneSpec().max_objects)
    parser.add_argument("--scene-mix", type=_mix, help="e.g. colour=1,shape=1,position=1,count=1")
    parser.add_argument("--digit-mix", type=_mix, help="e.g. digit_at=3,is_digit=1")
    args = parser.parse_args(argv)
    scene_fields = {"image_size": args.image_size, "min_objects": args.min_objects,
                    "max_objects": args.max_objects}
    if args.scene_mix:
        scene_fields["question_mix"] = args.scene_mix
    digit_fields = {"image_size": args.image_size, "grid_size": args.grid_size}
    if args.digit_mix:
        digit_fields["question_mix"] = args.digit_mix
    sizes = SplitSizes(train=args.train, val=args.val, test=args.test, rl=args.rl)
    written = {
        family: build_family(family, args.out, args.seed, sizes, SceneSpec(**scene_fields),
                             DigitGridSpec(**digit_fields), tuple(args.split or BUNDLED_SPLITS))
        for family in args.family or TASK_FAMILIES
    }
    print(json.dumps({family: {s: str(p) for s, p in paths.items()} for family, paths in written.items()}))


if __name__ == "__main__":
    main()

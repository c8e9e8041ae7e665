"""The bundled task generators: deterministic by seed, parameterised, and with answers the image supports."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.data import SplitSizes, build_family, load_dataset
from services.data.digits import DigitGridSpec, digit_pool, generate_digit_grids, render_grid
from services.data.layout import load_layouts
from services.data.scenes import COLOURS, SceneSpec, generate_scenes, render_scene, sample_scene

SMALL = SplitSizes(train=6, val=3, test=5)


def _fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("family", ["scenes", "digits"])
def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path, family: str) -> None:
    build_family(family, tmp_path / "a", seed=3, sizes=SMALL)
    build_family(family, tmp_path / "b", seed=3, sizes=SMALL)
    build_family(family, tmp_path / "c", seed=4, sizes=SMALL)
    first = _fingerprint(tmp_path / "a")
    assert first == _fingerprint(tmp_path / "b")
    assert first != _fingerprint(tmp_path / "c")
    for split, count in (("train", 6), ("val", 3), ("test", 5)):
        items = load_dataset(tmp_path / "a" / family / f"{split}.jsonl")
        assert len(items) == count and all(item.task.id.startswith(f"{family}-{split}-") for item in items)


def test_digit_pools_of_the_splits_share_no_image() -> None:
    pools = {split: digit_pool(split)[0].reshape(-1, 64) for split in ("train", "val", "test")}
    assert sum(len(images) for images in pools.values()) == 1797
    seen = {split: {row.tobytes() for row in images} for split, images in pools.items()}
    # load_digits holds a handful of exact duplicate bitmaps; the pools are disjoint by index, and almost
    # entirely by content.
    assert len(seen["train"] & seen["test"]) <= 3
    assert len(seen["train"] & seen["val"]) <= 3


def test_test_grids_only_draw_digits_from_the_test_pool() -> None:
    spec = DigitGridSpec(position_tint=0)
    pool_images, _ = digit_pool("test")
    one_cell = DigitGridSpec(image_size=spec.cell_pixels, grid_size=1, position_tint=0)
    rendered_pool = {render_grid(image[None], one_cell).tobytes() for image in pool_images}
    _task, grid, _layout = next(generate_digit_grids(np.random.default_rng(0), spec, "test", 1))
    cell = spec.cell_pixels
    for row in range(spec.grid_size):
        for column in range(spec.grid_size):
            crop = grid.crop((column * cell, row * cell, (column + 1) * cell, (row + 1) * cell))
            assert crop.tobytes() in rendered_pool


def test_digit_question_answers_the_digit_drawn_in_that_cell() -> None:
    spec = DigitGridSpec(image_size=112, grid_size=2, question_mix={"digit_at": 1.0}, position_tint=0)
    images, labels = digit_pool("val")
    single = DigitGridSpec(image_size=56, grid_size=1, position_tint=0)
    by_bitmap = {render_grid(image[None], single).tobytes(): int(label) for image, label in zip(images, labels)}
    for task, grid, _layout in generate_digit_grids(np.random.default_rng(1), spec, "val", 20):
        row, column = _asked_cell(task.question)
        crop = grid.crop((column * 56, row * 56, (column + 1) * 56, (row + 1) * 56))
        assert by_bitmap[crop.tobytes()] == int(task.answer)


def test_scene_colour_answer_matches_the_pixels_of_that_shape() -> None:
    spec = SceneSpec(question_mix={"colour": 1.0})
    rng = np.random.default_rng(5)
    for task, image, _layout in generate_scenes(rng, spec, "test", 30):
        present = _colours_present(np.asarray(image))
        if task.question.startswith("What colour"):
            assert task.answer in present
        assert image.size == (224, 224)


def _asked_cell(question: str) -> tuple[int, int]:
    words = question.rstrip("?").replace(",", "").split()
    return int(words[words.index("row") + 1]) - 1, int(words[words.index("column") + 1]) - 1


def _colours_present(pixels: np.ndarray) -> set[str]:
    """Names of the object colours drawn anywhere in an (H, W, 3) array."""
    flat = pixels.reshape(-1, 3)
    return {name for name, rgb in COLOURS.items() if (flat == rgb).all(axis=1).any()}


def _colours_in_cell(image: Image.Image, cell: tuple[int, int], cell_pixels: int) -> set[str]:
    row, column = cell
    crop = np.asarray(image)[row * cell_pixels:(row + 1) * cell_pixels, column * cell_pixels:(column + 1) * cell_pixels]
    return _colours_present(crop)


def test_scene_questions_by_cell_are_answered_by_the_pixels_of_that_cell() -> None:
    spec = SceneSpec(question_mix={"colour_at": 1.0, "is_at": 1.0})
    answers: dict[str, list[str]] = {"colour_at": [], "is_at": []}
    for task, image, layout in generate_scenes(np.random.default_rng(3), spec, "test", 80):
        cell = _asked_cell(task.question)
        present = _colours_in_cell(image, cell, spec.cell_pixels)
        if task.question.startswith("What colour"):
            assert present == {task.answer}
            answers["colour_at"].append(task.answer)
        else:
            colour = task.question.split()[2]
            assert task.answer == ("yes" if colour in present else "no")
            answers["is_at"].append(task.answer)
            assert [tuple(c) for c in layout.answer_cells] == [cell]
    assert len(set(answers["colour_at"])) >= 4
    assert 0.3 < answers["is_at"].count("yes") / len(answers["is_at"]) < 0.7


def test_scene_shape_by_cell_names_the_shape_of_that_cells_object() -> None:
    spec = SceneSpec(question_mix={"shape_at": 1.0})
    for task, _image, layout in generate_scenes(np.random.default_rng(4), spec, "test", 30):
        (asked,) = [o for o in layout.cells if (o.row, o.column) == _asked_cell(task.question)]
        assert task.answer == asked.shape


def test_scene_object_count_is_the_number_of_shapes_drawn_and_is_read_from_every_cell() -> None:
    spec = SceneSpec(question_mix={"count_objects": 1.0})
    counts = []
    for task, image, layout in generate_scenes(np.random.default_rng(6), spec, "test", 30):
        drawn = len(_colours_present(np.asarray(image)))
        assert task.question == "How many objects are there?" and task.answer == str(drawn)
        assert len(layout.answer_cells) == spec.cells_per_side**2
        counts.append(drawn)
    assert set(counts) == {2, 3}


def test_scene_objects_sit_in_distinct_cells_with_distinct_colours() -> None:
    spec = SceneSpec(image_size=448, min_objects=4, max_objects=6)
    rng = np.random.default_rng(0)
    for _ in range(50):
        objects = sample_scene(rng, spec)
        assert 4 <= len(objects) <= 6
        assert len({o.colour for o in objects}) == len(objects)
        assert len({(o.row, o.column) for o in objects}) == len(objects)
        assert all(0 <= o.row < spec.cells_per_side == 4 for o in objects)
    assert render_scene(rng, objects, spec).size == (448, 448)


def test_question_mix_controls_which_questions_are_asked() -> None:
    only_count = SceneSpec(question_mix={"count": 1.0, "colour": 0.0})
    tasks = [item.task for item in generate_scenes(np.random.default_rng(2), only_count, "train", 20)]
    assert all(task.question.startswith("How many") and task.answer.isdigit() for task in tasks)
    only_yes_no = DigitGridSpec(question_mix={"is_digit": 1.0})
    answers = [item.task.answer for item in generate_digit_grids(np.random.default_rng(2), only_yes_no, "val", 40)]
    assert set(answers) == {"yes", "no"}


@pytest.mark.parametrize(
    ("factory", "fields", "message"),
    [
        (SceneSpec, {"image_size": 230}, "multiple of cell_pixels"),
        (SceneSpec, {"cell_pixels": 50}, "multiple of 28"),
        (SceneSpec, {"min_objects": 5, "max_objects": 3}, "objects range"),
        (SceneSpec, {"question_mix": {"size": 1.0}}, "question_mix"),
        (SceneSpec, {"question_mix": {"count": -1.0, "colour": 2.0}}, "negative"),
        (DigitGridSpec, {"image_size": 224, "grid_size": 3}, "multiple of 28\\*grid_size"),
        (DigitGridSpec, {"question_mix": {"digit_at": 0.0}}, "question_mix"),
    ],
)
def test_bad_generator_parameters_are_refused_by_name(factory: type, fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory(**fields)


def test_image_size_sets_the_visual_grid_without_resizing(tmp_path: Path) -> None:
    build_family("digits", tmp_path, seed=0, sizes=SplitSizes(train=1, val=1, test=1),
                 digit_spec=DigitGridSpec(image_size=448, grid_size=8), splits=("test",))
    (item,) = load_dataset(tmp_path / "digits" / "test.jsonl")
    assert Image.open(item.image_path).size == (448, 448)


def test_dense_training_questions_name_every_object_and_digit() -> None:
    spec = SceneSpec(question_mix={"list_objects": 1.0})
    rng = np.random.default_rng(7)
    for task, _image, _layout in generate_scenes(rng, spec, "train", 10):
        names = task.answer.split(", ")
        assert 2 <= len(names) <= 3
        assert all(name.split()[0] in COLOURS for name in names)
    grid_spec = DigitGridSpec(question_mix={"read_grid": 1.0})
    task = next(generate_digit_grids(np.random.default_rng(0), grid_spec, "train", 1)).task
    rows = task.answer.split(" ")
    assert len(rows) == 2 and all(len(row) == 2 and row.isdigit() for row in rows)


def test_layouts_record_what_each_answer_is_read_from(tmp_path: Path) -> None:
    build_family("scenes", tmp_path, seed=1, sizes=SplitSizes(train=0, val=0, test=20), splits=("test",))
    build_family("digits", tmp_path, seed=1, sizes=SplitSizes(train=0, val=0, test=20), splits=("test",))
    for family in ("scenes", "digits"):
        jsonl = tmp_path / family / "test.jsonl"
        layouts = load_layouts(jsonl)
        items = load_dataset(jsonl)
        assert set(layouts) == {item.task.id for item in items}
        for item in items:
            layout = layouts[item.task.id]
            if item.task.question.startswith("What colour is the object in"):
                cell = _asked_cell(item.task.question)
                assert [c.colour for c in layout.cells if (c.row, c.column) == cell] == [item.task.answer]
                assert [tuple(c) for c in layout.answer_cells] == [cell]
            if item.task.question.startswith("What digit is in row"):
                cell = _asked_cell(item.task.question)
                assert [c.digit for c in layout.cells if (c.row, c.column) == cell] == [int(item.task.answer)]


def test_position_tint_makes_every_patch_of_the_background_distinct() -> None:
    image = np.asarray(render_scene(np.random.default_rng(0), [], SceneSpec(position_tint=48)), dtype=np.int16)
    patch_means = {tuple(image[r:r + 28, c:c + 28].reshape(-1, 3).mean(axis=0).round())
                   for r in range(0, 224, 28) for c in range(0, 224, 28)}
    assert len(patch_means) == 64
    flat = np.asarray(render_scene(np.random.default_rng(0), [], SceneSpec(position_tint=0)))
    assert (flat == 235).all()
    tinted_digits = np.asarray(render_grid(digit_pool("val")[0][:4], DigitGridSpec(position_tint=48)))
    assert tinted_digits.shape == (224, 224, 3) and tinted_digits[0, -1, 0] < tinted_digits[0, 0, 0]

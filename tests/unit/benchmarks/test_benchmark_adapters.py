"""The benchmark adapters on hand-written items in each benchmark's real layout (tests/fixtures/benchmarks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from services.benchmarks import load_benchmark
from services.benchmarks.__main__ import main as convert_main
from services.benchmarks.__main__ import write_tasks
from services.benchmarks.mmbench import INSTRUCTION, rotate
from services.data.loader import DatasetError, load_dataset
from services.schemas.models import AnswerType

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "benchmarks"
MME = FIXTURES / "mme" / "MME_Benchmark_release_version"
MMBENCH = FIXTURES / "mmbench" / "mmbench_dev_en.tsv"
TEXTVQA = FIXTURES / "textvqa" / "TextVQA_0.5.1_val.json"
CHARTQA = FIXTURES / "chartqa" / "test"


def test_mme_reads_both_folder_layouts_as_yes_no_pairs(tmp_path: Path) -> None:
    items = load_benchmark("mme", MME, tmp_path).items
    assert len(items) == 8 and {entry.item.task.answer_type for entry in items} == {AnswerType.YES_NO}
    by_group: dict[str, list[str]] = {}
    for entry in items:
        by_group.setdefault(entry.group, []).append(entry.item.task.answer)
    assert by_group == {"artwork/10002": ["yes", "no"], "code_reasoning/0020": ["yes", "no"],
                        "existence/000000006040": ["yes", "no"], "existence/000000018150": ["yes", "no"]}
    artwork = items[0].item
    assert artwork.image_path == (MME / "artwork" / "images" / "10002.jpg").resolve()
    assert artwork.task.question == "Does this artwork exist in the form of painting? Please answer yes or no."
    assert [entry.category for entry in items[:3]] == ["artwork", "artwork", "code_reasoning"]


def test_mme_tsv_pairs_questions_by_image_path(tmp_path: Path) -> None:
    items = load_benchmark("mme", MME.parent / "MME.tsv", tmp_path).items
    assert [entry.item.task.id for entry in items] == ["mme/0", "mme/1", "mme/2", "mme/3"]
    assert [entry.group for entry in items] == ["existence/existence/000000006040.jpg"] * 2 + [
        "code_reasoning/code_reasoning/0020.png"] * 2
    assert [entry.item.task.answer for entry in items] == ["yes", "no", "yes", "no"]
    # Rows 1 and 3 hold "0" and "2" in their image cell: they share the decoded image of that row.
    assert items[1].item.image_path == items[0].item.image_path == (tmp_path / "MME" / "0.jpg").resolve()
    assert items[3].item.image_path.name == "2.png"


def test_mme_names_the_bad_line_and_the_missing_image(tmp_path: Path) -> None:
    root = tmp_path / "mme"
    shutil.copytree(MME, root)
    (root / "existence" / "000000018150.txt").write_text("Is there a bus?\tmaybe\n")
    (root / "artwork" / "images" / "10002.jpg").unlink()
    with pytest.raises(DatasetError) as raised:
        load_benchmark("mme", root, tmp_path)
    errors = "\n".join(raised.value.errors)
    assert "000000018150.txt:1: expected 'question<TAB>Yes|No'" in errors
    assert "10002.txt: no image 10002.jpg/.png" in errors


def test_mmbench_prompt_choices_and_shared_images(tmp_path: Path) -> None:
    items = load_benchmark("mmbench", MMBENCH, tmp_path).items
    tasks = [entry.item.task for entry in items]
    assert [task.answer for task in tasks] == ["A", "B", "A", "C"]
    assert tasks[1].question.splitlines() == ["The picture was taken indoors.", "What colour is the background?",
                                              "A. red", "B. orange", "C. green", "D. blue", INSTRUCTION]
    assert tasks[0].question.startswith("What animal is shown?\nA. cat")  # 'nan' hint left out
    assert tasks[2].choices == ["yes", "no"]  # empty C/D cells: two options
    # Row 3's image cell is "2": it shares row 2's decoded image.
    assert items[3].item.image_path == items[2].item.image_path == (tmp_path / "mmbench_dev_en" / "2.png").resolve()
    with Image.open(items[0].item.image_path) as image:
        assert image.size == (32, 32)
    assert [entry.category for entry in items] == ["object_localization", "attribute_recognition", "image_scene", "ocr"]


def test_mmbench_rotations_move_the_answer_with_its_option() -> None:
    options = ["cat", "dog", "bird", "fish"]
    for shift in range(4):
        rotated, right = rotate(options, 1, shift)
        assert rotated[right] == "dog" and sorted(rotated) == sorted(options)


def test_mmbench_refuses_rows_without_answers_and_missing_columns(tmp_path: Path) -> None:
    lines = MMBENCH.read_text().splitlines()
    header = lines[0].split("\t")
    row = lines[1].split("\t")
    row[header.index("answer")] = ""
    broken = tmp_path / "test_split.tsv"
    broken.write_text("\n".join([lines[0], "\t".join(row), *lines[2:]]) + "\n")
    with pytest.raises(DatasetError, match="index 0: answer '' is not one of the 4 option letters"):
        load_benchmark("mmbench", broken, tmp_path)
    no_answer_column = tmp_path / "no_answer.tsv"
    no_answer_column.write_text("index\tquestion\tA\tB\timage\n0\tq\ta\tb\tx\n")
    with pytest.raises(DatasetError, match="missing column"):
        load_benchmark("mmbench", no_answer_column, tmp_path)


def test_textvqa_items_carry_the_ten_human_answers(tmp_path: Path) -> None:
    items = load_benchmark("textvqa", TEXTVQA, tmp_path).items
    task = items[0].item.task
    assert task.answer_type is AnswerType.VQA and task.answer == "coca cola" and len(task.answers) == 10
    assert task.question == "what is the brand of this drink?\nAnswer the question using a single word or phrase."
    assert items[0].item.image_path.name == "0054c91397f2fe05.jpg" and items[0].category == "val"
    assert items[1].item.task.answer == "2"


def test_textvqa_test_split_without_answers_is_refused(tmp_path: Path) -> None:
    shutil.copytree(TEXTVQA.parent / "train_images", tmp_path / "train_images")
    document = json.loads(TEXTVQA.read_text())
    del document["data"][1]["answers"]
    path = tmp_path / "TextVQA_0.5.1_test.json"
    path.write_text(json.dumps(document))
    with pytest.raises(DatasetError, match=r"data\[1\] \(question_id 34603\): has no human answers"):
        load_benchmark("textvqa", path, tmp_path)


def test_chartqa_folder_reads_every_file_with_its_category(tmp_path: Path) -> None:
    items = load_benchmark("chartqa", CHARTQA, tmp_path).items
    assert [entry.category for entry in items] == ["test_augmented"] * 2 + ["test_human"] * 2
    assert {entry.item.task.answer_type for entry in items} == {AnswerType.RELAXED}
    single = load_benchmark("chartqa", CHARTQA / "test_human.json", tmp_path).items
    assert [entry.item.task.answer for entry in single] == ["23.5", "Brazil"]
    assert single[0].item.image_path == (CHARTQA / "png" / "41699051005347.png").resolve()


def test_chartqa_missing_chart_is_named(tmp_path: Path) -> None:
    path = tmp_path / "test_human.json"
    path.write_text(json.dumps([{"imgname": "absent.png", "query": "q?", "label": "1"}, {"query": "q?"}]))
    with pytest.raises(DatasetError) as raised:
        load_benchmark("chartqa", path, tmp_path)
    assert "absent.png does not exist" in raised.value.errors[0]
    assert "[1]: missing field 'label'" in raised.value.errors[1]


@pytest.mark.parametrize(("benchmark_format", "path", "count"),
                         [("mme", MME, 8), ("mmbench", MMBENCH, 14), ("textvqa", TEXTVQA, 3), ("chartqa", CHARTQA, 4)])
def test_converted_jsonl_loads_as_the_same_tasks(tmp_path: Path, benchmark_format: str, path: Path, count: int) -> None:
    benchmark = load_benchmark(benchmark_format, path, tmp_path / "decoded", circular=True)
    jsonl = write_tasks(benchmark, tmp_path / "out")
    loaded = load_dataset(jsonl)
    assert len(loaded) == count
    for original, converted in zip(benchmark.items, loaded):
        assert converted.task.model_dump(exclude={"image"}) == original.item.task.model_dump(exclude={"image"})
        assert converted.image_path.read_bytes() == original.item.image_path.read_bytes()
    again = load_benchmark("tasks", jsonl, tmp_path)
    assert [entry.item.task.id for entry in again.items] == [item.task.id for item in loaded]


def test_converter_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert convert_main(["chartqa", str(CHARTQA), "--out", str(tmp_path / "chartqa")]) == 0
    assert "tasks.jsonl" in capsys.readouterr().out
    assert convert_main(["textvqa", str(tmp_path / "absent.json"), "--out", str(tmp_path / "x")]) == 2
    assert "absent.json does not exist" in capsys.readouterr().err

"""RL has its own split, built only by explicit steps: the learner never writes into a user's task folder, and
no file is written by both `make base-model` (SFT) and RL (#21 item 7)."""

from pathlib import Path

import pytest
import yaml

from learner.demo import DEFAULT_CONFIGS
from learner.feeder import load_tasks
from learner.sft import DEFAULT_TRAIN_PARTS
from services.data.build import (
    RL_SPLIT,
    MissingDataset,
    SplitSizes,
    build_family,
    build_part,
    prepare_rl_split,
)
from services.data.loader import load_dataset
from services.data.writer import split_seed
from services.settings import load_settings

REPO = Path(__file__).resolve().parents[3]
# Every config that trains RL on bundled tasks, on top of the defaults.
RL_CONFIGS = (DEFAULT_CONFIGS, [REPO / "configs/default.yaml", REPO / "configs/learner-local.yaml"],
              [REPO / "configs/default.yaml", REPO / "configs/deploy-cpu.yaml"])


def test_the_learner_reads_a_missing_dataset_as_an_error_naming_its_build_command(tmp_path: Path) -> None:
    path = tmp_path / "digits" / "rl.jsonl"
    with pytest.raises(MissingDataset, match=r"python -m services\.data --out .* --family digits --split rl"):
        load_tasks([path])
    assert list(tmp_path.rglob("*")) == []  # nothing generated behind the user's back
    with pytest.raises(MissingDataset, match="make base-model"):  # SFT's split is not RL's
        load_tasks([tmp_path / "scenes" / "train.jsonl"])
    with pytest.raises(MissingDataset, match="check learner.datasets"):
        load_tasks([tmp_path / "mine" / "tasks.jsonl"])
    assert list(tmp_path.rglob("*")) == []


@pytest.mark.parametrize("configs", RL_CONFIGS, ids=["demo", "learner-local", "deploy-cpu"])
def test_rl_trains_on_a_file_that_sft_never_writes(configs: list[Path]) -> None:
    sft_files = {f"{part.family}/{part.name}.jsonl" for part in DEFAULT_TRAIN_PARTS}
    for dataset in load_settings(configs, environ={}).learner.datasets:
        assert dataset.name == f"{RL_SPLIT}.jsonl", dataset
        assert f"{dataset.parent.name}/{dataset.name}" not in sft_files
    # ...and it is drawn from a random stream that no SFT part or evaluation split uses.
    sft_streams = {tuple(split_seed(0, name, 0)) for name in ("train", "val", "test",
                                                                *(part.name for part in DEFAULT_TRAIN_PARTS))}
    assert tuple(split_seed(0, RL_SPLIT, 0)) not in sft_streams


def test_the_compose_learner_trains_on_the_split_the_image_builds() -> None:
    dockerfile = (REPO / "deploy/docker/Dockerfile").read_text()
    assert "python -m services.data --out assets/tasks --split rl" in dockerfile
    deploy_cpu = yaml.safe_load((REPO / "configs/deploy-cpu.yaml").read_text())
    assert deploy_cpu["learner"]["datasets"] == ["assets/tasks/scenes/rl.jsonl"]


def test_the_rl_split_is_deterministic_and_differs_from_sft_train(tmp_path: Path) -> None:
    sizes = SplitSizes(train=0, val=0, test=0, rl=6)
    first = build_family("digits", tmp_path / "a", sizes=sizes, splits=(RL_SPLIT,))[RL_SPLIT]
    again = build_family("digits", tmp_path / "b", sizes=sizes, splits=(RL_SPLIT,))[RL_SPLIT]
    assert first.read_bytes() == again.read_bytes()
    images = sorted((first.parent / "images" / RL_SPLIT).iterdir())
    assert [p.read_bytes() for p in images] == [p.read_bytes() for p in sorted(again.parent.glob("images/rl/*"))]
    train = build_part("digits", tmp_path / "a", "train", 6)
    rl_questions = [(i.task.question, i.task.answer) for i in load_dataset(first)]
    assert rl_questions != [(i.task.question, i.task.answer) for i in load_dataset(train)]
    with pytest.raises(ValueError, match="RL split"):
        build_part("digits", tmp_path / "a", RL_SPLIT, 6)  # an SFT part cannot take the RL split's name


def test_preparing_builds_only_a_missing_rl_split_and_says_what_it_writes(tmp_path: Path) -> None:
    said: list[str] = []
    path = tmp_path / "scenes" / "rl.jsonl"
    assert prepare_rl_split(path, count=4, say=said.append) == path
    assert len(said) == 1 and str(path) in said[0] and "4 scenes tasks" in said[0]
    built = path.read_bytes()
    assert len(load_dataset(path)) == 4
    prepare_rl_split(path, count=9, say=said.append)  # present: left as it is, nothing said
    assert len(said) == 1 and path.read_bytes() == built
    with pytest.raises(MissingDataset, match="make base-model"):
        prepare_rl_split(tmp_path / "scenes" / "train.jsonl", say=said.append)
    assert not (tmp_path / "scenes" / "train.jsonl").exists() and len(said) == 1

"""The one judge: every evaluation path (sf-eval, the base model's report, SFT progress, the fidelity bench)
judges a completion the way the reward server scores it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import learner.evaluate
from learner.fresh_split import FRESH_SEED, fresh_split
from learner.judging import EvaluationError, judge, judge_item, judged_summary, question_kind
from reward_server.rewards import score_item
from services.data.loader import DatasetItem, load_dataset
from services.schemas.models import AnswerType, ScoreItem, Task
from services.settings.models import RewardSettings

REPO = Path(__file__).resolve().parents[3]


def _item(answer: str, answer_type: str, question: str = "How many circles are there?",
          choices: list[str] | None = None) -> DatasetItem:
    task = Task(id=f"t-{answer}-{answer_type}", image="x.png", question=question, answer=answer,
                answer_type=AnswerType(answer_type), choices=choices)
    return DatasetItem(task=task, image_path=Path("x.png"))


# (reference, answer_type, choices, completion, correct): the cases plain string equality got wrong.
CASES = [
    ("3", "number", None, "3.0", True),
    ("3", "number", None, "three", True),
    ("3", "number", None, "4", False),
    ("B", "choice", ["red", "blue", "green"], "(B)", True),
    ("B", "choice", ["red", "blue", "green"], "blue", True),
    ("B", "choice", ["red", "blue", "green"], "C", False),
    ("yes", "yes_no", None, "Yes.", True),
    ("no", "yes_no", None, "yes", False),
    ("the red circle", "exact", None, "Red circle", True),
]


@pytest.mark.parametrize(("reference", "answer_type", "choices", "completion", "correct"), CASES)
def test_judge_agrees_with_the_reward_servers_score(reference, answer_type, choices, completion, correct) -> None:
    item = _item(reference, answer_type, choices=choices)
    rewarded = score_item(ScoreItem(completion_text=completion, answer=reference, answer_type=answer_type,
                                    choices=choices, visual_tokens_kept=16, visual_tokens_total=64), RewardSettings())
    assert judge(item, completion)[0] is correct
    assert rewarded.correct is correct


def test_sf_eval_and_the_eval_report_use_the_same_judge() -> None:
    # sf-eval calls judge_item (the verdict with its credit); judge is judge_item's (correct, parsed).
    assert learner.evaluate.judge_item is judge_item and learner.evaluate.EvaluationError is EvaluationError
    items = [_item(reference, kind, choices=choices) for reference, kind, choices, _, _ in CASES]
    completions = [completion for *_, completion, _ in CASES]
    summary = judged_summary(items, completions)
    expected = [correct for *_, correct in CASES]
    assert summary["correct"] == sum(expected) and summary["items"] == len(CASES)
    assert summary["accuracy"] == pytest.approx(sum(expected) / len(CASES))
    low, high = summary["accuracy_ci95"]
    assert low < summary["accuracy"] < high
    assert [mistake["got"] for mistake in summary["mistakes"]] == [c for *_, c, ok in CASES if not ok]


def test_a_reference_that_cannot_be_checked_stops_the_evaluation_with_the_task_id() -> None:
    with pytest.raises(EvaluationError, match="t-maybe-yes_no"):
        judge(_item("maybe", "yes_no"), "yes")
    with pytest.raises(ValueError, match="one completion per item"):
        judged_summary([_item("3", "number")], [])


def test_question_kind_blanks_colours_shapes_and_numbers() -> None:
    item = _item("yes", "yes_no", question="Is the red object in row 1, column 2?")
    assert question_kind(item) == "Is the … object in row …, column …?"


@pytest.mark.parametrize("family", ["digits", "scenes"])
def test_fresh_split_draws_the_committed_recipe_from_another_seed(tmp_path: Path, family: str) -> None:
    committed = REPO / "assets" / "tasks" / family / "test.jsonl"
    path = fresh_split(committed, tmp_path, items=12)
    recipe = json.loads(path.with_name("test.recipe.json").read_text())
    committed_recipe = json.loads(committed.with_name("test.recipe.json").read_text())
    assert recipe["seed"] == FRESH_SEED != committed_recipe["seed"] and recipe["spec"] == committed_recipe["spec"]
    fresh, old = load_dataset(path), load_dataset(committed)[:12]
    assert len(fresh) == 12 and all(item.image_path.is_file() for item in fresh)
    assert {question_kind(i) for i in fresh} <= {question_kind(i) for i in load_dataset(committed)}
    assert [(i.task.question, i.task.answer) for i in fresh] != [(i.task.question, i.task.answer) for i in old]
    stamp = path.stat().st_mtime_ns
    assert fresh_split(committed, tmp_path, items=12) == path and path.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="fresh split needs another"):
        fresh_split(committed, tmp_path / "again", seed=committed_recipe["seed"])

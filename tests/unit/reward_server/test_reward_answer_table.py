"""Every row of docs/answer_checking.md's table, checked against the real checkers."""

from __future__ import annotations

from pathlib import Path

import pytest

from reward_server.rewards.checkers import check_answer
from services.schemas.models import AnswerType

DOC = Path(__file__).resolve().parents[3] / "docs" / "answer_checking.md"


def _cell(raw: str) -> str:
    raw = raw.strip()
    if raw.startswith("`") and raw.endswith("`"):
        raw = raw[1:-1]
    return raw.replace("\\n", "\n")


def table_rows() -> list[tuple[str, str, list[str] | None, str, bool, str | None]]:
    """(type, reference, choices, completion, accepted, read_as) for each row of the doc's tables."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = line.split("|")[1:-1]
        if len(cells) != 6 or cells[0].strip() not in {t.value for t in AnswerType}:
            continue
        kind, reference, choices, completion, verdict, read_as = (cell.strip() for cell in cells)
        choice_list = [c.strip() for c in _cell(choices).split(";")] if choices else None
        assert verdict in ("accepted", "rejected"), line
        rows.append(
            (
                kind,
                _cell(reference),
                choice_list,
                _cell(completion),
                verdict == "accepted",
                None if read_as == "—" else _cell(read_as),
            )
        )
    return rows


ROWS = table_rows()


def test_the_table_covers_every_answer_type_both_ways() -> None:
    seen = {(kind, accepted) for kind, _ref, _choices, _completion, accepted, _read in ROWS}
    assert seen == {(t.value, verdict) for t in AnswerType for verdict in (True, False)}
    assert len(ROWS) >= 60


@pytest.mark.parametrize(
    ("kind", "reference", "choices", "completion", "accepted", "read_as"),
    ROWS,
    ids=[f"{row[0]}:{row[3][:40]!r}" for row in ROWS],
)
def test_documented_verdict(
    kind: str, reference: str, choices: list[str] | None, completion: str, accepted: bool, read_as: str | None
) -> None:
    # A 'vqa' row lists its human answers in the choices column.
    answer_type = AnswerType(kind)
    if answer_type is AnswerType.VQA:
        result = check_answer(completion, reference, answer_type, answers=choices)
    else:
        result = check_answer(completion, reference, answer_type, choices)
    assert result.correct is accepted
    assert result.parsed_answer == read_as

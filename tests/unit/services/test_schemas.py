"""Wire models validate what crosses process boundaries, and both codecs round-trip them."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.schemas import (
    Budget,
    DecodeError,
    RewardBreakdown,
    Rollout,
    RolloutRequest,
    ScoreItem,
    Task,
    TaskMessage,
    TrajectoryGroup,
    WeightVersion,
    decode,
    encode,
)

TASK = Task(id="t1", image="img/1.png", question="What colour is the circle?", answer="red", answer_type="exact")


def make_rollout(**changes) -> Rollout:
    fields = {
        "task_id": "t1", "rollout_index": 0, "budget": Budget(kind="keep_ratio", value=0.25),
        "prompt_token_ids": [1, 2, 3], "completion_token_ids": [7, 8], "completion_logprobs": [-0.1, -0.5],
        "completion_text": "red", "kept_indices": [0, 5, 9], "visual_tokens_kept": 3, "visual_tokens_total": 16,
        "policy_version": 4,
    }
    fields.update(changes)
    return Rollout(**fields)


def make_group(rollouts: list[Rollout]) -> TrajectoryGroup:
    reward = RewardBreakdown(correct=True, accuracy=1, efficiency=0.8, format=0, total=1.4)
    return TrajectoryGroup(
        group_id="g1", task=TASK, rollouts=rollouts, rewards=[reward] * len(rollouts), policy_version=4,
        worker_id="w0",
    )


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_every_wire_model_round_trips(codec: str) -> None:
    models = [
        TaskMessage(task=TASK, dataset_root="/data"),
        make_rollout(),
        RolloutRequest(task=TASK, dataset_root="/d", budget=Budget(kind="mass_threshold", value=0.95),
                       group_id="g1", rollout_index=2, seed=7),
        make_group([make_rollout(), make_rollout(rollout_index=1)]),
        WeightVersion(version=3, uri="/tmp/w", sha256="a" * 64, num_bytes=10),
        ScoreItem(completion_text="x", answer="y", answer_type="exact", visual_tokens_kept=1, visual_tokens_total=2),
    ]
    for model in models:
        assert decode(type(model), encode(model, codec), codec) == model


def test_reduction_ratio_is_one_minus_kept_over_total() -> None:
    assert make_rollout().reduction_ratio == pytest.approx(1 - 3 / 16)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kept_indices": [0, 5]}, "visual_tokens_kept=3 but 2 kept_indices"),
        ({"kept_indices": [5, 0, 9]}, "strictly increasing"),
        ({"kept_indices": [0, 0, 9]}, "strictly increasing"),
        ({"kept_indices": [0, 5, 16]}, r"\[0, 16\)"),
        ({"visual_tokens_total": 2, "kept_indices": [0, 1, 2]}, "exceeds"),
        ({"completion_logprobs": [-0.1]}, "1 completion_logprobs for 2"),
        ({"completion_logprobs": [-0.1, math.nan]}, "completion_logprobs"),
        ({"completion_logprobs": [-0.1, 3.0]}, "not a finite log-probability"),
    ],
)
def test_inconsistent_rollouts_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make_rollout(**changes)


def test_a_group_never_mixes_policy_versions() -> None:
    with pytest.raises(ValidationError, match="mixes policy versions"):
        make_group([make_rollout(), make_rollout(policy_version=5)])


def test_choice_tasks_need_choices_and_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="choices"):
        Task(id="t", image="a.png", question="q", answer="B", answer_type="choice")
    with pytest.raises(ValidationError, match="surprise"):
        Task(id="t", image="a.png", question="q", answer="a", answer_type="exact", surprise=1)


def test_newer_schema_versions_are_refused_clearly() -> None:
    payload = encode(TaskMessage(task=TASK, dataset_root="/d"))
    import msgpack

    raw = msgpack.unpackb(payload)
    raw["schema_version"] = 99
    with pytest.raises(DecodeError, match="schema_version"):
        decode(TaskMessage, msgpack.packb(raw))


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_garbage_payloads_raise_decode_error(codec: str) -> None:
    for garbage in (b"", b"\xff\xfe\x00", b"[1,2,3]", b"\x93\x01\x02\x03"):
        with pytest.raises(DecodeError):
            decode(TaskMessage, garbage, codec)


@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_budget_values_outside_zero_one_are_refused(value: float) -> None:
    if 0 < value <= 1:
        assert Budget(kind="mass_threshold", value=value).label.startswith("tau=")
    else:
        with pytest.raises(ValidationError):
            Budget(kind="keep_ratio", value=value)

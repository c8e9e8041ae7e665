"""Fuzzing the wire schemas (hypothesis): whatever bytes arrive on a stream, decode() returns a valid model
or raises DecodeError with a reason; it never raises anything else, and what it accepts round-trips."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.schemas import (
    DecodeError,
    ScoreRequest,
    TaskMessage,
    TrajectoryGroup,
    WeightVersion,
    decode,
    encode,
)

WIRE_MODELS = [TaskMessage, TrajectoryGroup, WeightVersion, ScoreRequest]
CODECS = ["msgpack", "json"]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

integers = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
scalars = (st.none() | st.booleans() | integers | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=40) | st.binary(max_size=40))
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=12) | integers, inner, max_size=5), max_leaves=30)
VALID_TASK = {"task": {"id": "t-1", "image": "a.png", "question": "How many?", "answer": "3",
                       "answer_type": "number"}, "dataset_root": "/data", "epoch": 0}


def decodes_or_refuses(model, payload: bytes, codec: str) -> None:
    try:
        decoded = decode(model, payload, codec)
    except DecodeError as error:
        assert str(error).startswith(f"not a valid {model.__name__}")
        return
    assert decode(model, encode(decoded, codec), codec) == decoded  # accepted means round-trippable


@FUZZ
@given(payload=st.binary(max_size=300), model=st.sampled_from(WIRE_MODELS), codec=st.sampled_from(CODECS))
def test_arbitrary_bytes_decode_or_raise_decode_error(payload: bytes, model, codec: str) -> None:
    decodes_or_refuses(model, payload, codec)


@FUZZ
@given(document=documents, model=st.sampled_from(WIRE_MODELS))
def test_arbitrary_msgpack_documents_decode_or_raise_decode_error(document, model) -> None:
    decodes_or_refuses(model, msgpack.packb(document, use_bin_type=True), "msgpack")


@FUZZ
@given(field=st.sampled_from(["id", "image", "question", "answer", "answer_type", "choices", "extra"]),
       value=scalars | st.lists(scalars, max_size=3), codec=st.sampled_from(CODECS))
def test_one_mutated_task_field_is_accepted_or_refused_cleanly(field: str, value, codec: str) -> None:
    document = {**VALID_TASK, "task": {**VALID_TASK["task"], field: value}}
    payload = msgpack.packb(document, use_bin_type=True) if codec == "msgpack" else _json_bytes(document)
    if payload is not None:
        decodes_or_refuses(TaskMessage, payload, codec)


def _json_bytes(document) -> bytes | None:
    """The document as JSON bytes (None when JSON cannot express it: bytes, NaN keys...)."""
    import json

    try:
        return json.dumps(document, allow_nan=True).encode()
    except (TypeError, ValueError):
        return None


@pytest.mark.parametrize("codec", CODECS)
def test_huge_and_non_utf8_text_fields_get_clear_errors(codec: str) -> None:
    huge = {**VALID_TASK, "task": {**VALID_TASK["task"], "question": "why? " * 5000}}
    payload = msgpack.packb(huge) if codec == "msgpack" else _json_bytes(huge)
    with pytest.raises(DecodeError, match="(?s)question.*at most 8192 characters"):
        decode(TaskMessage, payload, codec)
    raw = encode(TaskMessage.model_validate(VALID_TASK), codec).replace(b"How many?", b"How m\xffny?")
    with pytest.raises(DecodeError, match="utf-8|UTF-8|unicode"):
        decode(TaskMessage, raw, codec)

"""Compact (de)serialization of wire models: msgpack (default) or JSON, chosen by settings."""

from __future__ import annotations

from typing import Literal, TypeVar

import msgpack
from pydantic import BaseModel

ModelT = TypeVar("ModelT", bound=BaseModel)
Codec = Literal["msgpack", "json"]


class DecodeError(ValueError):
    """A payload is not a valid instance of the expected model; the message says why."""


def encode(model: BaseModel, codec: Codec = "msgpack") -> bytes:
    """Serialize a model to bytes in the given codec."""
    if codec == "json":
        return model.model_dump_json().encode("utf-8")
    return msgpack.packb(model.model_dump(mode="json"), use_bin_type=True)


def decode(model_type: type[ModelT], payload: bytes, codec: Codec = "msgpack") -> ModelT:
    """Parse and validate bytes as model_type; raise DecodeError with the reason when it is not."""
    try:
        if codec == "json":
            return model_type.model_validate_json(payload)
        return model_type.model_validate(msgpack.unpackb(payload, raw=False))
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as error:
        raise DecodeError(f"not a valid {model_type.__name__}: {error}") from error

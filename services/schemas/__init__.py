"""Wire models shared by every service, and their codecs."""

from services.schemas.codec import Codec, DecodeError, decode, encode
from services.schemas.models import (
    SCHEMA_VERSION,
    AnswerType,
    Budget,
    RewardBreakdown,
    Rollout,
    RolloutRequest,
    RolloutTimings,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    Task,
    TaskMessage,
    TrajectoryGroup,
    WeightVersion,
    WireModel,
)

__all__ = [
    "SCHEMA_VERSION",
    "AnswerType",
    "Budget",
    "Codec",
    "DecodeError",
    "RewardBreakdown",
    "Rollout",
    "RolloutRequest",
    "RolloutTimings",
    "ScoreItem",
    "ScoreRequest",
    "ScoreResponse",
    "Task",
    "TaskMessage",
    "TrajectoryGroup",
    "WeightVersion",
    "WireModel",
    "decode",
    "encode",
]

"""Prometheus metrics and structured logging for every service."""

from services.telemetry.logs import KeyValueFormatter, configure_logging
from services.telemetry.metrics import (
    LearnerMetrics,
    QueueMetrics,
    RewardServerMetrics,
    RolloutMetrics,
    Telemetry,
    WeightSyncMetrics,
)

__all__ = [
    "KeyValueFormatter",
    "LearnerMetrics",
    "QueueMetrics",
    "RewardServerMetrics",
    "RolloutMetrics",
    "Telemetry",
    "WeightSyncMetrics",
    "configure_logging",
]

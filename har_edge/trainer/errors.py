"""Errors the trainer raises on purpose; they extend the agent's tree (``har_edge.agent.errors``)."""

from __future__ import annotations

from har_edge.agent.errors import ConfigError, HarEdgeError

__all__ = [
    "ConfigError",
    "DataError",
    "GateFailed",
    "ImportRefused",
    "ReleaseError",
    "ToolFailed",
    "TrainerError",
    "UnsafePickle",
]


class TrainerError(HarEdgeError):
    kind = "trainer"


class DataError(TrainerError):
    """A data source that cannot be read or gives no usable windows."""

    kind = "data"


class UnsafePickle(DataError):
    """A pickle asked for something outside the allow-list: it was not loaded."""

    kind = "unsafe_pickle"


class GateFailed(TrainerError):
    """An exported model below the quality thresholds."""

    kind = "gate"


class ReleaseError(TrainerError):
    kind = "release"


class ToolFailed(TrainerError):
    """An external command (git, dvc, pip) failed or timed out."""

    kind = "tool"


class ImportRefused(TrainerError):
    """A model, labels, scaler or data that ``har-train import`` refuses (the message says what to hand over)."""

    kind = "import"

"""The training reference a manifest carries (``Manifest.reference``), documented in docs/manifest.md.

Every section names what it was measured on: ``labelled`` data, ``unlabelled``
data, or ``synthetic`` windows. The trainer's export and ``har-train import --data``
write it (``har_edge.trainer.reference.build_reference``); the edge compares each
file against it (:mod:`har_edge.agent.monitor.verdict`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MeasuredOn = Literal["labelled", "unlabelled", "synthetic"]
REFERENCE_VERSION = 1


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Histogram(_Part):
    """Shares of the ``len(edges) + 1`` open-ended bins cut at ``edges`` (ascending)."""

    edges: list[float]
    share: list[float]
    #: the PSI held-out recordings of the training population typically reach against this histogram
    #: (the largest over held-out subjects); the verdict reads a file's PSI relative to it. None: not measured.
    typical_psi: float | None = None

    @model_validator(mode="after")
    def _shape(self) -> Histogram:
        if len(self.share) != len(self.edges) + 1:
            raise ValueError(f"{len(self.edges)} edges need {len(self.edges) + 1} shares, not {len(self.share)}")
        if any(b < a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("histogram edges must ascend")
        return self


class InputSummary(_Part):
    """Per-channel histograms of the scaled input values (every ``sample_stride``-th sample of each window)."""

    measured_on: MeasuredOn
    windows: int = Field(ge=0)
    sample_stride: int = Field(ge=1)
    channels: dict[str, Histogram]
    #: share of scaled values outside the int8 input range of the model (clipped by quantization)
    saturation_share: float = Field(0.0, ge=0, le=1)


class FeatureSummary(_Part):
    """Histograms of per-window statistics (``<channel>.mean|std|energy|jerk`` of scaled windows)."""

    measured_on: MeasuredOn
    windows: int = Field(ge=0)
    features: dict[str, Histogram]


class Prior(_Part):
    measured_on: MeasuredOn
    #: ``true``: shares of the labels; ``predicted``: shares of the model's top-1 (no labels were given)
    kind: Literal["true", "predicted"]
    share: list[float]


class Temperature(_Part):
    measured_on: MeasuredOn
    value: float = Field(gt=0)
    #: ``fitted`` on labelled validation windows, or ``uncalibrated`` (kept at 1: no labels)
    status: Literal["fitted", "uncalibrated"]
    windows: int = Field(0, ge=0)
    ece_before: float | None = None
    ece_after: float | None = None


class ConfidenceSummary(_Part):
    """Calibrated top-1 confidence on held-out windows."""

    measured_on: MeasuredOn
    windows: int = Field(ge=0)
    histogram: Histogram
    mean: float
    low_share: float = Field(ge=0, le=1)
    low_threshold: float
    entropy_mean: float


class Temporal(_Part):
    """Top-1 label changes between consecutive held-out windows."""

    measured_on: MeasuredOn
    windows: int = Field(ge=0)
    flip_rate: float = Field(ge=0, le=1)
    mean_dwell_windows: float = Field(ge=0)


class Reference(_Part):
    version: int = REFERENCE_VERSION
    #: what the reference as a whole rests on (the weakest of its parts)
    measured_on: MeasuredOn
    source: str = ""
    input: InputSummary
    features: FeatureSummary
    prior: Prior
    temperature: Temperature
    confidence: ConfidenceSummary
    temporal: Temporal

    @property
    def gives_drift_verdicts(self) -> bool:
        """A reference drawn only from synthetic windows says nothing about real inputs."""
        return self.input.measured_on != "synthetic"

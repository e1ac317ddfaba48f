"""Labelled data sources. Each gives :class:`LabelledWindows` in the edge's channel order and units.

Channels: ``acc_x, acc_y, acc_z`` in m/s² with gravity, ``gyro_x, gyro_y,
gyro_z`` in deg/s (``har_edge.agent.manifest.CHANNELS``), sampled at the model's rate.
Windows are cut by ``har_edge.agent.preprocess`` (the edge's own functions) and never
span two labels: samples of other activities (HAPT's postural transitions) and
unlabelled samples end a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from har_edge.agent.preprocess import sliding_windows


@dataclass(frozen=True)
class LabelledRecording:
    """A continuous 50 Hz recording of one subject with a label per sample (-1: none/excluded)."""

    name: str
    subject: str
    samples: np.ndarray  # float32 (n, 6) SI units
    labels: np.ndarray  # int16 (n,), index into the label list or -1

    def __post_init__(self) -> None:
        if self.samples.ndim != 2 or self.samples.shape[1] != 6 or self.labels.shape != (len(self.samples),):
            raise ValueError(
                f"recording {self.name}: samples {self.samples.shape} and labels {self.labels.shape} "
                "must be (n, 6) and (n,)"
            )

    def windows(self, window: int, step: int) -> LabelledWindows:
        return recording_to_windows(self, window, step)


@dataclass(frozen=True)
class LabelledWindows:
    windows: np.ndarray  # float32 (k, window, 6) raw SI units
    labels: np.ndarray  # int16 (k,)
    subjects: np.ndarray  # str (k,)

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def empty(window: int) -> LabelledWindows:
        return LabelledWindows(np.empty((0, window, 6), np.float32), np.empty(0, np.int16), np.empty(0, "<U1"))

    @staticmethod
    def concat(parts: list[LabelledWindows], window: int) -> LabelledWindows:
        parts = [p for p in parts if len(p)]
        if not parts:
            return LabelledWindows.empty(window)
        return LabelledWindows(
            np.concatenate([p.windows for p in parts]).astype(np.float32, copy=False),
            np.concatenate([p.labels for p in parts]).astype(np.int16, copy=False),
            np.concatenate([p.subjects.astype(str) for p in parts]),
        )

    def select(self, mask: np.ndarray) -> LabelledWindows:
        return LabelledWindows(self.windows[mask], self.labels[mask], self.subjects[mask])


def label_runs(labels: np.ndarray) -> list[tuple[int, int, int]]:
    """``(start, stop, label)`` of each run of one label >= 0."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        return []
    change = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate(([0], change))
    stops = np.concatenate((change, [len(labels)]))
    return [(int(a), int(b), int(labels[a])) for a, b in zip(starts, stops, strict=False) if labels[a] >= 0]


def recording_to_windows(rec: LabelledRecording, window: int, step: int) -> LabelledWindows:
    """Windows within each single-label run of a recording (a window never spans two labels)."""
    wins: list[np.ndarray] = []
    labs: list[np.ndarray] = []
    for a, b, lab in label_runs(rec.labels):
        w = sliding_windows(rec.samples[a:b], window, step)
        if len(w):
            wins.append(np.ascontiguousarray(w, dtype=np.float32))
            labs.append(np.full(len(w), lab, np.int16))
    if not wins:
        return LabelledWindows.empty(window)
    k = sum(len(w) for w in wins)
    return LabelledWindows(np.concatenate(wins), np.concatenate(labs), np.full(k, rec.subject))

"""A study's own 1D-CNN-BiLSTM and its synthetic labelled recordings, for ``har-train import``.

One builder at two sizes: :data:`STUDY` for the bench's ``own_model`` section
(study-sized, what is measured) and :data:`SMALL` for tests/test_own_model.py
(quick to train). Both have the layers that matter to the import: Conv1D and
pooling, a Bidirectional LSTM, a BatchNorm after it (folded by the import),
Dropout and two Dense layers. What a study hands over is written by :func:`save`
(``model.keras``, ``labels.json``, ``scaler.json``) and :func:`write_labels` (the
labelled spans of an export, as ``har-train import --data ... --labelled`` reads them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

#: the signal of one activity: (label, rng, mount rotation, gyro bias) -> samples (n, 6) SI
Signal = Callable[[str, np.random.Generator, NDArray[Any], NDArray[Any]], NDArray[np.float32]]
#: [(first sample, end sample, label index)]
Spans = list[tuple[int, int, int]]


@dataclass(frozen=True)
class CnnBiLstm:
    """The sizes of the study model, the seed its weights start from and its Adam learning rate."""

    filters: tuple[int, int]
    pools: tuple[int, int]
    lstm_units: int
    dropout: float
    dense: int
    seed: int
    learning_rate: float


STUDY = CnnBiLstm(filters=(32, 64), pools=(2, 2), lstm_units=48, dropout=0.3, dense=64, seed=7, learning_rate=2e-3)
SMALL = CnnBiLstm(filters=(16, 24), pools=(4, 2), lstm_units=12, dropout=0.2, dense=24, seed=5, learning_rate=3e-3)


def build(size: CnnBiLstm, window: int, classes: int) -> Any:
    """The compiled Keras model (sparse categorical cross-entropy, accuracy), its weights seeded by ``size.seed``."""
    import keras

    keras.utils.set_random_seed(size.seed)
    L = keras.layers
    model = keras.Sequential(
        [
            keras.Input((window, 6)),
            L.Conv1D(size.filters[0], 5, activation="relu"),
            L.MaxPooling1D(size.pools[0]),
            L.Conv1D(size.filters[1], 5, activation="relu"),
            L.MaxPooling1D(size.pools[1]),
            L.Bidirectional(L.LSTM(size.lstm_units)),
            L.BatchNormalization(),
            L.Dropout(size.dropout),
            L.Dense(size.dense, activation="relu"),
            L.Dense(classes, activation="softmax"),
        ],
        name="study_cnn_bilstm",
    )
    model.compile(keras.optimizers.Adam(size.learning_rate), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def recording(subject: int, labels: list[str], signal: Signal, seed: int) -> tuple[NDArray[np.float32], Spans]:
    """(samples (n, 6) SI, spans) of one subject: every class once, in a random order, one wrist mount and gyro
    bias per subject; the same for the same ``seed`` and ``subject``."""
    from har_edge.trainer.data.synthetic import _rotation

    rng = np.random.default_rng([seed, subject])
    mount, bias = _rotation(rng, 12.0), rng.normal(0, 0.8, size=3)
    parts, spans, at = [], [], 0
    for idx in rng.permutation(len(labels)):
        sig = signal(labels[idx], rng, mount, bias)
        parts.append(sig)
        spans.append((at, at + len(sig), int(idx)))
        at += len(sig)
    return np.concatenate(parts), spans


def windows(
    samples: NDArray[np.float32], spans: Spans, window: int, step: int
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Windows of ``window`` samples every ``step`` inside each span, and their label indices."""
    xs, ys = [], []
    for a, b, lab in spans:
        for s in range(a, b - window + 1, step):
            xs.append(samples[s : s + window])
            ys.append(lab)
    return np.stack(xs).astype(np.float32), np.array(ys, np.int64)


def write_labels(path: Path, spans: Spans, labels: list[str], *, t0_ms: int, rate_hz: float, subject: str) -> Path:
    """The labelled spans of an export starting at ``t0_ms`` as ``start_ms,end_ms,label,subject`` rows."""
    rows = ["start_ms,end_ms,label,subject"]
    for a, b, lab in spans:
        rows.append(f"{t0_ms + int(a * 1000 / rate_hz)},{t0_ms + int(b * 1000 / rate_hz)},{labels[lab]},{subject}")
    path.write_text("\n".join(rows) + "\n")
    return path


def save(folder: Path, model: Any, labels: list[str], mean: NDArray[Any], scale: NDArray[Any]) -> None:
    """What a study hands over: ``model.keras``, ``labels.json`` (index -> name) and ``scaler.json`` (mean, scale)."""
    model.save(folder / "model.keras")
    (folder / "labels.json").write_text(json.dumps({str(i): n for i, n in enumerate(labels)}))
    (folder / "scaler.json").write_text(json.dumps({"mean": mean.tolist(), "scale": scale.tolist()}))

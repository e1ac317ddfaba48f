"""Per-window predictions of one file as a CSV artifact (not metric points: a day is 40k windows).

Columns: ``start_time`` (ISO 8601 UTC with milliseconds), ``start_ms`` (ms
since the Unix epoch), ``label``, ``confidence``, then ``p_<label>`` per label
in the model's output order.
"""

from __future__ import annotations

import csv
import io
from collections import deque
from collections.abc import Generator, Iterable, Sequence
from pathlib import Path

import numpy as np

ARTIFACT_NAME = "predictions.csv"


def iso_ms(ms: np.ndarray) -> np.ndarray:
    """ISO 8601 UTC strings with milliseconds (``2025-03-24T07:52:19.120Z``) for ms since the epoch."""
    return np.datetime_as_string(np.asarray(ms, dtype=np.int64).astype("datetime64[ms]"), unit="ms", timezone="UTC")


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\r\n') else text


def _header(label_names: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(
        ["start_time", "start_ms", "label", "confidence", *(f"p_{x}" for x in label_names)]
    )
    return buf.getvalue()


def fixed6(values: np.ndarray) -> np.ndarray:
    """``"%.6f" % v`` of float32 values in [0, 1] as ASCII bytes (``values.shape + (8,)``), with no Python loop.

    Exact, not close: a float32 has a 24-bit significand and 1e6 is 15625 * 2**6, so ``v * 1e6`` in
    float64 is the exact product, and rounding it half to even (``np.rint``) is the correctly rounded
    decimal that ``%`` formatting prints (it rounds exact ties such as 0.0078125 to even as well).
    """
    units = np.rint(np.asarray(values, np.float32).astype(np.float64) * 1e6).astype(np.int64)
    out = np.empty((*units.shape, 8), np.uint8)
    out[..., 0] = 48 + units // 1_000_000
    out[..., 1] = 46  # "."
    frac = units % 1_000_000
    for i in range(7, 1, -1):
        out[..., i] = 48 + frac % 10
        frac //= 10
    return out


def _rows(names: Sequence[str], start_ms: np.ndarray, probs: np.ndarray) -> str:
    """The CSV lines of a run of windows (vectorised: each row's numbers are laid out as bytes at once)."""
    values = np.column_stack([probs.max(axis=1), probs])
    labels = probs.argmax(axis=1).tolist()
    iso = iso_ms(start_ms).astype("S").tolist()
    ms = np.asarray(start_ms, np.int64).tolist()
    if values.dtype == np.float32 and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        cells = np.empty((*values.shape, 9), np.uint8)
        cells[..., :8] = fixed6(values)
        cells[..., 8] = 44  # ","
        cells[:, -1, 8] = 10  # the row's end
        tails = cells.reshape(len(values), -1).view(f"S{cells.shape[1] * 9}").ravel().tolist()
        encoded = [x.encode() for x in names]
        return b"".join(
            b"%s,%d,%s,%s" % (i, m, encoded[k], t) for i, m, k, t in zip(iso, ms, labels, tails, strict=True)
        ).decode()
    numbers = io.StringIO()  # anything else (float64, values outside [0, 1]): numpy's own formatting, one row at a time
    np.savetxt(numbers, values, fmt="%.6f", delimiter=",")
    return "".join(
        f"{i.decode()},{m},{names[k]},{tail}\n"
        for i, m, k, tail in zip(iso, ms, labels, numbers.getvalue().splitlines(), strict=True)
    )


def write_predictions_csv(path: Path, label_names: list[str], start_ms: np.ndarray, probs: np.ndarray) -> int:
    """Write the CSV (vectorised: a day of windows in well under a second); return the number of rows."""
    if probs.ndim != 2 or probs.shape[1] != len(label_names):
        raise ValueError(f"{len(label_names)} labels but probabilities of shape {probs.shape}")
    return write_predictions_csv_parts(path, label_names, [(np.asarray(start_ms), probs)])


def write_predictions_csv_parts(
    path: Path, label_names: Sequence[str], parts: Iterable[tuple[np.ndarray, np.ndarray]]
) -> int:
    """The same CSV from runs of (start_ms, probs), written as they come: memory follows one run, not the file."""
    return deque(iter_write_predictions_csv(path, label_names, parts), maxlen=1)[0]


def iter_write_predictions_csv(
    path: Path, label_names: Sequence[str], parts: Iterable[tuple[np.ndarray, np.ndarray]]
) -> Generator[int, None, None]:
    """:func:`write_predictions_csv_parts` one run at a time: yields the rows written so far after each run
    (and once after the header), so a caller can do other work in between; the file is complete when it ends."""
    names = [_csv_field(x) for x in label_names]
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write(_header(label_names))
        yield n
        for starts, probs in parts:
            if len(probs) == 0:
                continue
            if probs.ndim != 2 or probs.shape[1] != len(names):
                raise ValueError(f"{len(names)} labels but probabilities of shape {probs.shape}")
            f.write(_rows(names, starts, probs))
            n += len(probs)
            yield n

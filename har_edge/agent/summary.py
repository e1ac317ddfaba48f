"""Per-file metric points, computed once when the file is stored.

Each point gets its timestamp here and keeps it forever, so a re-send to MLflow
is an identical point (stored once). Summary points carry the processing time
and step 0; the per-minute series carry the minute's start and its index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from har_edge.agent.outbox import MetricPoint


def _key(label: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in label.lower())


def summary_points(
    *,
    label_names: Sequence[str],
    probs: np.ndarray,
    step_s: float,
    low_confidence: float,
    per_window_s: Sequence[float],
    timings: dict[str, float],
    quality: dict[str, float],
    timestamp_ms: int,
) -> list[MetricPoint]:
    n = len(probs)
    conf = probs.max(axis=1) if n else np.empty(0)
    lab = probs.argmax(axis=1) if n else np.empty(0, int)
    values: dict[str, float] = {"windows": float(n)}
    counts = np.bincount(lab, minlength=len(label_names)) if n else np.zeros(len(label_names), int)
    for name, c in zip(label_names, counts, strict=False):
        values[f"seconds_{_key(name)}"] = float(c) * step_s
    values["mean_confidence"] = float(conf.mean()) if n else 0.0
    values["low_confidence_share"] = float((conf < low_confidence).mean()) if n else 0.0
    if len(per_window_s):
        ms = np.asarray(per_window_s) * 1000.0
        values["inference_time_p50_ms"] = float(np.percentile(ms, 50))
        values["inference_time_p95_ms"] = float(np.percentile(ms, 95))
    for k, v in timings.items():
        values[f"{k}_time_s"] = float(v)
    for k, v in quality.items():
        values[f"quality_{k}"] = float(v)
    return [MetricPoint(k, v, timestamp_ms, 0) for k, v in values.items()]


def minute_points(*, label_names: Sequence[str], start_ms: np.ndarray, probs: np.ndarray) -> list[MetricPoint]:
    """Share of each activity and mean confidence per minute of the recording.

    Step is the minute's index from the recording's first minute, timestamp the
    minute's start (ms since the Unix epoch); minutes without windows are absent.
    """
    return list(iter_minute_points(label_names=label_names, start_ms=start_ms, probs=probs))


def iter_minute_points(*, label_names: Sequence[str], start_ms: np.ndarray, probs: np.ndarray) -> Iterator[MetricPoint]:
    """:func:`minute_points` one at a time (the outbox stores them without a list)."""
    if len(probs) == 0:
        return
    minute = start_ms // 60_000
    first = int(minute.min())
    idx = (minute - first).astype(np.int64)
    lab = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    n_min = int(idx.max()) + 1
    per_min = np.bincount(idx, minlength=n_min)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_min)
    by_label = np.bincount(idx * len(label_names) + lab, minlength=n_min * len(label_names)).reshape(
        n_min, len(label_names)
    )
    keys = [f"minute_share_{_key(name)}" for name in label_names]
    used = np.flatnonzero(per_min)
    shares = (by_label[used] / per_min[used, None]).tolist()
    confs = (conf_sum[used] / per_min[used]).tolist()
    for m, share, c in zip(used.tolist(), shares, confs, strict=False):
        ts = (first + m) * 60_000
        for key, v in zip(keys, share, strict=False):
            yield MetricPoint(key, v, ts, m)
        yield MetricPoint("minute_confidence", c, ts, m)

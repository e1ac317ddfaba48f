"""Calibration and check windows from the user's own exports, decoded and windowed by the agent's code.

Each export (FIT, study CSV/xlsx pair, zip) goes through
``har_edge.agent.decode.open_export`` and ``har_edge.agent.preprocess.StreamWindower``
exactly as the agent would feed it, then through the manifest's
:class:`~har_edge.agent.channels.ChannelMap`, so calibration sees what serving sees.

Labels (``--labelled``), either way:

* a CSV beside each export, ``<export name>.labels.csv`` (for a table pair,
  ``<prefix>.labels.csv``), with the columns ``start_ms,end_ms,label`` and
  optionally ``subject`` (epoch milliseconds or ISO 8601 times, the label a name
  or an index);
* a labelled export folder given as ``--data FOLDER``: the trainer's study
  layout, a ``labels.csv`` with ``file,subject,label,start,end``
  (``har_edge.trainer.data.garmin``); only its labelled windows are used.

A window gets a label when it lies wholly inside one interval; the others are
unlabelled (they still calibrate).

Without exports, windows are drawn from the scaler's statistics (or the
baseline's per-class statistics): the figures measured on them say so.
"""

from __future__ import annotations

import csv
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from har_edge.agent.decode import open_export
from har_edge.agent.preprocess import StreamWindower
from har_edge.trainer.data.garmin import parse_time_ms
from har_edge.trainer.errors import DataError, ImportRefused

log = logging.getLogger(__name__)


@dataclass
class Windows:
    """Raw windows in the model's channels and units, with their export, label (-1 none) and subject."""

    raw: np.ndarray  # float32 (n, window, channels)
    export: np.ndarray  # int (n,) index into files
    labels: np.ndarray  # int (n,), -1 unlabelled
    subjects: np.ndarray  # str (n,)
    files: list[str]
    source: str  # exports | scaler-statistics | baseline-statistics

    def __len__(self) -> int:
        return len(self.raw)

    def select(self, mask: np.ndarray) -> Windows:
        return Windows(
            self.raw[mask], self.export[mask], self.labels[mask], self.subjects[mask], self.files, self.source
        )


def _exports(paths: list[Path]) -> list[list[Path]]:
    """Group table pairs (…-accelerometer_data / …-gyroscope_data) into one export; others alone."""
    from har_edge.agent.decode import pair_key

    groups: dict[tuple[str, str], list[Path]] = {}  # (folder, prefix) -> the pair
    singles: list[list[Path]] = []
    for p in paths:
        if p.name.endswith(".labels.csv"):
            continue
        key = pair_key(p)
        if key is None:
            singles.append([p])
        else:
            groups.setdefault((str(p.parent), key[0]), []).append(p)
    return singles + [sorted(v) for v in groups.values()]


def _label_file(export: list[Path]) -> Path:
    first = export[0]
    key_name = first.name
    for suffix in ("-accelerometer_data", "-gyroscope_data"):
        if suffix in key_name:
            key_name = key_name.split(suffix)[0]
    candidates = [first.with_name(f"{first.name}.labels.csv"), first.with_name(f"{key_name}.labels.csv")]
    for c in candidates:
        if c.is_file():
            return c
    raise ImportRefused(
        f"--labelled: no labels file for {first.name}: write {candidates[0].name} (start_ms,end_ms,label[,subject])"
    )


def _from_study_folder(
    folder: Path,
    labels: list[str] | None,
    channel_map: Any,
    rate_hz: float,
    window: int,
    step: int,
    max_gap_s: float,
    raws: list[np.ndarray],
    exports: list[np.ndarray],
    labs: list[np.ndarray],
    subs: list[np.ndarray],
    files: list[str],
) -> None:
    """Windows of a labelled export folder (``labels.csv``: file,subject,label,start,end)."""
    from har_edge.trainer.data.garmin import LABELS_FILE
    from har_edge.trainer.data.garmin import read_labels as read_study_labels

    if not (folder / LABELS_FILE).is_file():
        raise ImportRefused(f"--data {folder} is a folder without {LABELS_FILE}: pass the export files themselves")
    names = labels if labels is not None else []
    if not names:
        raise ImportRefused(f"--data {folder} is a labelled export folder: import with --labelled")
    for export in read_study_labels(folder, tuple(names), rate_hz=rate_hz, max_gap_s=max_gap_s):
        lw = export.windows(window, step)
        if not len(lw):
            continue
        files.append(export.name)
        raws.append(channel_map.to_model(lw.windows))
        exports.append(np.full(len(lw), len(files) - 1))
        labs.append(lw.labels.astype(int))
        subs.append(lw.subjects.astype(object))


def _read_labels(path: Path, labels: list[str]) -> list[tuple[int, int, int, str]]:
    out = []
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            try:
                lab = row["label"].strip()
                idx = int(lab) if lab.lstrip("-").isdigit() else labels.index(lab)
                where = f"{path.name}"
                start, end = parse_time_ms(row["start_ms"], where), parse_time_ms(row["end_ms"], where)
                out.append((start, end, idx, row.get("subject", "") or ""))
            except (KeyError, ValueError, DataError):
                raise ImportRefused(
                    f"{path}: row {row} is not start_ms,end_ms,label[,subject] with a label of {labels}"
                ) from None
    return out


def from_exports(
    paths: list[Path],
    *,
    channel_map: Any,
    rate_hz: float,
    window: int,
    step: int,
    labels: list[str] | None = None,
    max_gap_s: float = 1.0,
) -> Windows:
    """Every window of the exports in the model's channels and units (labelled when ``labels`` given)."""
    raws: list[np.ndarray] = []  # per part: raw windows, export index, label (-1 none), subject
    exports: list[np.ndarray] = []
    labs: list[np.ndarray] = []
    subs: list[np.ndarray] = []
    files: list[str] = []
    span_ms = window * 1000.0 / rate_hz
    folders = [Path(p) for p in paths if Path(p).is_dir()]
    for folder in folders:
        _from_study_folder(
            folder, labels, channel_map, rate_hz, window, step, max_gap_s, raws, exports, labs, subs, files
        )
    for e, export in enumerate(_exports([Path(p) for p in paths if not Path(p).is_dir()]), start=len(files)):
        name = "+".join(p.name for p in export)
        files.append(name)
        scratch = Path(tempfile.mkdtemp(prefix="har-import-"))
        try:
            for rec in open_export(export, scratch, max_archive_bytes=2_000_000_000, name=name):
                sw = StreamWindower(
                    rate_hz=rate_hz, window=window, step=step, max_gap_s=max_gap_s,
                    has_gyro=rec.has_gyro, accel_unit=rec.accel_unit,
                )  # fmt: skip
                parts = [sw.feed(c) for c in rec.chunks()]
                parts.append(sw.finish())
                for ws in parts:
                    if not len(ws):
                        continue
                    raws.append(channel_map.to_model(ws.windows))
                    exports.append(np.full(len(ws), e))
                    lab = np.full(len(ws), -1)
                    sub = np.full(len(ws), export[0].stem, dtype=object)
                    if labels is not None:
                        for a, b, idx, subject in _read_labels(_label_file(export), labels):
                            inside = (ws.start_ms >= a) & (ws.start_ms + span_ms <= b)
                            lab[inside] = idx
                            if subject:
                                sub[inside] = subject
                    labs.append(lab)
                    subs.append(sub)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if not raws:
        raise ImportRefused(f"--data {', '.join(map(str, paths))} holds no full window of {window} samples")
    w = Windows(
        np.concatenate(raws).astype(np.float32),
        np.concatenate(exports),
        np.concatenate(labs),
        np.concatenate(subs).astype(str),
        files,
        "exports",
    )
    if labels is not None and (w.labels >= len(labels)).any():
        raise ImportRefused(f"a labels file names an index beyond the {len(labels)} labels")
    log.info("%d windows from %d exports (%d labelled)", len(w), len(files), int((w.labels >= 0).sum()))
    return w


def synthetic(
    *,
    mean: np.ndarray,
    scale: np.ndarray,
    window: int,
    count: int,
    seed: int,
    baseline: dict[str, Any] | None = None,
    channel_names: list[str] | None = None,
) -> Windows:
    """Windows drawn from per-channel statistics (the baseline's per-class ones when given)."""
    rng = np.random.default_rng(seed)
    c = len(mean)
    stats: list[tuple[np.ndarray, np.ndarray]] = []
    source = "scaler-statistics"
    if baseline is not None:
        names = channel_names or []
        per = baseline.get("classes") or {}
        groups = list(per.values()) if per else [baseline["channels"]]
        for g in groups:
            try:
                mu = np.array([float(g[n]["mean"]) for n in names], np.float32)
                sd = np.array([float(g[n]["std"]) for n in names], np.float32)
            except (KeyError, TypeError, ValueError):
                raise ImportRefused(
                    f"baseline: every channel ({names}) needs mean and std in 'channels' and in each class"
                ) from None
            stats.append((mu, sd))
        source = "baseline-statistics"
    else:
        stats.append((np.asarray(mean, np.float32), np.asarray(scale, np.float32)))
    raw = np.empty((count, window, c), np.float32)
    for i in range(count):
        mu, sd = stats[i % len(stats)]
        raw[i] = mu + sd * rng.standard_normal((window, c)).astype(np.float32)
    log.warning(
        "NO --data: %d calibration and check windows are random draws from the %s, not real recordings; "
        "int8 calibration and the agreement figure are only indicative: import again with --data",
        count,
        source,
    )
    return Windows(raw, np.zeros(count, int), np.full(count, -1), np.full(count, "", dtype=str), [], source)


def split(w: Windows, check_share: float = 0.25) -> tuple[Windows, Windows]:
    """(calibration, check): whole exports held out when there are several, else the last stretch of windows."""
    n_files = len(set(w.export.tolist()))
    if n_files >= 2:
        held = {e for e in sorted(set(w.export.tolist())) if e % max(2, round(1 / check_share)) == 1}
        mask = np.isin(w.export, sorted(held))
    else:
        mask = np.zeros(len(w), bool)
        cut = int(len(w) * (1 - check_share))
        mask[cut:] = True
    return w.select(~mask), w.select(mask)

"""Labelled Garmin exports: a person's own study data, the fine-tuning path.

Decoding, fusion, resampling and windowing are the agent's own
(``har_edge.agent.decode.open_export`` and ``har_edge.agent.preprocess.recording_windows``), so a
fine-tuned model sees exactly the windows the edge will feed it.

A labelled export folder holds the exports (FIT files, Garmin Connect zips,
study accelerometer/gyroscope CSV or xlsx pairs, FitCSVTool CSVs) and a
``labels.csv`` of activity intervals::

    file,subject,label,start,end
    walk1.fit,alice,walking,2025-03-24T07:52:19Z,2025-03-24T07:55:00Z
    alice_accelerometer.csv|alice_gyroscope.csv,alice,sitting,1742802739000,1742802800000

``file`` is relative to the folder (a table pair joined with ``|``), ``label``
one of ``data.labels`` (other labels are skipped: say so by leaving them out),
``start``/``end`` ISO 8601 times (UTC when no offset is given) or integer
milliseconds since the Unix epoch. A window is labelled when it lies wholly
inside one interval; windows touching no interval or two are dropped.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from har_edge.agent.decode import open_export
from har_edge.agent.decode.types import Recording
from har_edge.agent.errors import InputError
from har_edge.agent.preprocess import WindowSet, recording_windows
from har_edge.common.hashing import manifest_of_files
from har_edge.trainer.data import LabelledWindows
from har_edge.trainer.errors import DataError

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
_COLUMNS = ("file", "subject", "label", "start", "end")
_MAX_ARCHIVE_BYTES = 2 << 30


@dataclass(frozen=True)
class Interval:
    start_ms: int
    end_ms: int
    label: int


def parse_time_ms(text: str, where: str) -> int:
    """Integer epoch milliseconds, or an ISO 8601 time (UTC when it names no offset)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise DataError(f"{where}: {text!r} is neither epoch milliseconds nor an ISO 8601 time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(round(t.timestamp() * 1000))


def label_windows(ws: WindowSet, intervals: list[Interval], *, rate_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, labels)``: which windows lie wholly inside one interval, and its label."""
    n = len(ws)
    labels = np.full(n, -1, np.int16)
    if n == 0:
        return np.zeros(0, bool), labels
    window = ws.windows.shape[1]
    start = ws.start_ms
    end = start + int(round((window - 1) * 1000.0 / rate_hz))
    hits = np.zeros(n, np.int16)
    for iv in intervals:
        inside = (start >= iv.start_ms) & (end <= iv.end_ms)
        labels[inside] = iv.label
        hits += inside
    mask = hits == 1
    return mask, labels


@dataclass(frozen=True)
class GarminExport:
    """One export (one file or a table pair) of one subject with its labelled intervals."""

    folder: Path
    files: tuple[str, ...]
    subject: str
    intervals: tuple[Interval, ...]
    rate_hz: float = 50.0
    max_gap_s: float = 1.0

    @property
    def name(self) -> str:
        return "|".join(self.files)

    def decode(self, scratch: Path) -> list[Recording]:
        paths = [self.folder / f for f in self.files]
        for p in paths:
            if not p.is_file():
                raise DataError(f"{LABELS_FILE} names {p.name}, which is not in {self.folder}")
        try:
            return open_export(paths, scratch, max_archive_bytes=_MAX_ARCHIVE_BYTES, name=self.name)
        except InputError as exc:
            raise DataError(f"{self.name} (subject {self.subject}) cannot be decoded: {exc}") from None

    def windows(self, window: int, step: int) -> LabelledWindows:
        rate_hz = self.rate_hz
        parts: list[LabelledWindows] = []
        with tempfile.TemporaryDirectory(prefix="har-train-") as tmp:
            for rec in self.decode(Path(tmp)):
                try:
                    ws = recording_windows(rec, rate_hz=rate_hz, window=window, step=step, max_gap_s=self.max_gap_s)
                except InputError as exc:
                    raise DataError(f"{rec.name} (subject {self.subject}): {exc}") from None
                mask, labels = label_windows(ws, list(self.intervals), rate_hz=rate_hz)
                log.info("%s: %d of %d windows labelled", rec.name, int(mask.sum()), len(ws))
                if mask.any():
                    k = int(mask.sum())
                    parts.append(LabelledWindows(ws.windows[mask], labels[mask], np.full(k, self.subject)))
        return LabelledWindows.concat(parts, window)


def read_labels(
    folder: Path, labels: tuple[str, ...], *, rate_hz: float = 50.0, max_gap_s: float = 1.0
) -> list[GarminExport]:
    """The exports named in ``folder/labels.csv``, grouped by file."""
    folder = Path(folder)
    path = folder / LABELS_FILE
    if not path.is_file():
        raise DataError(
            f"{folder} has no {LABELS_FILE}: a labelled Garmin export folder needs one (see trainer/README.md)"
        )
    groups: dict[tuple[str, ...], tuple[str, list[Interval]]] = {}
    skipped: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path} lacks the columns {missing}: the header must be {','.join(_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            where = f"{path.name} line {line}"
            label = row["label"].strip()
            if label not in labels:
                skipped[label] = skipped.get(label, 0) + 1
                continue
            files = tuple(p.strip() for p in row["file"].split("|") if p.strip())
            subject = row["subject"].strip()
            if not files or not subject:
                raise DataError(f"{where}: file and subject must not be empty")
            start, end = parse_time_ms(row["start"], where), parse_time_ms(row["end"], where)
            if end <= start:
                raise DataError(f"{where}: end {row['end']} is not after start {row['start']}")
            known = groups.setdefault(files, (subject, []))
            if known[0] != subject:
                raise DataError(f"{where}: {'|'.join(files)} is labelled for subjects {known[0]} and {subject}")
            known[1].append(Interval(start, end, labels.index(label)))
    if skipped:
        log.info("labels.csv: skipped intervals of labels outside data.labels: %s", skipped)
    if not groups:
        raise DataError(f"{path} has no interval with a label of {list(labels)}")
    return [
        GarminExport(folder, files, subj, tuple(ivs), rate_hz, max_gap_s)
        for files, (subj, ivs) in sorted(groups.items())
    ]


def folder_hash(folder: Path, exports: list[GarminExport]) -> str:
    """sha256 over labels.csv and every export file read."""
    return manifest_of_files(folder, [LABELS_FILE, *sorted({f for e in exports for f in e.files})])

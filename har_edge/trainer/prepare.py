"""Stage ``prepare``: a data source -> windows split by subject + a scaler fitted on training subjects.

Output: ``build/trainer/prepared.npz`` (raw SI windows, labels, subjects of the train,
val and test splits, the scaler and the labels; byte-reproducible) and
``build/trainer/prepared.json`` (counts, subjects, hashes). Windows are stored unscaled,
as the edge sees them; training applies the scaler with the edge's
``apply_scaler``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from har_edge.common.hashing import file_digest
from har_edge.trainer.data import LabelledWindows
from har_edge.trainer.errors import DataError
from har_edge.trainer.npzio import save_npz
from har_edge.trainer.settings import Settings

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
Progress = Callable[[Iterable[Any]], Iterable[Any]]


class Unit(Protocol):
    """A recording (or export) of one subject that can be cut into labelled windows (read-only: frozen dataclasses)."""

    @property
    def name(self) -> str: ...
    @property
    def subject(self) -> str: ...

    def windows(self, window: int, step: int) -> LabelledWindows: ...


@dataclass(frozen=True)
class SourceData:
    units: Sequence[Unit]
    source: str
    source_hash: str


def load_source(settings: Settings) -> SourceData:
    d = settings.data
    if d.source == "hapt":
        from har_edge.trainer.data import hapt

        sdist = hapt.fetch_sdist(settings.cache_dir)
        return SourceData(hapt.load_sdist(sdist, d.labels), f"hapt:{hapt.SDIST_FILE}", hapt.SDIST_SHA256)
    if d.source == "synthetic":
        from har_edge.trainer.data import synthetic

        s = d.synthetic
        units = synthetic.generate(
            d.labels,
            subjects=s.subjects,
            seconds_per_activity=s.seconds_per_activity,
            seed=s.seed,
            rate_hz=d.sample_rate_hz,
        )
        return SourceData(units, f"synthetic:seed={s.seed},subjects={s.subjects},s={s.seconds_per_activity}", "")
    if d.raw_dir is None:
        raise DataError(f"data.source {d.source} needs data.raw_dir: the folder holding the data")
    raw_dir = settings.path(d.raw_dir)
    if d.source == "hapt_raw":
        from har_edge.trainer.data import hapt

        return SourceData(hapt.load_raw_dir(raw_dir, d.labels), f"hapt_raw:{raw_dir}", hapt.raw_dir_hash(raw_dir))
    from har_edge.trainer.data import garmin

    exports = garmin.read_labels(raw_dir, d.labels, rate_hz=d.sample_rate_hz, max_gap_s=d.max_gap_s)
    return SourceData(exports, f"garmin:{raw_dir}", garmin.folder_hash(raw_dir, exports))


def split_subjects(subjects: list[str], settings: Settings) -> dict[str, list[str]]:
    """Held-out test subjects (listed, or drawn with the seed), then seeded validation subjects."""
    sp = settings.split
    subjects = sorted(set(subjects), key=lambda s: (len(s), s))
    rng = np.random.default_rng(sp.seed)
    if sp.test_subjects:
        test = [s for s in subjects if s in sp.test_subjects]
        absent = [s for s in sp.test_subjects if s not in subjects]
        if absent:
            log.warning("split.test_subjects %s are not in the data; holding out %s", absent, test)
        if not test:
            raise DataError(
                f"none of split.test_subjects {list(sp.test_subjects)} is in the data (subjects {subjects}): "
                "list some of them, or set split.test_subjects: [] to draw split.test_fraction of them"
            )
    else:
        k = max(1, int(round(sp.test_fraction * len(subjects))))
        test = sorted(rng.choice(subjects, size=k, replace=False).tolist(), key=lambda s: (len(s), s))
    rest = [s for s in subjects if s not in test]
    if len(rest) < sp.val_subjects + 1:
        raise DataError(
            f"{len(subjects)} subjects leave {len(rest)} after holding out {len(test)} for testing: "
            f"too few for {sp.val_subjects} validation subjects and training; add data or lower split.val_subjects"
        )
    val = (
        sorted(rng.choice(rest, size=sp.val_subjects, replace=False).tolist(), key=lambda s: (len(s), s))
        if sp.val_subjects
        else []
    )
    train = [s for s in rest if s not in val]
    return {"train": train, "val": val, "test": test}


def fit_scaler(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over every sample of ``windows`` (float64 sums)."""
    flat = windows.reshape(-1, windows.shape[-1]).astype(np.float64)
    mean = flat.mean(axis=0)
    scale = flat.std(axis=0)
    scale = np.where(scale > 1e-6, scale, 1.0)  # a constant channel (no gyro) stays as it is
    return mean.astype(np.float32), scale.astype(np.float32)


def prepare(settings: Settings, progress: Progress = iter) -> dict[str, Any]:
    """Run the stage; return the metadata written to ``prepared.json``."""
    d = settings.data
    data = load_source(settings)
    split = split_subjects([u.subject for u in data.units], settings)
    where = {s: name for name, subs in split.items() for s in subs}
    parts: dict[str, list[LabelledWindows]] = {name: [] for name in SPLITS}
    for unit in progress(data.units):
        name = where[unit.subject]
        step = d.train_step if name == "train" else d.step
        parts[name].append(unit.windows(d.window, step))
    sets = {name: LabelledWindows.concat(p, d.window) for name, p in parts.items()}
    for name, ws in sets.items():
        if not len(ws) and (split[name] or name != "val"):
            raise DataError(f"the {name} split ({', '.join(split[name])}) has no windows: add data for those subjects")
    missing = sorted(set(range(len(d.labels))) - set(np.unique(sets["train"].labels).tolist()))
    if missing:
        raise DataError(
            f"training subjects have no windows of {[d.labels[i] for i in missing]}: add data or drop the labels"
        )
    mean, scale = fit_scaler(sets["train"].windows)
    arrays: dict[str, np.ndarray] = {"labels": np.array(d.labels), "scaler_mean": mean, "scaler_scale": scale}
    for name, ws in sets.items():
        arrays[f"x_{name}"] = ws.windows
        arrays[f"y_{name}"] = ws.labels
        arrays[f"s_{name}"] = ws.subjects.astype(str)
    out = settings.prepared_file
    out.parent.mkdir(parents=True, exist_ok=True)
    save_npz(out, arrays)
    n_windows = {name: len(ws) for name, ws in sets.items()}
    meta = {
        "source": data.source,
        "source_sha256": data.source_hash,
        "sha256": file_digest(out, "sha256"),
        "dvc_md5": file_digest(out, "md5"),
        "labels": list(d.labels),
        "sample_rate_hz": d.sample_rate_hz,
        "window": d.window,
        "step": d.step,
        "train_step": d.train_step,
        "subjects": split,
        "windows": n_windows,
        "per_class": {
            name: {d.labels[i]: int((ws.labels == i).sum()) for i in range(len(d.labels))} for name, ws in sets.items()
        },
        "scaler": {"mean": mean.tolist(), "scale": scale.tolist()},
    }
    settings.prepared_meta.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log.info(
        "prepared %s windows (train/val/test) from %s into %s",
        "/".join(str(n_windows[n]) for n in SPLITS),
        data.source,
        out,
    )
    return meta


@dataclass(frozen=True)
class Prepared:
    """The arrays of ``prepared.npz`` with its metadata."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    subjects: dict[str, np.ndarray]
    labels: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    meta: dict[str, Any]


def load_prepared(settings: Settings) -> Prepared:
    path, meta_path = settings.prepared_file, settings.prepared_meta
    if not path.is_file() or not meta_path.is_file():
        raise DataError(f"{path} is missing: run `har-train prepare` (or `dvc repro prepare`) first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    labels = tuple(str(s) for s in arrays["labels"])
    if labels != settings.data.labels:
        raise DataError(
            f"{path} was prepared for labels {list(labels)}, params say {list(settings.data.labels)}: "
            "run `har-train prepare` again"
        )
    return Prepared(
        x={n: arrays[f"x_{n}"] for n in SPLITS},
        y={n: arrays[f"y_{n}"].astype(np.int64) for n in SPLITS},
        subjects={n: arrays[f"s_{n}"] for n in SPLITS},
        labels=labels,
        mean=arrays["scaler_mean"],
        scale=arrays["scaler_scale"],
        meta=meta,
    )

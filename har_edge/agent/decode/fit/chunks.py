"""The chunk pass: the planned IMU records read a few hundred at a time, in file order, into Chunks.

Each group's byte range is read at once and its records viewed through a
numpy structured dtype (zero copy when they are evenly spaced), so memory
stays flat whatever the file's length.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from har_edge.agent.decode.fit.container import BASE_TYPES, FitIndex, MesgDef, Offsets
from har_edge.agent.decode.fit.plan import ImuPlan, SensorPlan
from har_edge.agent.decode.fit.profile import FIT_FIELD_TIMESTAMP
from har_edge.agent.decode.fit.samples import assemble, ordered
from har_edge.agent.decode.types import Chunk, SensorBlock
from har_edge.agent.errors import CorruptFile, InputError

log = logging.getLogger(__name__)

#: largest number of samples of one sensor in a chunk
MAX_CHUNK_SAMPLES = 8_192

I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]


def _groups(index: FitIndex, imu: ImuPlan, max_samples: int) -> Iterator[tuple[I64, I32, Bools]]:
    """The IMU records in file order, split greedily into groups of at most ``max_samples`` per sensor.

    Yields (offsets, def ids, is_gyro) per group. A group ends before the first
    record that would take either sensor past ``max_samples`` (it holds at least
    one record). Only the records of the next group or so are ever in arrays:
    each definition's sorted offsets are read through a cursor, so memory does
    not grow with the file's length.
    """
    # (offsets of the definition's records, how many, def id, samples per record, is gyro)
    sources: list[tuple[Offsets, int, int, int, bool]] = []
    for is_gyro, sensor in ((False, imu.accel), (True, imu.gyro)):
        if sensor is not None:
            for def_id in sensor.def_ids:
                pos = index.positions[def_id]
                if len(pos):
                    sources.append((pos, len(pos), def_id, max(1, sensor.counts[def_id]), is_gyro))
    cursor = [0] * len(sources)
    while True:
        parts: list[tuple[int, I64, int, int, bool]] = []
        cutoff: int | None = None
        for k, (pos, total, def_id, count, is_gyro) in enumerate(sources):
            i = cursor[k]
            if i >= total:
                continue
            take = pos.take(i, max_samples // count + 2)  # enough to take this sensor past max_samples alone
            parts.append((k, take, def_id, count, is_gyro))
            if i + len(take) < total:  # more follow: only offsets up to here are merged correctly
                last = int(take[-1])
                cutoff = last if cutoff is None else min(cutoff, last)
        if not parts:
            return
        offs: list[I64] = []
        whose: list[I32] = []
        counts: list[I64] = []
        gyro: list[I64] = []
        ids: list[I32] = []
        for k, take, def_id, count, is_gyro in parts:
            if cutoff is not None:
                take = take[: int(np.searchsorted(take, cutoff, side="right"))]
            offs.append(take)
            whose.append(np.full(len(take), k, np.int32))
            counts.append(np.full(len(take), count if not is_gyro else 0, np.int64))
            gyro.append(np.full(len(take), count if is_gyro else 0, np.int64))
            ids.append(np.full(len(take), def_id, np.int32))
        offsets = np.concatenate(offs)
        order = np.argsort(offsets, kind="stable") if len(parts) > 1 else slice(None)
        offsets = offsets[order]
        which = np.concatenate(whose)[order]
        cum_a = np.cumsum(np.concatenate(counts)[order])
        cum_g = np.cumsum(np.concatenate(gyro)[order])
        end = min(
            int(np.searchsorted(cum_a, max_samples, "right")),
            int(np.searchsorted(cum_g, max_samples, "right")),
        )
        end = max(end, 1)
        ids_sorted = np.concatenate(ids)[order][:end]
        is_gyro_sorted = (np.concatenate(gyro)[order] > 0)[:end]
        for k in np.unique(which[:end]).tolist():
            cursor[k] += int((which[:end] == k).sum())
        yield offsets[:end], ids_sorted, is_gyro_sorted


def _structured(buf: bytes, rel: np.ndarray, mdef: MesgDef) -> np.ndarray:
    """The records at offsets ``rel`` of ``buf`` as a structured array (zero copy when evenly spaced)."""
    dtype = mdef.dtype()
    size = mdef.record_size
    if len(rel) == 1 or (((step := np.diff(rel)) == step[0]).all() and step[0] >= size):
        stride = int(rel[1] - rel[0]) if len(rel) > 1 else size
        return np.ndarray((len(rel),), dtype, buffer=buf, offset=int(rel[0]), strides=(stride,))
    raw = np.frombuffer(buf, np.uint8)[rel[:, None] + np.arange(size)]
    return raw.view(dtype).reshape(len(rel))


def _column(arr: np.ndarray, mdef: MesgDef, num: int, n: int | None = None) -> np.ndarray:
    """Field ``num`` as float64 (m, n), or (m,) when n is None; invalid values NaN; absent: all NaN."""
    f = mdef.field(num)
    m = len(arr)
    if f is None or f.count == 0:
        return np.full((m, n) if n else m, np.nan)
    raw = arr[f"f{num}"].reshape(m, f.count)
    raw = raw[:, :n] if n else raw[:, 0]
    invalid = BASE_TYPES[f.effective_type][2]
    if invalid is None and raw.dtype.kind == "f":  # floats have no invalid value: keep them as they are
        return np.ascontiguousarray(raw)
    out = raw.astype(np.float64)
    if invalid is not None:
        out[raw == invalid] = np.nan
    return out


def _distinct(values: np.ndarray) -> list[int]:
    """Sorted distinct values (the common single-valued case without sorting)."""
    if len(values) and values[0] == values[-1] and (values == values[0]).all():
        return [int(values[0])]
    out: list[int] = np.unique(values).tolist()
    return out


def _sensor_samples(
    buf: bytes, base: int, offsets: np.ndarray, ids: np.ndarray, sensor: SensorPlan, index: FitIndex,
    correlation: int | None,
) -> SensorBlock:  # fmt: skip
    """The samples of one sensor's records held in ``buf`` (which starts at file offset ``base``)."""
    if not len(offsets):
        return SensorBlock.empty()
    parts_t, parts_v, parts_key = [], [], []
    source = sensor.source
    cal_pos = np.array([p for p, _ in sensor.calibrations], np.int64)
    def_ids = _distinct(ids)
    for def_id in def_ids:
        sel = offsets if len(def_ids) == 1 else offsets[ids == def_id]
        mdef = index.defs[def_id]
        n = sensor.counts[def_id]
        arr = _structured(buf, sel - base, mdef)
        ts = _column(arr, mdef, FIT_FIELD_TIMESTAMP)
        ms = _column(arr, mdef, 0)
        second = _column(arr, mdef, 1) if source.interval_unit_ms is not None else _column(arr, mdef, 1, n)
        axes = (_column(arr, mdef, source.axes[0], n), _column(arr, mdef, source.axes[1], n),
                _column(arr, mdef, source.axes[2], n))  # fmt: skip
        # the calibration in force: the last one before the record, else the first
        which = np.maximum(np.searchsorted(cal_pos, sel) - 1, 0) if len(cal_pos) else np.zeros(len(sel), np.int64)
        in_force = _distinct(which)
        for k in in_force:
            cal = sensor.calibrations[k][1] if len(cal_pos) else None
            if len(in_force) == 1:  # one calibration (or none) for all these records: no selection
                t, v, row = assemble(source, ts, ms, second, axes, cal, correlation, name=index.name)
                parts_key.append(sel[row])
            else:
                rows = which == k
                t, v, row = assemble(
                    source, ts[rows], ms[rows], second[rows], (axes[0][rows], axes[1][rows], axes[2][rows]), cal,
                    correlation, name=index.name,
                )  # fmt: skip
                parts_key.append(sel[rows][row])
            parts_t.append(t)
            parts_v.append(v)
    t = np.concatenate(parts_t)
    v = np.concatenate(parts_v)
    if len(parts_t) > 1:  # several definitions or calibrations: back to file order first
        order = np.argsort(np.concatenate(parts_key), kind="stable")
        t, v = t[order], v[order]
    return ordered(t, v)


def iter_chunks(index: FitIndex, imu: ImuPlan, *, max_samples: int = MAX_CHUNK_SAMPLES) -> Iterator[Chunk]:
    """Read the IMU records in file order, a group of at most ``max_samples`` per sensor at a time."""
    sizes = np.array([d.record_size for d in index.defs], np.int64)
    with open(index.path, "rb") as f:
        for offsets, ids, is_gyro in _groups(index, imu, max_samples):
            base = int(offsets[0])
            f.seek(base)
            buf = f.read(int(offsets[-1] + sizes[ids[-1]]) - base)
            accel = _sensor_samples(buf, base, offsets[~is_gyro], ids[~is_gyro], imu.accel, index, imu.correlation_ms)
            gyro = None
            if imu.gyro is not None:
                gyro = _sensor_samples(buf, base, offsets[is_gyro], ids[is_gyro], imu.gyro, index, imu.correlation_ms)
            yield Chunk(accel, gyro)


def guarded(name: str, chunks: Iterator[Chunk], what: str) -> Iterator[Chunk]:
    """``chunks`` with any unexpected error turned into a CorruptFile that names the file: never a crash.

    Our own input errors and I/O errors (a disk, not the file) pass through unchanged; ``what`` says in the
    log which reader failed, with its traceback.
    """
    try:
        yield from chunks
    except (InputError, OSError):
        raise
    except Exception as exc:
        log.exception("%s: %s failed", name, what)
        raise CorruptFile(f"{name}: IMU records could not be decoded ({exc}): the file is damaged") from exc

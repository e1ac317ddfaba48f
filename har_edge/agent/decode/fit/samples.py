"""Field values to samples, shared by both engines: calibration, assembly, timestamp correlation, ordering.

The fast reader hands these functions numpy columns, the garmin-fit-sdk path
its decoded values; both get the same numbers from the same arithmetic. Field
values that the FIT profile has as one number but a file carries as an array
(or as text) are refused here with a :class:`~har_edge.agent.errors.CorruptFile`
naming the file, the message and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from har_edge.agent.decode.fit.profile import (
    ACCEL,
    FIT_FIELD_TIMESTAMP,
    GYRO,
    MESG_ACCEL,
    MESG_GYRO,
    MESG_HSA_ACCEL,
    MESG_HSA_GYRO,
    mesg_name,
)
from har_edge.agent.decode.types import FIT_EPOCH_S, SensorBlock
from har_edge.agent.errors import CorruptFile

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
Values = Mapping[str, object]

#: FIT ``date_time`` values below this are seconds since the device powered on, not dates
SYSTEM_TIME_MAX = 0x10000000

_DAMAGED = (
    "the file is damaged or was written by a tool har-edge does not support; "
    "export the original FIT from the watch (Garmin Connect 'Export Original') again"
)


def scalar(value: object, *, name: str, mesg: str, field: str) -> float | None:
    """A field value the profile has as one number, as float (None stays None); CorruptFile otherwise."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        raise CorruptFile(
            f"{name}: field {field} of {mesg} holds {len(value)} values where one is expected: {_DAMAGED}"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CorruptFile(f"{name}: field {field} of {mesg} holds {value!r} where a number is expected: {_DAMAGED}")
    return float(value)


def numbers(value: object, *, name: str, mesg: str, field: str) -> list[float | None]:
    """An array field's values (a scalar is an array of one), each a number or None; CorruptFile otherwise."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return [scalar(v, name=name, mesg=mesg, field=field) for v in items]


@dataclass(frozen=True)
class Calibration:
    """A three_d_sensor_calibration message: calibrated = M · ((raw - level_shift - offset) · factor / divisor)."""

    factor: float
    divisor: float
    level_shift: float
    offset: tuple[float, float, float]
    matrix: tuple[float, ...]  # 9 values, row major, already divided by 65535

    @staticmethod
    def from_values(values: Values, name: str = "the file") -> Calibration | None:
        """From raw field values (``None`` when invalid); None when the message cannot calibrate.

        ``name`` (the file's) is for the CorruptFile raised when a field does not hold what the profile says.
        """
        mesg = "three_d_sensor_calibration"

        def one(key: str) -> float | None:
            return scalar(values.get(key), name=name, mesg=mesg, field=key)

        factor, divisor = one("calibration_factor"), one("calibration_divisor")
        if factor is None or not divisor:
            return None
        offset = [0.0 if v is None else v for v in numbers(values.get("offset_cal") or [0, 0, 0], name=name,
                                                            mesg=mesg, field="offset_cal")]  # fmt: skip
        matrix = numbers(values.get("orientation_matrix") or [], name=name, mesg=mesg, field="orientation_matrix")
        if len(matrix) != 9 or any(v is None for v in matrix):
            matrix = [65535.0, 0.0, 0.0, 0.0, 65535.0, 0.0, 0.0, 0.0, 65535.0]
        padded = [*offset, 0.0, 0.0, 0.0]
        return Calibration(
            factor,
            divisor,
            one("level_shift") or 0.0,
            (padded[0], padded[1], padded[2]),
            tuple(float(v or 0.0) / 65535.0 for v in matrix),
        )

    def apply(self, x: F64, y: F64, z: F64) -> tuple[F64, F64, F64]:
        scale = self.factor / self.divisor
        u = [(a - self.level_shift - off) * scale for a, off in zip((x, y, z), self.offset, strict=True)]
        m = self.matrix
        # written out rather than a matmul: same rounding whatever the array shape
        r0, r1, r2 = (m[3 * r] * u[0] + m[3 * r + 1] * u[1] + m[3 * r + 2] * u[2] for r in range(3))
        return r0, r1, r2


#: sensor type numbers of three_d_sensor_calibration
SENSOR_TYPE = {ACCEL: 0, GYRO: 1}
#: field numbers of three_d_sensor_calibration
CALIBRATION_FIELDS = {
    "calibration_factor": 1,
    "calibration_divisor": 2,
    "level_shift": 3,
    "offset_cal": 4,
    "orientation_matrix": 5,
}
#: field numbers of timestamp_correlation
CORRELATION_FIELDS = {
    "timestamp": 253,
    "fractional_timestamp": 0,
    "system_timestamp": 1,
    "fractional_system_timestamp": 2,
    "timestamp_ms": 4,
    "system_timestamp_ms": 5,
}


@dataclass(frozen=True)
class Source:
    """Where one sensor's samples come from: which message and which fields."""

    kind: str  # ACCEL or GYRO
    mesg: int
    name: str  # calibrated | compressed | raw | hsa
    axes: tuple[int, int, int]  # field numbers
    scale: float = 1.0  # value = raw / scale
    unit: str | None = None
    interval_unit_ms: float | None = None  # hsa: sample i at i * sampling_interval * this

    @property
    def required(self) -> tuple[int, ...]:
        return (FIT_FIELD_TIMESTAMP, 1, *self.axes)


#: candidate sources, best first
SOURCES = {
    ACCEL: (
        Source(ACCEL, MESG_ACCEL, "calibrated", (5, 6, 7), unit=None),
        Source(ACCEL, MESG_ACCEL, "compressed", (8, 9, 10), unit="mg"),
        Source(ACCEL, MESG_ACCEL, "raw", (2, 3, 4), unit="g"),
        Source(ACCEL, MESG_HSA_ACCEL, "hsa", (2, 3, 4), scale=1.024, unit="mg", interval_unit_ms=1.0),
    ),
    GYRO: (
        Source(GYRO, MESG_GYRO, "calibrated", (5, 6, 7), unit="deg/s"),
        Source(GYRO, MESG_GYRO, "raw", (2, 3, 4), unit="deg/s"),
        Source(GYRO, MESG_HSA_GYRO, "hsa", (2, 3, 4), scale=28.57143, unit="deg/s", interval_unit_ms=1000 / 32768),
    ),
}


def choose_source(kind: str, fields_by_mesg: dict[int, set[int]]) -> Source | None:
    """The best source whose fields the file's messages carry."""
    for source in SOURCES[kind]:
        if set(source.required) <= fields_by_mesg.get(source.mesg, set()):
            return source
    return None


def system_time_error(name: str, source: Source) -> CorruptFile:
    return CorruptFile(
        f"{name}: the timestamps of its {mesg_name(source.mesg)} are device time (seconds since the watch powered "
        "on, below 0x10000000) and it holds no timestamp_correlation to turn them into dates: export the original "
        "FIT from the watch, which writes a timestamp_correlation with such data"
    )


def assemble(
    source: Source,
    ts: F64,
    ms: F64,
    second: F64,
    axes: tuple[F64, F64, F64],
    calibration: Calibration | None = None,
    correlation_ms: int | None = None,
    *,
    name: str = "the file",
) -> tuple[I64, F32, I64]:
    """Samples of m messages of n samples each, invalid values as NaN.

    ``ts`` (m,) FIT seconds, ``ms`` (m,) timestamp_ms (NaN: 0), ``second`` field 1:
    (m, n) sample_time_offset in ms, or (m,) sampling_interval for hsa messages;
    ``axes`` three (m, n) arrays. Returns (t_ms int64 (k,), xyz float32 (k, 3),
    message row of each sample (k,)), dropping samples whose time or any axis is
    invalid. A ``ts`` below :data:`SYSTEM_TIME_MAX` is device time, moved by
    ``correlation_ms``; without one such a message raises CorruptFile (naming ``name``).
    """
    m, n = axes[0].shape
    if source.interval_unit_ms is not None:
        offsets = np.rint(second.reshape(m, 1) * (np.arange(n) * source.interval_unit_ms))
    else:
        offsets = second
    if calibration is not None or source.scale != 1.0:
        as64 = (np.asarray(axes[0], np.float64), np.asarray(axes[1], np.float64), np.asarray(axes[2], np.float64))
        axes = calibration.apply(*as64) if calibration is not None else (
            as64[0] / source.scale, as64[1] / source.scale, as64[2] / source.scale)  # fmt: skip
    values = np.empty((m, n, 3), np.float32)
    for i, a in enumerate(axes):
        values[:, :, i] = a
    ts_ok = np.isfinite(ts)
    ok = np.isfinite(offsets) & np.isfinite(values).all(axis=-1) & ts_ok[:, None]
    ts_i = np.where(ts_ok, ts, 0).astype(np.int64)
    base = (ts_i + FIT_EPOCH_S) * 1000 + np.where(np.isfinite(ms), ms, 0).astype(np.int64)
    system = ts_i < SYSTEM_TIME_MAX
    if correlation_ms is not None:
        base = np.where(system, base + correlation_ms, base)
    elif (system & ts_ok).any():
        raise system_time_error(name, source)
    if ok.all():
        t = base[:, None] + offsets.astype(np.int64)
        return t.reshape(-1), values.reshape(-1, 3), np.repeat(np.arange(m), n)
    t = base[:, None] + np.where(ok, offsets, 0).astype(np.int64)
    return t[ok], values[ok], np.nonzero(ok)[0]


def correlation_ms(values: Values, name: str = "the file") -> int | None:
    """Real time minus system time, in ms, from a timestamp_correlation message's raw values."""

    def one(key: str) -> float | None:
        return scalar(values.get(key), name=name, mesg="timestamp_correlation", field=key)

    ts, sys_ts = one("timestamp"), one("system_timestamp")
    if ts is None or sys_ts is None:
        return None

    def millis(seconds: float, ms: float | None, fraction: float | None) -> float:
        if ms is not None:
            return seconds * 1000 + ms
        return seconds * 1000 + (fraction * 1000 / 32768 if fraction is not None else 0)

    real = millis(ts, one("timestamp_ms"), one("fractional_timestamp"))
    system = millis(sys_ts, one("system_timestamp_ms"), one("fractional_system_timestamp"))
    return round(real - system)


def ordered(t: npt.NDArray[np.integer], xyz: npt.NDArray[np.floating]) -> SensorBlock:
    """A SensorBlock sorted by time (stable: equal times keep file order)."""
    if len(t) > 1 and not (np.diff(t) >= 0).all():
        order = np.argsort(t, kind="stable")
        t, xyz = t[order], xyz[order]
    return SensorBlock(np.ascontiguousarray(t, np.int64), np.ascontiguousarray(xyz, np.float32))

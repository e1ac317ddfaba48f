"""The plan: which messages and fields give each sensor's samples, or why a valid FIT gives none ("no IMU")."""

from __future__ import annotations

from dataclasses import dataclass

from har_edge.agent.decode.fit.container import BASE_TYPES, STRING, FastPathUnsupported, FitIndex
from har_edge.agent.decode.fit.profile import (
    ACCEL,
    GYRO,
    IMU_MESGS,
    MESG_CALIBRATION,
    MESG_TIMESTAMP_CORRELATION,
    mesg_name,
)
from har_edge.agent.decode.fit.samples import (
    CALIBRATION_FIELDS,
    CORRELATION_FIELDS,
    SENSOR_TYPE,
    Calibration,
    Source,
    choose_source,
    correlation_ms,
    scalar,
)
from har_edge.agent.errors import NoImuData


@dataclass
class SensorPlan:
    source: Source
    def_ids: list[int]  # definitions that carry the source's fields
    counts: dict[int, int]  # def id -> samples per record
    skipped_records: int  # records of the message that lack the source's fields
    calibrations: list[tuple[int, Calibration]]  # (record offset, calibration), raw sources only


@dataclass
class ImuPlan:
    accel: SensorPlan
    gyro: SensorPlan | None
    correlation_ms: int | None
    notes: list[str]


def _small_named(index: FitIndex, mesg: int, names: dict[str, int]) -> list[tuple[int, dict[str, object]]]:
    """The kept records of a small message, by field name: one value as itself, several as a list."""
    out = []
    for pos, values in index.small.get(mesg, []):
        named: dict[str, object] = {}
        for key, num in names.items():
            vals = values.get(num)
            if vals is None or all(v is None for v in vals):
                continue
            named[key] = vals if len(vals) > 1 else vals[0]
        out.append((pos, named))
    return out


def _sensor_plan(index: FitIndex, kind: str, notes: list[str]) -> SensorPlan | None:
    with_records = [i for i, d in enumerate(index.defs) if d.global_num in IMU_MESGS and len(index.positions[i])]
    fields_by_mesg: dict[int, set[int]] = {}
    for i in with_records:
        d = index.defs[i]
        fields_by_mesg.setdefault(d.global_num, set()).update(f.num for f in d.fields if f.count)
    source = choose_source(kind, fields_by_mesg)
    if source is None:
        return None
    calibrations: list[tuple[int, Calibration]] = []
    if source.name == "raw":
        for pos, values in _small_named(index, MESG_CALIBRATION, {"sensor_type": 0, **CALIBRATION_FIELDS}):
            sensor = scalar(values.get("sensor_type"), name=index.name, mesg=mesg_name(MESG_CALIBRATION),
                            field="sensor_type")  # fmt: skip
            cal = Calibration.from_values(values, index.name) if sensor == SENSOR_TYPE[kind] else None
            if cal is not None:
                calibrations.append((pos, cal))
        if not calibrations:
            notes.append(f"{kind} holds raw counts but there is no three_d_sensor_calibration for it")
            return None
    def_ids: list[int] = []
    counts: dict[int, int] = {}
    skipped = 0
    for i in with_records:
        d = index.defs[i]
        if d.global_num != source.mesg:
            continue
        found = [d.field(num) for num in source.required]
        fields = [f for f in found if f is not None and f.count]
        if len(fields) != len(found):
            skipped += len(index.positions[i])
            continue
        for f in fields:
            if BASE_TYPES[f.effective_type][0][0] not in "iuf" or f.effective_type == STRING:
                raise FastPathUnsupported(f"field {f.num} of message {d.global_num} has base type {f.base_type}")
        per_sample = fields[2:] if source.interval_unit_ms is not None else fields[1:]
        def_ids.append(i)
        counts[i] = min(f.count for f in per_sample)
    return SensorPlan(source, def_ids, counts, skipped, calibrations)


def plan(index: FitIndex) -> ImuPlan:
    """Decide which messages and fields give the samples; NoImuData when there are none."""
    notes: list[str] = []
    accel = _sensor_plan(index, ACCEL, notes)
    if accel is None or not any(len(index.positions[i]) for i in accel.def_ids):
        raise NoImuData(_no_imu_message(index, notes))
    gyro = _sensor_plan(index, GYRO, notes)
    corr = None
    for _pos, values in _small_named(index, MESG_TIMESTAMP_CORRELATION, CORRELATION_FIELDS):
        corr = correlation_ms(values, index.name)
        if corr is not None:
            break
    return ImuPlan(accel, gyro, corr, notes)


def _no_imu_message(index: FitIndex, notes: list[str]) -> str:
    return no_imu_message(index.name, index.message_counts(), notes)


def no_imu_message(name: str, counts: dict[int, int], notes: list[str]) -> str:
    """Why a valid FIT file gives no accelerometer samples, and what to do about it."""
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
    holds = ", ".join(f"{n} {mesg_name(g)}" for g, n in top) or "no messages"
    extra = f" ({'; '.join(notes)})" if notes else ""
    if any(counts.get(m) for m, kind in IMU_MESGS.items() if kind == ACCEL):
        return (
            f"the accelerometer_data in {name} lacks the fields har-edge needs{extra}: timestamp, "
            "sample_time_offset and calibrated_accel_x|y|z (or raw accel_x|y|z with a three_d_sensor_calibration); "
            f"it holds {holds}. Export the original FIT of an IMU recording"
        )
    return (
        f"no accelerometer_data in {name}{extra}: it holds {holds}. Turn on IMU logging on the watch "
        "(Connect IQ sensor logging or Health SDK) and export the original FIT"
    )

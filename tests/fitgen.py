"""FIT fixtures for tests, written with garmin-fit-sdk's ``Encoder``.

``write_imu_fit`` writes a recording of accelerometer_data (and gyroscope_data)
messages the way Garmin's IMU logging does and returns exactly what it wrote,
so tests can compare a decoder's output with it. ``write_activity_fit`` writes
an ordinary activity without IMU messages. ``cached_fit`` makes long fixtures
once and keeps them under a folder the caller gives.

The SDK encoder needs ~21 s per hour of 50 Hz accel + gyro. ``engine="fast"``
writes the same bytes as the Encoder would (a test checks they are identical
on a small file) with ``struct``, ~100x faster, for bench-sized fixtures; it
handles the plain layouts only (no extra messages, developer fields or
Health SDK messages).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from garmin_fit_sdk import Encoder
from garmin_fit_sdk import fit as FIT
from garmin_fit_sdk.crc_calculator import CrcCalculator
from garmin_fit_sdk.profile import Profile

FIT_EPOCH = datetime(1989, 12, 31, tzinfo=UTC)
UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FIT_EPOCH_S = 631065600
DEFAULT_START = datetime(2025, 3, 24, 7, 52, 19, tzinfo=UTC)
GENERATOR_VERSION = 1  # bump when the bytes written for given parameters change

#: signal(t_seconds, rng) -> (accel in milli-g (n, 3), gyro in deg/s (n, 3))
SignalFn = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]

# three_d_sensor_calibration used for raw-count fixtures: calibrated = M · ((raw - shift - offset) · factor / divisor)
ACCEL_CALIBRATION = {
    "sensor_type": 0,
    "calibration_factor": 1,
    "calibration_divisor": 4096,  # counts per g
    "level_shift": 32768,
    "offset_cal": [12, -7, 3],
    "orientation_matrix": [0, 65535, 0, -65535, 0, 0, 0, 0, 65535],  # raw, i.e. x 65535
}
GYRO_CALIBRATION = {
    "sensor_type": 1,
    "calibration_factor": 1,
    "calibration_divisor": 16,  # counts per deg/s
    "level_shift": 32768,
    "offset_cal": [5, -3, 2],
    "orientation_matrix": [65535, 0, 0, 0, 65535, 0, 0, 0, 65535],
}


@dataclass
class ImuFixture:
    """What ``write_imu_fit`` wrote: the samples a decoder must give back."""

    path: Path
    accel_t_ms: np.ndarray  # int64
    accel: np.ndarray  # float32 (n, 3), in accel_unit
    gyro_t_ms: np.ndarray | None
    gyro: np.ndarray | None  # float32 (n, 3), deg/s
    accel_unit: str
    messages: dict[str, int] = field(default_factory=dict)


# -- signals ---------------------------------------------------------------------


def walk_signal(t: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A wrist while walking: gravity (~1000 mg, tilting with the arm swing) + gait at ~1.9 steps/s."""
    step = 1.9
    swing = 0.45 * np.sin(2 * np.pi * step / 2 * t)
    gravity = 1000 * np.stack([np.sin(swing), -np.cos(swing) * 0.97, np.full_like(t, 0.24)], axis=1)
    gait = np.stack(
        [
            260 * np.sin(2 * np.pi * step * t + 0.3) + 70 * np.sin(4 * np.pi * step * t),
            180 * np.sin(2 * np.pi * step * t + 1.1),
            120 * np.sin(2 * np.pi * step * t + 2.0) + 40 * np.sin(6 * np.pi * step * t),
        ],
        axis=1,
    )
    accel = gravity + gait + rng.normal(0, 15, (len(t), 3))
    gyro = np.stack(
        [
            35 * np.sin(2 * np.pi * step / 2 * t + 0.5),
            25 * np.sin(2 * np.pi * step * t),
            110 * np.cos(2 * np.pi * step / 2 * t),
        ],
        axis=1,
    ) + rng.normal(0, 2, (len(t), 3))
    return accel, gyro


def rest_signal(t: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A wrist lying still: gravity on z and sensor noise."""
    accel = np.array([20.0, -35.0, 998.0]) + rng.normal(0, 4, (len(t), 3))
    gyro = rng.normal(0, 0.4, (len(t), 3))
    return accel, gyro


SIGNALS: dict[str, SignalFn] = {"walk": walk_signal, "rest": rest_signal}


# -- message plan ----------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    rate_hz: float
    seconds: float
    start_ms: int
    with_gyro: bool
    accel_unit: str
    gaps: tuple[tuple[float, float], ...]
    raw_counts: bool
    hsa: bool
    samples_per_message: int
    seed: int
    signal: SignalFn
    extra_messages: bool
    developer_field: bool
    #: IMU timestamps are written this many seconds earlier (device time: seconds since power-on)
    system_offset_s: int = 0
    #: write a timestamp_correlation message (real time of the start, and its device time)
    correlation: bool = False
    #: (mesg_num, ((field, value), ...)): fields set on the preamble messages of that number
    preamble_fields: tuple[tuple[int, tuple[tuple[str, object], ...]], ...] = ()
    #: write device_settings with this time_offset (local time minus UTC, s) before the IMU data
    device_time_offset_s: int | None = None
    #: write an activity message at the end whose local_timestamp is this far from its timestamp (s)
    activity_local_offset_s: int | None = None

    @property
    def n_samples(self) -> int:
        return round(self.seconds * self.rate_hz)


def _to_ms(when: datetime) -> int:
    if when.tzinfo is None:
        raise ValueError("start must be timezone-aware (UTC)")
    return (when - UNIX_EPOCH) // timedelta(milliseconds=1)


def _fit_seconds(t_ms: int) -> int:
    return t_ms // 1000 - FIT_EPOCH_S


def _preamble(spec: _Spec) -> list[dict]:
    created = _fit_seconds(spec.start_ms)
    out: list[dict] = [
        {
            "mesg_num": 0,
            "type": 4,  # activity
            "manufacturer": 1,  # garmin
            "product": 3113,
            "serial_number": 3391234567,
            "time_created": created,
        }
    ]
    if spec.extra_messages:
        out.append(
            {
                "mesg_num": 23,
                "timestamp": created,
                "device_index": 0,
                "manufacturer": 1,
                "serial_number": 3391234567,
                "product": 3113,
                "software_version": 12.5,
            }
        )
        out.append({"mesg_num": 21, "timestamp": created, "event": 0, "event_type": 0})
    if spec.developer_field:
        out.append(dict(_DEV_DATA_ID))
        out.append(dict(_FIELD_DESCRIPTION))
    if spec.correlation:
        out.append(
            {
                "mesg_num": 162,
                "timestamp": created,
                "system_timestamp": created - spec.system_offset_s,
                "timestamp_ms": 0,
                "system_timestamp_ms": 0,
            }
        )
    if spec.raw_counts:
        for cal in (ACCEL_CALIBRATION, GYRO_CALIBRATION) if spec.with_gyro else (ACCEL_CALIBRATION,):
            # the Encoder applies the profile's scale (65535) to orientation_matrix
            matrix = [v / 65535 for v in cal["orientation_matrix"]]
            out.append({"mesg_num": 167, "timestamp": created, **cal, "orientation_matrix": matrix})
    if spec.device_time_offset_s is not None:
        # time_offset is uint32: a zone west of UTC is written in two's complement
        out.append({"mesg_num": 2, "active_time_zone": 0, "time_offset": [spec.device_time_offset_s & 0xFFFFFFFF]})
    for num, fields in spec.preamble_fields:
        found = [m for m in out if m["mesg_num"] == num]
        if not found:
            raise ValueError(f"preamble_fields: no message {num} in this file's preamble")
        for m in found:
            m.update(fields)
    return out


_DEV_DATA_ID = {
    "mesg_num": 207,
    "developer_id": list(range(16)),
    "application_id": list(range(16, 32)),
    "developer_data_index": 0,
    "application_version": 3,
}
_FIELD_DESCRIPTION = {
    "mesg_num": 206,
    "developer_data_index": 0,
    "field_definition_number": 0,
    "fit_base_type_id": 2,  # uint8 (one byte: the big-endian rewrite leaves developer bytes as they are)
    "field_name": "strap_quality",
    "units": "%",
}


def _raw_from_calibrated(values: np.ndarray, cal: dict) -> np.ndarray:
    """Counts that give back ``values`` through the calibration (up to count rounding)."""
    matrix = np.array(cal["orientation_matrix"], np.float64).reshape(3, 3) / 65535
    u = values @ np.linalg.inv(matrix).T
    raw = np.rint(u * cal["calibration_divisor"] / cal["calibration_factor"]) + cal["level_shift"]
    raw += np.array(cal["offset_cal"], np.float64)
    return np.clip(raw, 0, 65534)


def _calibrated_from_raw(raw: np.ndarray, cal: dict) -> np.ndarray:
    matrix = np.array(cal["orientation_matrix"], np.float64).reshape(3, 3) / 65535
    u = (raw - cal["level_shift"] - np.array(cal["offset_cal"], np.float64)) * (
        cal["calibration_factor"] / cal["calibration_divisor"]
    )
    return u @ matrix.T


def _imu_blocks(spec: _Spec) -> Iterator[tuple[list[dict], dict[str, np.ndarray]]]:
    """Messages in file order, a block (about an hour) at a time, with the samples they hold."""
    spm = spec.samples_per_message
    per_block = spm * max(1, int(3600 * spec.rate_hz) // spm)
    n = spec.n_samples
    for block, i0 in enumerate(range(0, n, per_block)):
        idx = np.arange(i0, min(n, i0 + per_block))
        t_rel = np.rint(idx * 1000.0 / spec.rate_hz).astype(np.int64)
        keep = np.ones(len(idx), bool)
        for at_s, length_s in spec.gaps:
            keep &= ~((t_rel >= at_s * 1000) & (t_rel < (at_s + length_s) * 1000))
        rng = np.random.default_rng([spec.seed, block])
        accel_mg, gyro = spec.signal(t_rel / 1000.0, rng)
        yield _block_messages(spec, idx, spec.start_ms + t_rel, keep, accel_mg, gyro)


def _block_messages(spec, idx, t_ms, keep, accel_mg, gyro) -> tuple[list[dict], dict[str, np.ndarray]]:
    spm = spec.samples_per_message
    # what goes into the file, and what a decoder must give back
    if spec.hsa:
        accel_written = np.clip(np.rint(accel_mg * 1.024), -32767, 32766)
        accel_expected = accel_written / 1.024
        gyro_written = np.clip(np.rint(gyro * 28.57143), -32767, 32766)
        gyro_expected = gyro_written / 28.57143
    elif spec.raw_counts:
        accel_written = _raw_from_calibrated(accel_mg / 1000, ACCEL_CALIBRATION)
        accel_expected = _calibrated_from_raw(accel_written, ACCEL_CALIBRATION)
        gyro_written = _raw_from_calibrated(gyro, GYRO_CALIBRATION)
        gyro_expected = _calibrated_from_raw(gyro_written, GYRO_CALIBRATION)
    else:
        scale = 1.0 if spec.accel_unit == "mg" else 1000.0
        accel_written = (accel_mg / scale).astype(np.float32)
        accel_expected = accel_written
        gyro_written = gyro.astype(np.float32)
        gyro_expected = gyro_written
    msgs: list[dict] = []
    exp_t = {"accel": [], "gyro": []}
    next_record_s = None
    slot_starts = np.flatnonzero(idx % spm == 0)
    for s in slot_starts.tolist():
        sel = np.arange(s, min(s + spm, len(idx)))
        sel = sel[keep[sel]]
        if not len(sel):
            continue
        t = t_ms[sel]
        first = int(t[0])
        ts, ms = _fit_seconds(first) - spec.system_offset_s, first % 1000
        offsets = (t - first).tolist()
        for kind, written in (("accel", accel_written), ("gyro", gyro_written)):
            if kind == "gyro" and not spec.with_gyro:
                continue
            vals = written[sel]
            if spec.hsa:
                interval = 1000 / spec.rate_hz if kind == "accel" else 32768 / spec.rate_hz
                mesg = {
                    "mesg_num": 302 if kind == "accel" else 376,
                    "timestamp": ts,
                    "timestamp_ms": ms,
                    "sampling_interval": round(interval),
                }
                prefix = "accel_" if kind == "accel" else "gyro_"
                # Encoder scales: pass the unscaled values (mG, deg/s)
                scale = 1.024 if kind == "accel" else 28.57143
                for axis in range(3):
                    mesg[prefix + "xyz"[axis]] = (vals[:, axis] / scale).tolist()
                unit_ms = 1.0 if kind == "accel" else 1000 / 32768
                exp_t[kind].append(first + np.rint(np.arange(len(sel)) * mesg["sampling_interval"] * unit_ms))
            else:
                mesg = {
                    "mesg_num": 165 if kind == "accel" else 164,
                    "timestamp": ts,
                    "timestamp_ms": ms,
                    "sample_time_offset": offsets,
                }
                prefix = ("" if spec.raw_counts else "calibrated_") + ("accel_" if kind == "accel" else "gyro_")
                for axis in range(3):
                    col = vals[:, axis]
                    mesg[prefix + "xyz"[axis]] = [int(v) for v in col] if spec.raw_counts else col.tolist()
                exp_t[kind].append(t)
            if kind == "accel" and spec.developer_field:
                mesg["developer_fields"] = {0: int(first // 1000 % 100)}
            msgs.append(mesg)
        if spec.extra_messages:
            second = first // 1000
            if next_record_s is None or second >= next_record_s:
                msgs.append(
                    {"mesg_num": 20, "timestamp": ts, "heart_rate": 90 + second % 40, "cadence": 55 + second % 7}
                )
                next_record_s = second + 1
    kept = np.flatnonzero(keep)
    expected = {
        "accel_t": np.concatenate(exp_t["accel"]).astype(np.int64) if exp_t["accel"] else np.empty(0, np.int64),
        "accel": accel_expected[kept].astype(np.float32),
        "gyro_t": np.concatenate(exp_t["gyro"]).astype(np.int64) if exp_t["gyro"] else np.empty(0, np.int64),
        "gyro": gyro_expected[kept].astype(np.float32),
    }
    return msgs, expected


def _epilogue(spec: _Spec) -> list[dict]:
    end = _fit_seconds(spec.start_ms + int(spec.seconds * 1000))
    out = [{"mesg_num": 21, "timestamp": end, "event": 0, "event_type": 4}] if spec.extra_messages else []
    if spec.activity_local_offset_s is not None:
        out.append(
            {
                "mesg_num": 34,
                "timestamp": end,
                "local_timestamp": end + spec.activity_local_offset_s,
                "num_sessions": 1,
                "type": 0,
            }
        )
    return out


# -- writers ---------------------------------------------------------------------


def write_imu_fit(
    path: Path,
    *,
    rate_hz: float = 50,
    seconds: float = 60,
    start: datetime = DEFAULT_START,
    with_gyro: bool = True,
    accel_unit: str = "mg",
    gaps: Sequence[tuple[float, float]] = (),
    raw_counts: bool = False,
    hsa: bool = False,
    samples_per_message: int = 25,
    seed: int = 0,
    signal: str | SignalFn = "walk",
    extra_messages: bool = False,
    developer_field: bool = False,
    big_endian: bool = False,
    engine: str = "sdk",
    system_time_s: int | None = None,
    correlation: bool | None = None,
    preamble_fields: Mapping[int, Mapping[str, object]] | None = None,
    device_time_offset_s: int | None = None,
    activity_local_offset_s: int | None = None,
) -> ImuFixture:
    """Write an IMU FIT file and return the samples it holds.

    ``accel_unit`` is the unit of calibrated_accel values ("mg", as real devices
    write, or "g", as the profile says); raw counts (with a
    three_d_sensor_calibration) decode to g, Health SDK messages to mg.
    ``gaps``: (at seconds, length seconds) stretches without samples.
    ``big_endian`` rewrites every message big-endian after encoding.
    ``system_time_s``: IMU timestamps are device time (seconds since power-on, below
    0x10000000), this at the start; a timestamp_correlation gives their real time unless
    ``correlation`` is False (``correlation=True`` writes one for a real-time file too).
    ``preamble_fields``: {mesg_num: {field: value}} set on the messages written before the
    IMU data (file_id 0, timestamp_correlation 162, three_d_sensor_calibration 167, ...),
    e.g. an array where the profile has one value, as damaged or odd files hold.
    ``device_time_offset_s`` writes a device_settings message with that time_offset and
    ``activity_local_offset_s`` an activity message whose local_timestamp is that far ahead of UTC.
    The returned times are real times either way.
    """
    if accel_unit not in ("mg", "g"):
        raise ValueError("accel_unit must be 'mg' or 'g'")
    if raw_counts and hsa:
        raise ValueError("raw_counts and hsa exclude each other")
    limit = 127 if raw_counts or hsa else 63
    if not 1 <= samples_per_message <= limit:
        raise ValueError(f"samples_per_message must be within 1..{limit} (a FIT field holds 255 bytes)")
    start_ms = _to_ms(start)
    system_offset_s = 0 if system_time_s is None else _fit_seconds(start_ms) - system_time_s
    spec = _Spec(
        float(rate_hz), float(seconds), start_ms, with_gyro, accel_unit, tuple(gaps), raw_counts, hsa,
        samples_per_message, seed, SIGNALS[signal] if isinstance(signal, str) else signal, extra_messages,
        developer_field, system_offset_s, system_time_s is not None if correlation is None else correlation,
        tuple((num, tuple(fields.items())) for num, fields in (preamble_fields or {}).items()),
        device_time_offset_s, activity_local_offset_s,
    )  # fmt: skip
    path = Path(path)
    parts: dict[str, list[np.ndarray]] = {"accel_t": [], "accel": [], "gyro_t": [], "gyro": []}

    def blocks() -> Iterator[list[dict]]:
        for msgs, expected in _imu_blocks(spec):
            for key, value in expected.items():
                parts[key].append(value)
            yield msgs

    counts = _write(path, spec, blocks(), engine)
    if big_endian:
        path.write_bytes(to_big_endian(path.read_bytes()))
    cat = {k: np.concatenate(v) if v else None for k, v in parts.items()}
    unit = "mg" if hsa else "g" if raw_counts else accel_unit
    return ImuFixture(
        path,
        cat["accel_t"],
        cat["accel"],
        cat["gyro_t"] if with_gyro else None,
        cat["gyro"] if with_gyro else None,
        unit,
        counts,
    )


def _write(path: Path, spec: _Spec, blocks: Iterator[list[dict]], engine: str) -> dict[str, int]:
    counts: dict[str, int] = {}

    def each() -> Iterator[dict]:
        yield from _preamble(spec)
        for msgs in blocks:
            yield from msgs
        yield from _epilogue(spec)

    def counted(it: Iterator[dict]) -> Iterator[dict]:
        for mesg in it:
            name = Profile["messages"][mesg["mesg_num"]]["name"]
            counts[name] = counts.get(name, 0) + 1
            yield mesg

    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    if engine == "sdk":
        encoder = Encoder(
            field_descriptions={
                0: {"developer_data_id_mesg": _DEV_DATA_ID, "field_description_mesg": _FIELD_DESCRIPTION}
            }
            if spec.developer_field
            else None
        )
        for mesg in counted(each()):
            encoder.write_mesg(mesg)
        tmp.write_bytes(encoder.close())
    elif engine == "fast":
        if spec.extra_messages or spec.developer_field or spec.hsa:
            raise ValueError("engine='fast' writes plain accel/gyro files only")
        with open(tmp, "w+b") as f:
            _FastEncoder(f).write_all(counted(each()))
    else:
        raise ValueError("engine must be 'sdk' or 'fast'")
    os.replace(tmp, path)
    return counts


class _FastEncoder:
    """Writes what garmin-fit-sdk's Encoder writes for plain messages (same definitions, same order)."""

    def __init__(self, f) -> None:
        self.f = f
        self.locals: list[tuple | None] = [None] * 16
        self.next_local = 0
        self.layouts: dict[tuple, tuple[int, struct.Struct, list]] = {}

    def write_all(self, messages: Iterator[dict]) -> None:
        self.f.write(bytes(14))
        out = bytearray()
        for mesg in messages:
            self._mesg(mesg, out)
            if len(out) > 1 << 20:
                self.f.write(out)
                out.clear()
        self.f.write(out)
        data_size = self.f.tell() - 14
        header = bytearray(14)
        header[0], header[1] = 14, 0x20
        struct.pack_into("<HI", header, 2, Profile["version"]["major"] * 1000 + Profile["version"]["minor"], data_size)
        header[8:12] = b".FIT"
        struct.pack_into("<H", header, 12, CrcCalculator.calculate_crc(header, 0, 12))
        self.f.seek(0)
        self.f.write(header)
        self.f.flush()
        self.f.seek(0)
        from har_edge.agent.decode.fit.crc import Crc16

        crc = Crc16()
        while block := self.f.read(4 << 20):
            crc.update(block)
        self.f.seek(0, os.SEEK_END)
        self.f.write(struct.pack("<H", crc.value))

    def _mesg(self, mesg: dict, out: bytearray) -> None:
        num = mesg["mesg_num"]
        names = [k for k in mesg if k != "mesg_num" and mesg[k] is not None]
        sizes = tuple(len(mesg[k]) if isinstance(mesg[k], list) else 1 for k in names)
        key = (num, tuple(names), sizes)
        layout = self.layouts.get(key)
        if layout is None or self.locals[layout[0]] is None or self.locals[layout[0]][0] != layout[3]:
            layout = self._define(num, names, sizes, out)
            self.layouts[key] = layout
        local, packer, order, _ = layout
        values: list = []
        for name in order:
            value = mesg[name]
            if isinstance(value, list):
                values.extend(value)
            else:
                values.append(value)
        out += packer.pack(local, *values)

    def _define(self, num: int, names: list[str], sizes: tuple, out: bytearray) -> tuple:
        profile = {f["name"]: f for f in Profile["messages"][num]["fields"].values()}
        fields = []
        for name, count in zip(names, sizes, strict=False):
            fp = profile[name]
            if fp["scale"] != [1] or fp["offset"] != [0]:
                raise ValueError(f"engine='fast' does not scale fields ({name})")
            base = FIT.FIELD_TYPE_TO_BASE_TYPE[fp["base_type"]]
            fields.append((name, fp["num"], base, count))
        ident = (num, frozenset((f[1], f[3] * FIT.BASE_TYPE_DEFINITIONS[f[2]]["size"], f[2]) for f in fields))
        for local, stored in enumerate(self.locals):  # noqa: B007 (the Encoder reuses an equal definition: local is returned)
            if stored is not None and stored[0] == ident:
                order = stored[1]
                break
        else:
            local = self.next_local & 0x0F
            self.next_local += 1
            order = [f[0] for f in fields]
            self.locals[local] = (ident, order)
            out += struct.pack("<BBBHB", 0x40 | local, 0, 0, num, len(fields))
            for _, fnum, base, count in fields:
                bdef = FIT.BASE_TYPE_DEFINITIONS[base]
                out += struct.pack("<BBB", fnum, count * bdef["size"], base | bdef["endian_flag"])
        by_name = {f[0]: f for f in fields}
        fmt = "<B" + "".join(f"{by_name[n][3]}{FIT.BASE_TYPE_DEFINITIONS[by_name[n][2]]['type_code']}" for n in order)
        return local, struct.Struct(fmt), order, ident


def to_big_endian(data: bytes) -> bytes:
    """The same FIT file with every definition big-endian and every value byte-swapped.

    Developer fields are left as they are (fixtures use one-byte developer fields).
    """
    out = bytearray(data)
    header_size = data[0]
    data_size = struct.unpack_from("<I", data, 4)[0]
    pos, end = header_size, header_size + data_size
    layouts: dict[int, list[tuple[int, int]]] = {}
    while pos < end:
        h = data[pos]
        if h & 0x40:
            if data[pos + 2] != 0:
                raise ValueError("already big-endian")
            out[pos + 2] = 1
            out[pos + 3 : pos + 5] = data[pos + 3 : pos + 5][::-1]
            nf = data[pos + 5]
            fields = []
            for i in range(nf):
                _fnum, size, base = data[pos + 6 + 3 * i : pos + 9 + 3 * i]
                width = FIT.BASE_TYPE_DEFINITIONS[base & 0x1F]["size"]
                if base & 0x1F == FIT.BASE_TYPE["STRING"] or size % width:
                    width = 1
                fields.append((size, width))
            p = pos + 6 + 3 * nf
            if h & 0x20:
                nd = data[p]
                fields.append((sum(data[p + 2 + 3 * i] for i in range(nd)), 1))
                p += 1 + 3 * nd
            layouts[h & 0x0F] = fields
            pos = p
        else:
            p = pos + 1
            for size, width in layouts[h & 0x0F]:
                if width > 1:
                    for q in range(p, p + size, width):
                        out[q : q + width] = data[q : q + width][::-1]
                p += size
            pos = p
    struct.pack_into("<H", out, end, CrcCalculator.calculate_crc(out, 0, end))
    return bytes(out)


def write_activity_fit(path: Path, *, minutes: int = 5, start: datetime = DEFAULT_START) -> Path:
    """An ordinary running activity (file_id, events, 1 Hz records, lap, session, activity), no IMU."""
    t0 = _fit_seconds(_to_ms(start))
    encoder = Encoder()
    encoder.write_mesg({"mesg_num": 0, "type": 4, "manufacturer": 1, "product": 3113,
                        "serial_number": 3391234567, "time_created": t0})  # fmt: skip
    encoder.write_mesg({"mesg_num": 21, "timestamp": t0, "event": 0, "event_type": 0})
    for s in range(minutes * 60):
        encoder.write_mesg(
            {
                "mesg_num": 20,
                "timestamp": t0 + s,
                "position_lat": 574_000_000 + 40 * s,
                "position_long": 127_000_000 + 25 * s,
                "heart_rate": 120 + s % 30,
                "cadence": 85,
                "distance": 2.8 * s,
            }
        )
    end = t0 + minutes * 60
    encoder.write_mesg({"mesg_num": 21, "timestamp": end, "event": 0, "event_type": 4})
    encoder.write_mesg({"mesg_num": 19, "timestamp": end, "start_time": t0, "total_elapsed_time": minutes * 60.0})
    encoder.write_mesg({"mesg_num": 18, "timestamp": end, "start_time": t0, "sport": 1,
                        "total_elapsed_time": minutes * 60.0})  # fmt: skip
    encoder.write_mesg({"mesg_num": 34, "timestamp": end, "num_sessions": 1, "type": 0})
    path = Path(path)
    path.write_bytes(encoder.close())
    return path


def cached_fit(
    cache_dir: Path,
    *,
    hours: float = 1.0,
    rate_hz: float = 50,
    with_gyro: bool = True,
    seed: int = 0,
    signal: str = "walk",
    samples_per_message: int = 25,
    engine: str = "fast",
) -> Path:
    """A long IMU fixture, written once per parameter set under ``cache_dir`` and reused."""
    params = {
        "hours": hours, "rate_hz": rate_hz, "with_gyro": with_gyro, "seed": seed, "signal": signal,
        "samples_per_message": samples_per_message, "engine": engine, "version": GENERATOR_VERSION,
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"imu_{hours:g}h_{rate_hz:g}hz_{'ag' if with_gyro else 'a'}_{key}.fit"
    if not path.exists():
        spec = _Spec(
            float(rate_hz), hours * 3600.0, _to_ms(DEFAULT_START), with_gyro, "mg", (), False, False,
            samples_per_message, seed, SIGNALS[signal], False, False,
        )  # fmt: skip
        _write(path, spec, (msgs for msgs, _ in _imu_blocks(spec)), engine)
    return path

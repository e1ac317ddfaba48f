"""The garmin-fit-sdk fallback: decode a FIT file the fast reader does not handle, with the official decoder.

It holds the whole file in memory (fine for the rare files that need it, slow for
a day-long recording) and turns the SDK's raw values into samples with the same
arithmetic as the fast path (:mod:`har_edge.agent.decode.fit.samples`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from har_edge.agent.decode.fit.chunks import MAX_CHUNK_SAMPLES, guarded
from har_edge.agent.decode.fit.container import SMALL_MESG_LIMIT, FileIdentity, Verified, verify
from har_edge.agent.decode.fit.meta import Fields, recording_meta
from har_edge.agent.decode.fit.plan import no_imu_message
from har_edge.agent.decode.fit.profile import (
    ACCEL,
    GYRO,
    IMU_MESGS,
    MESG_ACTIVITY,
    MESG_CALIBRATION,
    MESG_DEVICE_INFO,
    MESG_DEVICE_SETTINGS,
    MESG_FILE_ID,
    MESG_TIMESTAMP_CORRELATION,
    SMALL_MESGS,
    mesg_name,
    sdk_profile,
)
from har_edge.agent.decode.fit.samples import (
    CALIBRATION_FIELDS,
    SENSOR_TYPE,
    Calibration,
    Source,
    assemble,
    choose_source,
    correlation_ms,
    ordered,
    scalar,
)
from har_edge.agent.decode.types import Chunk, Recording
from har_edge.agent.errors import CorruptFile, InputError, NoImuData, UnknownFormat

log = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
Message = dict[str, Any]
Samples = tuple[I64, F32]


class _SdkCollector:
    """mesg_listener that keeps the messages we need, numbered in file order."""

    def __init__(self) -> None:
        self.seq = 0
        self.imu: dict[int, list[tuple[int, Message]]] = {m: [] for m in IMU_MESGS}
        self.small: dict[int, list[tuple[int, Message]]] = {m: [] for m in SMALL_MESGS}
        self.counts: dict[int, int] = {}

    def __call__(self, mesg_num: int, message: Message) -> None:
        self.seq += 1
        self.counts[mesg_num] = self.counts.get(mesg_num, 0) + 1
        if mesg_num in self.imu:
            self.imu[mesg_num].append((self.seq, message))
        elif mesg_num in self.small and len(self.small[mesg_num]) < SMALL_MESG_LIMIT:
            self.small[mesg_num].append((self.seq, message))


def _sdk_error(name: str, error: Exception) -> InputError:
    text = str(error)
    if "Compressed timestamp" in text:
        return UnknownFormat(
            f"{name} uses compressed-timestamp records that garmin-fit-sdk cannot read ({text}): "
            "export the original FIT from Garmin Connect"
        )
    if "not a fit file" in text:
        return CorruptFile(f"{name} holds bytes after its FIT data that are not FIT ({text}): the file is damaged")
    if "CRC" in text:
        return CorruptFile(f"{name} fails its CRC check ({text}): copy or export it again")
    if "local message" in text:
        return CorruptFile(f"{name} uses an undefined local message ({text}): the file is damaged")
    return CorruptFile(f"{name} could not be decoded by garmin-fit-sdk ({text}): the file is damaged")


def _sdk_messages(path: Path, name: str, verified: Verified | None) -> _SdkCollector:
    from garmin_fit_sdk import Decoder, Stream

    # the same header / size / CRC checks as the fast path, so the errors read the same
    if verified is None or not verified.holds_for(FileIdentity.of(path)):
        verify(path, name)
    collector = _SdkCollector()
    stream = Stream.from_file(str(path))
    try:
        _, errors = Decoder(stream).read(
            apply_scale_and_offset=False,  # raw values: scales are applied by samples.assemble, as on the fast path
            convert_datetimes_to_dates=False,
            convert_types_to_strings=False,
            enable_crc_check=True,
            expand_sub_fields=False,
            expand_components=False,
            merge_heart_rates=False,
            mesg_listener=collector,
        )
    finally:
        stream.close()
    if errors:
        raise _sdk_error(name, errors[0])
    return collector


def _as_array(value: object, n: int | None = None) -> F64:
    """SDK field value (scalar, list with None, or None) as float64 with NaN for invalid."""
    if value is None:
        vals: list[object] = [None] * (n or 1)
    elif isinstance(value, (list, tuple)):
        vals = list(value)
    else:
        vals = [value]
    arr = np.array([v if isinstance(v, (int, float)) else np.nan for v in vals], np.float64)
    return arr[:n] if n is not None else arr


def _sdk_fields(source: Source) -> dict[int, str]:
    prof = sdk_profile()["messages"][source.mesg]["fields"]
    return {num: str(prof[num]["name"]) for num in source.required}


def _sdk_source(kind: str, collector: _SdkCollector) -> Source | None:
    fields_by_mesg: dict[int, set[int]] = {}
    for mesg, items in collector.imu.items():
        if IMU_MESGS[mesg] != kind or not items:
            continue
        names = {f["name"]: num for num, f in sdk_profile()["messages"][mesg]["fields"].items()}
        present = fields_by_mesg.setdefault(mesg, set())
        for _, message in items:
            present.update(names[k] for k in message if k in names and message[k] is not None)
    return choose_source(kind, fields_by_mesg)


def _sdk_calibrations(kind: str, collector: _SdkCollector, name: str) -> list[tuple[int, Calibration]]:
    out = []
    mesg = mesg_name(MESG_CALIBRATION)
    for seq, message in collector.small[MESG_CALIBRATION]:
        if scalar(message.get("sensor_type"), name=name, mesg=mesg, field="sensor_type") != SENSOR_TYPE[kind]:
            continue
        cal = Calibration.from_values({k: message.get(k) for k in CALIBRATION_FIELDS}, name)
        if cal is not None:
            out.append((seq, cal))
    return out


def _sdk_samples(
    source: Source,
    items: list[tuple[int, Message]],
    cals: list[tuple[int, Calibration]],
    corr: int | None,
    name: str,
) -> tuple[list[int], list[Samples]]:
    """Per usable message: its sequence number and its samples."""
    names = _sdk_fields(source)
    ts_name, second_name = names[253], names[1]
    axis_names = [names[a] for a in source.axes]
    cal_seq = np.array([s for s, _ in cals], np.int64)
    seqs: list[int] = []
    out: list[Samples] = []
    for seq, message in items:
        values = [message.get(k) for k in (ts_name, second_name, *axis_names)]
        if any(v is None for v in values):
            continue
        axes = [_as_array(v) for v in values[2:]]
        if source.interval_unit_ms is not None:
            n = min(len(a) for a in axes)
            second = _as_array(values[1])[:1]
        else:
            second = _as_array(values[1])
            n = min(len(second), *(len(a) for a in axes))
            second = second[:n].reshape(1, n)
        cal = None
        if source.name == "raw":
            cal = cals[max(int(np.searchsorted(cal_seq, seq)) - 1, 0)][1]
        # timestamp and timestamp_ms are one value each; an array gives its first, as on the fast path
        t, v, _ = assemble(
            source,
            _as_array(values[0])[:1],
            _as_array(message.get("timestamp_ms"))[:1],
            second,
            (axes[0][:n].reshape(1, n), axes[1][:n].reshape(1, n), axes[2][:n].reshape(1, n)),
            cal,
            corr,
            name=name,
        )
        seqs.append(seq)
        out.append((t, v))
    return seqs, out


def decode_sdk(path: Path, name: str, verified: Verified | None = None) -> Recording:
    """Decode with garmin-fit-sdk (``verified``: the file's header, size and CRC were checked already)."""
    collector = _sdk_messages(path, name, verified)
    notes: list[str] = []
    sources: dict[str, Source | None] = {}
    cals: dict[str, list[tuple[int, Calibration]]] = {}
    for kind in (ACCEL, GYRO):
        source = _sdk_source(kind, collector)
        cals[kind] = _sdk_calibrations(kind, collector, name) if source and source.name == "raw" else []
        if source is not None and source.name == "raw" and not cals[kind]:
            notes.append(f"{kind} holds raw counts but there is no three_d_sensor_calibration for it")
            source = None
        sources[kind] = source
    corr = None
    for _, message in collector.small[MESG_TIMESTAMP_CORRELATION]:
        if (corr := correlation_ms(message, name)) is not None:
            break
    per_kind: dict[str, tuple[list[int], list[Samples]]] = {}
    for kind, source in sources.items():
        if source is not None:
            per_kind[kind] = _sdk_samples(source, collector.imu[source.mesg], cals[kind], corr, name)
    accel_source = sources[ACCEL]
    if accel_source is None or ACCEL not in per_kind or not per_kind[ACCEL][0]:
        raise NoImuData(no_imu_message(name, collector.counts, notes))
    gyro_source = sources[GYRO] if GYRO in per_kind else None
    meta = recording_meta(
        "sdk",
        dict(collector.counts),
        [_named_to_nums(m, MESG_FILE_ID) for _, m in collector.small[MESG_FILE_ID]],
        [_named_to_nums(m, MESG_DEVICE_INFO) for _, m in collector.small[MESG_DEVICE_INFO]],
        accel_source,
        gyro_source,
        corr,
        notes,
        device_settings=[_named_to_nums(m, MESG_DEVICE_SETTINGS) for _, m in collector.small[MESG_DEVICE_SETTINGS]],
        activities=[_named_to_nums(m, MESG_ACTIVITY) for _, m in collector.small[MESG_ACTIVITY]],
    )
    accel_seqs, accel_samples = per_kind[ACCEL]
    gyro_seqs, gyro_samples = per_kind.get(GYRO, ([], []))

    def chunks() -> Iterator[Chunk]:  # samples we decoded but cannot group: a damaged file, said so
        gyro = gyro_source is not None
        return guarded(name, _sdk_chunks(accel_seqs, accel_samples, gyro_seqs, gyro_samples, gyro), "grouping samples")

    return Recording(
        name=name,
        format="fit",
        chunks=chunks,
        accel_unit=accel_source.unit,
        has_gyro=gyro_source is not None,
        meta=meta,
    )


def _sdk_chunks(
    a_seq: list[int],
    a: list[Samples],
    g_seq: list[int],
    g: list[Samples],
    has_gyro: bool,
    max_samples: int = MAX_CHUNK_SAMPLES,
) -> Iterator[Chunk]:
    """Group messages in file order, at most max_samples per sensor (like the fast path)."""
    items = sorted(
        [(s, 0, x) for s, x in zip(a_seq, a, strict=True)] + [(s, 1, x) for s, x in zip(g_seq, g, strict=True)],
        key=lambda i: i[0],
    )
    group: list[list[Samples]] = [[], []]
    counts = [0, 0]

    def flush() -> Chunk:
        blocks = [
            ordered(
                np.concatenate([t for t, _ in parts]) if parts else np.empty(0, np.int64),
                np.concatenate([v for _, v in parts]) if parts else np.empty((0, 3), np.float32),
            )
            for parts in group
        ]
        return Chunk(blocks[0], blocks[1] if has_gyro else None)

    for _, kind, samples in items:
        if counts[kind] + len(samples[0]) > max_samples:
            yield flush()
            group, counts = [[], []], [0, 0]
        group[kind].append(samples)
        counts[kind] += len(samples[0])
    if any(group):
        yield flush()


def _named_to_nums(message: Message, mesg: int) -> Fields:
    fields = {f["name"]: num for num, f in sdk_profile()["messages"][mesg]["fields"].items()}
    out: Fields = {}
    for key, value in message.items():
        if key in fields:
            out[fields[key]] = list(value) if isinstance(value, (list, tuple)) else [value]
    return out

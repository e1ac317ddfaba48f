"""Garmin FIT files: IMU samples out, or an InputError a person can act on.

``decode_fit`` checks the file (header, size, CRC) and indexes its records in one
streaming pass with :mod:`har_edge.agent.decode.fitfast`, then hands back a lazy
:class:`~har_edge.agent.decode.types.Recording` whose chunks are read with numpy. A
layout the fast reader does not support falls back to the official
garmin-fit-sdk decoder, which holds the whole file in memory (fine for the rare
files that need it, slow for a day-long recording).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from har_edge.agent.decode import fitfast
from har_edge.agent.decode.fitfast import (
    ACCEL,
    CALIBRATION_FIELDS,
    GYRO,
    IMU_MESGS,
    MAX_CHUNK_SAMPLES,
    SENSOR_TYPE,
    Calibration,
    Source,
    mesg_name,
)
from har_edge.agent.decode.types import Chunk, Recording
from har_edge.agent.errors import CorruptFile, InputError, NoImuData, UnknownFormat

log = logging.getLogger(__name__)

ENGINES = ("auto", "fast", "sdk")


def fit_file_complete(path: Path) -> bool:
    """True when the file's header is valid, all its bytes are there and its CRC is right.

    Cheap enough to poll while a file is being copied (~0.3 s for 100 MB).
    """
    try:
        return fitfast.file_complete(Path(path))
    except OSError as exc:
        log.debug("cannot read %s yet: %s", path, exc)
        return False


def decode_fit(path: Path, name: str | None = None, *, engine: str = "auto") -> Recording:
    """Open a FIT file holding IMU messages as a lazy Recording.

    Raises an :class:`~har_edge.agent.errors.InputError` subclass for anything wrong with the
    bytes: ``UnknownFormat`` (not FIT), ``CorruptFile`` (truncated, bad CRC,
    undefined messages, never finalized), ``NoImuData`` (a valid FIT without
    accelerometer samples). ``engine`` is "auto" (fast reader, the SDK when the
    fast one does not apply), "fast" or "sdk".
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    path = Path(path)
    name = name or path.name
    if engine != "sdk":
        try:
            return _decode_fast(path, name)
        except fitfast.FastPathUnsupported as exc:
            if engine == "fast":
                raise
            log.info("%s: the fast FIT reader does not apply (%s); decoding with garmin-fit-sdk", name, exc)
        except (InputError, OSError):
            raise
        except Exception:  # a bug of ours must not lose the file: let the SDK decide
            if engine == "fast":
                raise
            log.exception("%s: the fast FIT reader failed; decoding with garmin-fit-sdk", name)
    try:
        return _decode_sdk(path, name)
    except (InputError, OSError):
        raise
    except Exception as exc:  # whatever the SDK path trips on, the file is refused, never the agent crashed
        log.exception("%s: decoding with garmin-fit-sdk failed", name)
        raise CorruptFile(f"{name} could not be decoded ({type(exc).__name__}: {exc}): the file is damaged") from exc


# -- fast path -----------------------------------------------------------------


def _decode_fast(path: Path, name: str) -> Recording:
    index = fitfast.scan(path, name)
    imu = fitfast.plan(index)
    meta = _meta(
        "fast",
        index.message_counts(),
        [v for _, v in index.small.get(fitfast.MESG_FILE_ID, [])],
        [v for _, v in index.small.get(fitfast.MESG_DEVICE_INFO, [])],
        imu.accel.source,
        imu.gyro.source if imu.gyro else None,
        imu.correlation_ms,
        imu.notes,
    )
    meta["skipped_messages"] = imu.accel.skipped_records + (imu.gyro.skipped_records if imu.gyro else 0)
    if index.compressed_records:
        meta["compressed_timestamp_records"] = index.compressed_records

    def chunks() -> Iterator[Chunk]:
        try:
            yield from fitfast.iter_chunks(index, imu)
        except (InputError, OSError):
            raise
        except Exception as exc:  # bytes we indexed but cannot read: say so, never crash the agent
            log.exception("%s: decoding IMU records failed", name)
            raise CorruptFile(f"{name}: IMU records could not be decoded ({exc}): the file is damaged") from exc

    return Recording(
        name=name,
        format="fit",
        chunks=chunks,
        accel_unit=imu.accel.source.unit,
        has_gyro=imu.gyro is not None,
        meta=meta,
    )


# -- garmin-fit-sdk path ---------------------------------------------------------

_SDK_OPTIONS = dict(
    apply_scale_and_offset=False,  # raw values: scales are applied by fitfast.assemble, as on the fast path
    convert_datetimes_to_dates=False,
    convert_types_to_strings=False,
    enable_crc_check=True,
    expand_sub_fields=False,
    expand_components=False,
    merge_heart_rates=False,
)


class _SdkCollector:
    """mesg_listener that keeps the messages we need, numbered in file order."""

    def __init__(self) -> None:
        self.seq = 0
        self.imu: dict[int, list[tuple[int, dict]]] = {m: [] for m in IMU_MESGS}
        self.small: dict[int, list[tuple[int, dict]]] = {m: [] for m in fitfast.SMALL_MESGS}
        self.counts: dict[int, int] = {}

    def __call__(self, mesg_num: int, message: dict) -> None:
        self.seq += 1
        self.counts[mesg_num] = self.counts.get(mesg_num, 0) + 1
        if mesg_num in self.imu:
            self.imu[mesg_num].append((self.seq, message))
        elif mesg_num in self.small and len(self.small[mesg_num]) < fitfast.SMALL_MESG_LIMIT:
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


def _sdk_messages(path: Path, name: str) -> _SdkCollector:
    from garmin_fit_sdk import Decoder, Stream

    # the same header / size / CRC checks as the fast path, so the errors read the same
    fitfast.verify(path, name)
    collector = _SdkCollector()
    stream = Stream.from_file(str(path))
    try:
        _, errors = Decoder(stream).read(**_SDK_OPTIONS, mesg_listener=collector)
    finally:
        stream.close()
    if errors:
        raise _sdk_error(name, errors[0])
    return collector


def _as_array(value: object, n: int | None = None) -> np.ndarray:
    """SDK field value (scalar, list with None, or None) as float64 with NaN for invalid."""
    if value is None:
        vals: list = [None] * (n or 1)
    elif isinstance(value, (list, tuple)):
        vals = list(value)
    else:
        vals = [value]
    arr = np.array([v if isinstance(v, (int, float)) else np.nan for v in vals], np.float64)
    return arr[:n] if n is not None else arr


def _sdk_fields(source: Source) -> dict[int, str]:
    prof = fitfast.sdk_profile()["messages"][source.mesg]["fields"]
    return {num: prof[num]["name"] for num in source.required}


def _sdk_source(kind: str, collector: _SdkCollector) -> Source | None:
    fields_by_mesg: dict[int, set[int]] = {}
    for mesg, items in collector.imu.items():
        if IMU_MESGS[mesg] != kind or not items:
            continue
        names = {f["name"]: num for num, f in fitfast.sdk_profile()["messages"][mesg]["fields"].items()}
        present = fields_by_mesg.setdefault(mesg, set())
        for _, message in items:
            present.update(names[k] for k in message if k in names and message[k] is not None)
    return fitfast.choose_source(kind, fields_by_mesg)


def _sdk_calibrations(kind: str, collector: _SdkCollector) -> list[tuple[int, Calibration]]:
    out = []
    for seq, message in collector.small[fitfast.MESG_CALIBRATION]:
        if message.get("sensor_type") != SENSOR_TYPE[kind]:
            continue
        cal = Calibration.from_values({k: message.get(k) for k in CALIBRATION_FIELDS})
        if cal is not None:
            out.append((seq, cal))
    return out


def _sdk_samples(
    source: Source, items: list[tuple[int, dict]], cals: list[tuple[int, Calibration]], corr: int | None
) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]]]:
    """Per usable message: its sequence number and its samples."""
    names = _sdk_fields(source)
    ts_name, second_name = names[253], names[1]
    axis_names = [names[a] for a in source.axes]
    cal_seq = np.array([s for s, _ in cals], np.int64)
    seqs, out = [], []
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
        t, v, _ = fitfast.assemble(
            source,
            _as_array(values[0]),
            _as_array(message.get("timestamp_ms")),
            second,
            tuple(a[:n].reshape(1, n) for a in axes),
            cal,
            corr,
        )
        seqs.append(seq)
        out.append((t, v))
    return seqs, out


def _decode_sdk(path: Path, name: str) -> Recording:
    collector = _sdk_messages(path, name)
    notes: list[str] = []
    sources, cals = {}, {}
    for kind in (ACCEL, GYRO):
        source = _sdk_source(kind, collector)
        cals[kind] = _sdk_calibrations(kind, collector) if source and source.name == "raw" else []
        if source is not None and source.name == "raw" and not cals[kind]:
            notes.append(f"{kind} holds raw counts but there is no three_d_sensor_calibration for it")
            source = None
        sources[kind] = source
    corr = None
    for _, message in collector.small[fitfast.MESG_TIMESTAMP_CORRELATION]:
        if (corr := fitfast.correlation_ms(message)) is not None:
            break
    per_kind = {}
    for kind, source in sources.items():
        if source is not None:
            per_kind[kind] = _sdk_samples(source, collector.imu[source.mesg], cals[kind], corr)
    if ACCEL not in per_kind or not per_kind[ACCEL][0]:
        raise NoImuData(fitfast.no_imu_message(name, collector.counts, notes))
    accel_source, gyro_source = sources[ACCEL], sources[GYRO] if GYRO in per_kind else None
    meta = _meta(
        "sdk",
        dict(collector.counts),
        [_named_to_nums(m, fitfast.MESG_FILE_ID) for _, m in collector.small[fitfast.MESG_FILE_ID]],
        [_named_to_nums(m, fitfast.MESG_DEVICE_INFO) for _, m in collector.small[fitfast.MESG_DEVICE_INFO]],
        accel_source,
        gyro_source,
        corr,
        notes,
    )
    accel_seqs, accel_samples = per_kind[ACCEL]
    gyro_seqs, gyro_samples = per_kind.get(GYRO, ([], []))

    def chunks() -> Iterator[Chunk]:
        yield from _sdk_chunks(accel_seqs, accel_samples, gyro_seqs, gyro_samples, gyro_source is not None)

    return Recording(
        name=name,
        format="fit",
        chunks=chunks,
        accel_unit=accel_source.unit,
        has_gyro=gyro_source is not None,
        meta=meta,
    )


def _sdk_chunks(
    a_seq: list[int], a: list, g_seq: list[int], g: list, has_gyro: bool, max_samples: int = MAX_CHUNK_SAMPLES
) -> Iterator[Chunk]:
    """Group messages in file order, at most max_samples per sensor (like the fast path)."""
    items = sorted([(s, 0, x) for s, x in zip(a_seq, a)] + [(s, 1, x) for s, x in zip(g_seq, g)], key=lambda i: i[0])
    group: list[list] = [[], []]
    counts = [0, 0]

    def flush() -> Chunk:
        blocks = [
            fitfast.ordered(
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


# -- names and meta --------------------------------------------------------------


def _named_to_nums(message: dict, mesg: int) -> dict[int, list]:
    fields = {f["name"]: num for num, f in fitfast.sdk_profile()["messages"][mesg]["fields"].items()}
    out = {}
    for key, value in message.items():
        if key in fields:
            out[fields[key]] = list(value) if isinstance(value, (list, tuple)) else [value]
    return out


def _first(values: dict[int, list], num: int) -> object:
    vals = values.get(num) or [None]
    return vals[0]


def _device(values: dict[int, list], manufacturer_field: int, product_field: int, serial_field: int) -> dict:
    manufacturer = _first(values, manufacturer_field)
    named = fitfast.type_name("manufacturer", manufacturer) if manufacturer is not None else None
    out = {
        "manufacturer": named if named is not None else manufacturer,
        "product": _first(values, product_field),
        "serial_number": _first(values, serial_field),
    }
    if manufacturer == 1 and out["product"] is not None:  # garmin: product names are known
        out["product_name"] = fitfast.type_name("garmin_product", out["product"])
    return {k: v for k, v in out.items() if v is not None}


def _meta(
    engine: str,
    counts: dict[int, int],
    file_ids: list[dict[int, list]],
    device_infos: list[dict[int, list]],
    accel: Source,
    gyro: Source | None,
    correlation: int | None,
    notes: list[str],
) -> dict:
    meta: dict = {
        "engine": engine,
        "message_counts": {mesg_name(g): n for g, n in sorted(counts.items())},
        "accel_source": f"{mesg_name(accel.mesg)}.{accel.name}",
        "gyro_source": f"{mesg_name(gyro.mesg)}.{gyro.name}" if gyro else None,
    }
    if file_ids:
        meta["device"] = _device(file_ids[0], 1, 2, 3)
        created = _first(file_ids[0], 4)
        if created is not None:
            meta["time_created_ms"] = (int(created) + fitfast.FIT_EPOCH_S) * 1000
    devices = [_device(v, 2, 4, 3) for v in device_infos]
    if devices:
        meta["devices"] = [d for d in devices if d][:8]
    if correlation is not None:
        meta["timestamp_correlation_ms"] = correlation
    if notes:
        meta["notes"] = notes
    return meta

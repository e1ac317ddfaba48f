"""agent.decode.fit on FIT files written by garmin-fit-sdk's Encoder (tests/fitgen.py).

Every decoded file is read by both engines (the numpy fast path and the
garmin-fit-sdk path) and compared with what the writer says it wrote.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fitdecode
import numpy as np
import pytest
from fitgen import (
    ACCEL_CALIBRATION,
    ImuFixture,
    cached_fit,
    write_activity_fit,
    write_imu_fit,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from har_edge.agent.decode.fit import Verified, decode_fit, fit_file_complete, fit_file_verified
from har_edge.agent.decode.fit.chunks import MAX_CHUNK_SAMPLES, iter_chunks
from har_edge.agent.decode.fit.container import scan
from har_edge.agent.decode.fit.crc import Crc16, crc16, crc16_py
from har_edge.agent.decode.fit.plan import plan
from har_edge.agent.decode.types import FIT_EPOCH_S, SensorBlock
from har_edge.agent.errors import CorruptFile, InputError, NoImuData, UnknownFormat

ENGINES = ("fast", "sdk")


def decode_all(path: Path, engine: str = "auto"):
    rec = decode_fit(path, engine=engine)
    chunks = list(rec.chunks())
    accel = SensorBlock.concat([c.accel for c in chunks])
    gyro = SensorBlock.concat([c.gyro for c in chunks if c.gyro is not None]) if rec.has_gyro else None
    return rec, chunks, accel, gyro


def assert_same_blocks(a: SensorBlock | None, b: SensorBlock | None) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        np.testing.assert_array_equal(a.t_ms, b.t_ms)
        np.testing.assert_array_equal(a.xyz, b.xyz)


def _by_time(t: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(t, kind="stable")
    return t[order], v[order]


def assert_decodes_to(fx: ImuFixture, *, exact: bool = True):
    """Both engines give back what was written (sorted by time), and the same arrays as each other."""
    accel_t, accel_v = _by_time(fx.accel_t_ms, fx.accel)
    if fx.gyro is not None:
        gyro_t, gyro_v = _by_time(fx.gyro_t_ms, fx.gyro)
    results = {}
    for engine in ENGINES:
        rec, chunks, accel, gyro = decode_all(fx.path, engine)
        assert rec.meta["engine"] == engine
        assert rec.format == "fit" and rec.name == fx.path.name
        assert rec.has_gyro == (fx.gyro is not None)
        assert all(len(c.accel) <= MAX_CHUNK_SAMPLES for c in chunks)
        assert accel.t_ms.dtype == np.int64 and accel.xyz.dtype == np.float32
        np.testing.assert_array_equal(accel.t_ms, accel_t)
        if exact:
            np.testing.assert_array_equal(accel.xyz, accel_v)
        else:
            np.testing.assert_allclose(accel.xyz, accel_v, rtol=1e-6, atol=1e-5)
        if fx.gyro is not None:
            np.testing.assert_array_equal(gyro.t_ms, gyro_t)
            np.testing.assert_allclose(gyro.xyz, gyro_v, rtol=1e-6, atol=1e-4)
        results[engine] = rec, accel, gyro
    fast, sdk = results["fast"], results["sdk"]
    assert_same_blocks(fast[1], sdk[1])
    assert_same_blocks(fast[2], sdk[2])
    assert fast[0].accel_unit == sdk[0].accel_unit
    return fast[0]


# -- round trips -----------------------------------------------------------------


@pytest.mark.parametrize("rate_hz", [25, 50, 100])
@pytest.mark.parametrize("with_gyro", [True, False])
def test_round_trip(tmp_path: Path, rate_hz: int, with_gyro: bool) -> None:
    fx = write_imu_fit(tmp_path / "walk.fit", rate_hz=rate_hz, seconds=12, with_gyro=with_gyro, seed=rate_hz)
    rec = assert_decodes_to(fx)
    assert len(fx.accel_t_ms) == 12 * rate_hz
    assert rec.accel_unit is None  # calibrated_accel: unit detected downstream from the magnitude
    assert rec.meta["accel_source"] == "accelerometer_data.calibrated"
    assert rec.meta["device"]["manufacturer"] == "garmin"
    assert rec.meta["message_counts"]["accelerometer_data"] == fx.messages["accelerometer_data"]
    assert np.all(np.diff(fx.accel_t_ms) == 1000 // rate_hz)
    if not with_gyro:
        assert all(c.gyro is None for c in decode_fit(fx.path).chunks())


@pytest.mark.parametrize("accel_unit, magnitude", [("mg", 1000), ("g", 1)])
def test_milli_g_and_g_are_kept_as_written(tmp_path: Path, accel_unit: str, magnitude: float) -> None:
    fx = write_imu_fit(tmp_path / f"{accel_unit}.fit", seconds=10, accel_unit=accel_unit, signal="rest")
    rec = assert_decodes_to(fx)
    assert rec.accel_unit is None
    _, _, accel, _ = decode_all(fx.path)
    assert np.median(np.linalg.norm(accel.xyz, axis=1)) == pytest.approx(magnitude, rel=0.05)


def test_gap(tmp_path: Path) -> None:
    fx = write_imu_fit(tmp_path / "gap.fit", seconds=20, gaps=[(5.3, 4.0)])
    assert_decodes_to(fx)
    steps = np.diff(fx.accel_t_ms)
    assert sorted(set(steps.tolist())) == [20, 4020]


def test_raw_counts_with_three_d_sensor_calibration(tmp_path: Path) -> None:
    fx = write_imu_fit(tmp_path / "raw.fit", seconds=10, raw_counts=True)
    rec = assert_decodes_to(fx, exact=False)
    assert rec.accel_unit == "g"
    assert rec.meta["accel_source"] == "accelerometer_data.raw"
    _, _, accel, gyro = decode_all(fx.path)
    # the orientation matrix swaps x and y: gravity (on -y of the written signal) and the magnitude survive
    assert np.median(np.linalg.norm(accel.xyz, axis=1)) == pytest.approx(1.0, rel=0.1)
    assert np.abs(gyro.xyz).max() > 50  # deg/s of an arm swing
    assert ACCEL_CALIBRATION["orientation_matrix"][1] == 65535


def test_raw_counts_without_calibration_is_no_imu_data(tmp_path: Path) -> None:
    from garmin_fit_sdk import Encoder

    enc = Encoder()
    enc.write_mesg({"mesg_num": 0, "type": 4, "manufacturer": 1, "product": 1, "time_created": 1_000_000_000})
    for i in range(10):
        enc.write_mesg(
            {"mesg_num": 165, "timestamp": 1_000_000_000 + i, "timestamp_ms": 0,
             "sample_time_offset": [0, 500], "accel_x": [2048, 2050], "accel_y": [2048, 2047], "accel_z": [3000, 3001]}
        )  # fmt: skip
    path = tmp_path / "uncalibrated.fit"
    path.write_bytes(enc.close())
    for engine in ENGINES:
        with pytest.raises(NoImuData, match="three_d_sensor_calibration"):
            decode_fit(path, engine=engine)


def test_accelerometer_data_without_sample_times_is_no_imu_data(tmp_path: Path) -> None:
    from garmin_fit_sdk import Encoder

    enc = Encoder()
    enc.write_mesg({"mesg_num": 0, "type": 4, "manufacturer": 1, "product": 1, "time_created": 1_000_000_000})
    for i in range(3):
        enc.write_mesg({"mesg_num": 165, "timestamp": 1_000_000_000 + i, "calibrated_accel_x": [1.0, 2.0],
                        "calibrated_accel_y": [0.0, 0.0], "calibrated_accel_z": [1000.0, 999.0]})  # fmt: skip
    path = tmp_path / "no_offsets.fit"
    path.write_bytes(enc.close())
    for engine in ENGINES:
        with pytest.raises(NoImuData, match="lacks the fields"):
            decode_fit(path, engine=engine)


def test_small_chunks_split_on_message_boundaries(tmp_path: Path) -> None:
    fx = write_imu_fit(tmp_path / "split.fit", seconds=20, raw_counts=True, gaps=[(4, 1.5)], samples_per_message=30)
    index = scan(fx.path)
    chunks = list(iter_chunks(index, plan(index), max_samples=100))
    assert len(chunks) > 10
    assert all(len(c.accel) <= 100 and len(c.gyro) <= 100 for c in chunks)
    _, _, accel, gyro = decode_all(fx.path)
    assert_same_blocks(SensorBlock.concat([c.accel for c in chunks]), accel)
    assert_same_blocks(SensorBlock.concat([c.gyro for c in chunks]), gyro)


def test_health_sdk_messages(tmp_path: Path) -> None:
    fx = write_imu_fit(tmp_path / "hsa.fit", seconds=10, hsa=True)
    rec = assert_decodes_to(fx, exact=False)
    assert rec.accel_unit == "mg"
    assert rec.meta["accel_source"] == "hsa_accelerometer_data.hsa"


def test_big_endian_developer_fields_and_other_messages(tmp_path: Path) -> None:
    kwargs = dict(seconds=8, rate_hz=50, extra_messages=True, developer_field=True, seed=3)
    little = write_imu_fit(tmp_path / "le.fit", **kwargs)
    big = write_imu_fit(tmp_path / "be.fit", big_endian=True, **kwargs)
    assert little.path.read_bytes() != big.path.read_bytes()
    assert_decodes_to(little)
    assert_decodes_to(big)
    rec = decode_fit(big.path)
    assert rec.meta["message_counts"]["record"] == little.messages["record"]


def test_system_time_is_corrected_with_timestamp_correlation(tmp_path: Path) -> None:
    """IMU timestamps below 0x10000000 are device time; timestamp_correlation maps them to UTC."""
    from garmin_fit_sdk import Encoder

    real, system = 1_100_000_000, 5_000
    enc = Encoder()
    enc.write_mesg({"mesg_num": 0, "type": 4, "manufacturer": 1, "product": 1, "time_created": real})
    enc.write_mesg({"mesg_num": 162, "timestamp": real, "system_timestamp": system, "timestamp_ms": 250,
                    "system_timestamp_ms": 0})  # fmt: skip
    for i in range(4):
        enc.write_mesg({"mesg_num": 165, "timestamp": system + i, "timestamp_ms": 0, "sample_time_offset": [0, 500],
                        "calibrated_accel_x": [1.0, 2.0], "calibrated_accel_y": [0.0, 0.0],
                        "calibrated_accel_z": [1000.0, 999.0]})  # fmt: skip
    path = tmp_path / "system_time.fit"
    path.write_bytes(enc.close())
    expected = (real + FIT_EPOCH_S) * 1000 + 250 + np.arange(8) * 500
    for engine in ENGINES:
        rec, _, accel, _ = decode_all(path, engine)
        np.testing.assert_array_equal(accel.t_ms, expected)
        assert rec.meta["timestamp_correlation_ms"] == (real - system) * 1000 + 250


# -- second decoder ----------------------------------------------------------------


def _fitdecode_samples(path: Path, mesg: int, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    times, values = [], []
    with fitdecode.FitReader(str(path), check_crc=fitdecode.CrcCheck.RAISE) as reader:
        for frame in reader:
            if frame.frame_type != fitdecode.FIT_FRAME_DATA or frame.global_mesg_num != mesg:
                continue
            ts = frame.get_raw_value("timestamp")
            ms = frame.get_raw_value("timestamp_ms", fallback=0) or 0
            offsets = frame.get_raw_value("sample_time_offset")
            axes = [frame.get_raw_value(prefix + a) for a in "xyz"]
            times.extend((ts + FIT_EPOCH_S) * 1000 + ms + np.asarray(offsets, np.int64))
            values.append(np.array(axes, np.float64).T)
    return np.asarray(times, np.int64), np.concatenate(values).astype(np.float32)


def test_fitdecode_agrees(tmp_path: Path) -> None:
    fx = write_imu_fit(tmp_path / "cross.fit", seconds=15, rate_hz=100, samples_per_message=30, gaps=[(3, 1)])
    _, _, accel, gyro = decode_all(fx.path)
    t, v = _fitdecode_samples(fx.path, 165, "calibrated_accel_")
    np.testing.assert_array_equal(accel.t_ms, t)
    np.testing.assert_array_equal(accel.xyz, v)
    t, v = _fitdecode_samples(fx.path, 164, "calibrated_gyro_")
    np.testing.assert_array_equal(gyro.t_ms, t)
    np.testing.assert_array_equal(gyro.xyz, v)


def test_fitdecode_agrees_on_raw_counts(tmp_path: Path) -> None:
    fx = write_imu_fit(tmp_path / "raw.fit", seconds=5, raw_counts=True, with_gyro=False)
    _, _, accel, _ = decode_all(fx.path)
    t, raw = _fitdecode_samples(fx.path, 165, "accel_")
    cal = ACCEL_CALIBRATION
    matrix = np.array(cal["orientation_matrix"]).reshape(3, 3) / 65535
    u = (raw.astype(np.float64) - cal["level_shift"] - np.array(cal["offset_cal"])) * cal["calibration_factor"]
    expected = (u / cal["calibration_divisor"]) @ matrix.T
    np.testing.assert_array_equal(accel.t_ms, t)
    np.testing.assert_allclose(accel.xyz, expected, rtol=1e-6, atol=1e-6)


# -- the fast writer and long files ------------------------------------------------


def test_fast_writer_writes_the_encoders_bytes(tmp_path: Path) -> None:
    kwargs = dict(seconds=7, rate_hz=100, samples_per_message=30, gaps=[(2, 0.55)], seed=5)
    sdk = write_imu_fit(tmp_path / "sdk.fit", **kwargs)
    fast = write_imu_fit(tmp_path / "fast.fit", engine="fast", **kwargs)
    assert sdk.path.read_bytes() == fast.path.read_bytes()
    nogyro = write_imu_fit(tmp_path / "fast1.fit", engine="fast", with_gyro=False, accel_unit="g", seconds=3)
    assert nogyro.path.read_bytes() == write_imu_fit(tmp_path / "sdk1.fit", with_gyro=False, accel_unit="g",
                                                     seconds=3).path.read_bytes()  # fmt: skip


def test_fast_writer_output_reads_back_through_the_sdk(tmp_path: Path) -> None:
    fx = write_imu_fit(tmp_path / "fast.fit", engine="fast", seconds=60, gaps=[(10, 2)])
    assert_decodes_to(fx)


def test_long_recording_is_chunked_in_time_order(fixture_cache: Path) -> None:
    """``fixture_cache`` (tests/conftest.py) is a folder kept between runs."""
    path = cached_fit(fixture_cache, hours=0.5)
    assert cached_fit(fixture_cache, hours=0.5) == path
    assert fit_file_complete(path)
    rec = decode_fit(path)
    assert rec.meta["engine"] == "fast"
    n_accel = n_gyro = 0
    last = -1
    for chunk in rec.chunks():
        assert 0 < len(chunk.accel) <= MAX_CHUNK_SAMPLES
        assert len(chunk.gyro) <= MAX_CHUNK_SAMPLES
        assert chunk.accel.t_ms[0] > last and np.all(np.diff(chunk.accel.t_ms) == 20)
        last = chunk.accel.t_ms[-1]
        n_accel += len(chunk.accel)
        n_gyro += len(chunk.gyro)
    assert n_accel == n_gyro == 50 * 1800


def test_crc16_matches_the_sdk() -> None:
    from garmin_fit_sdk.crc_calculator import CrcCalculator

    data = np.random.default_rng(1).integers(0, 256, 3 * Crc16.LANES * 2 + 77, np.uint8).tobytes()
    expected = CrcCalculator.calculate_crc(data, 0, len(data))
    assert crc16(data) == expected
    crc = Crc16()
    for i in range(0, len(data), 5001):
        crc.update(data[i : i + 5001])
    assert crc.value == expected


# -- random files: fast path == SDK path -------------------------------------------


@st.composite
def imu_files(draw):
    kind = draw(st.sampled_from(["calibrated", "calibrated", "raw", "hsa"]))
    limit = 63 if kind == "calibrated" else 100
    rate = draw(st.sampled_from([12.5, 25, 26, 50, 64, 100, 200]))
    seconds = draw(st.floats(0.2, 6.0))
    gaps = draw(st.lists(st.tuples(st.floats(0, 6), st.floats(0.05, 2)), max_size=2))
    return dict(
        rate_hz=rate,
        seconds=seconds,
        with_gyro=draw(st.booleans()),
        accel_unit=draw(st.sampled_from(["mg", "g"])),
        gaps=gaps,
        raw_counts=kind == "raw",
        hsa=kind == "hsa",
        samples_per_message=draw(st.integers(1, limit)),
        seed=draw(st.integers(0, 1000)),
        signal=draw(st.sampled_from(["walk", "rest"])),
        extra_messages=draw(st.booleans()),
        developer_field=draw(st.booleans()),
        big_endian=draw(st.booleans()),
        start=datetime(2024, 1, 1, tzinfo=UTC) + timedelta(milliseconds=draw(st.integers(0, 10**9))),
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=imu_files())
def test_random_files_fast_equals_sdk(params: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.fit"
        try:
            fx = write_imu_fit(path, **params)
        except ValueError:  # parameters the writer refuses (e.g. every sample inside a gap)
            return
        if len(fx.accel_t_ms) == 0:
            for engine in ENGINES:
                with pytest.raises(NoImuData):
                    decode_fit(path, engine=engine)
            return
        assert_decodes_to(fx, exact=not (params["raw_counts"] or params["hsa"]))


# -- damaged and foreign files ------------------------------------------------------


@pytest.fixture(scope="module")
def good_fit(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    fx = write_imu_fit(tmp_path_factory.mktemp("good") / "good.fit", seconds=10)
    return fx.path.read_bytes()


def _refix(data: bytearray) -> bytes:
    """Recompute the header and file CRCs after an edit."""
    struct.pack_into("<I", data, 4, len(data) - 14 - 2)
    struct.pack_into("<H", data, 12, crc16_py(bytes(data[:12])))
    struct.pack_into("<H", data, len(data) - 2, crc16(bytes(data[:-2])))
    return bytes(data)


def _expect(path: Path, error: type[InputError], *words: str) -> InputError:
    for engine in ENGINES:
        with pytest.raises(error) as info:
            decode_fit(path, engine=engine)
        assert path.name in str(info.value)
        for word in words:
            assert word in str(info.value)
    return info.value


def test_truncated(tmp_path: Path, good_fit: bytes) -> None:
    path = tmp_path / "cut.fit"
    path.write_bytes(good_fit[: len(good_fit) // 2])
    _expect(path, CorruptFile, "truncated")
    assert not fit_file_complete(path)
    path.write_bytes(good_fit[:9])
    _expect(path, CorruptFile, "header")


def test_flipped_byte_fails_the_crc(tmp_path: Path, good_fit: bytes) -> None:
    data = bytearray(good_fit)
    data[len(data) // 2] ^= 0x01
    path = tmp_path / "flipped.fit"
    path.write_bytes(bytes(data))
    _expect(path, CorruptFile, "CRC")
    assert not fit_file_complete(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.fit"
    path.write_bytes(b"")
    _expect(path, CorruptFile, "empty")
    assert not fit_file_complete(path)


def test_random_bytes_are_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "noise.fit"
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 5000, np.uint8).tobytes())
    _expect(path, UnknownFormat, "not a FIT file")
    path = tmp_path / "notes.txt"
    path.write_text("timestamp,x,y,z\n1,2,3,4\n")
    _expect(path, UnknownFormat)


def test_activity_without_imu(tmp_path: Path) -> None:
    path = write_activity_fit(tmp_path / "ride.fit")
    error = _expect(path, NoImuData, "no accelerometer_data in ride.fit", "IMU logging", "export the original FIT")
    assert "record" in str(error)


def test_never_finalized(tmp_path: Path, good_fit: bytes) -> None:
    data = bytearray(good_fit)
    struct.pack_into("<I", data, 4, 0)
    struct.pack_into("<H", data, 12, crc16_py(bytes(data[:12])))
    path = tmp_path / "unfinished.fit"
    path.write_bytes(bytes(data))
    _expect(path, CorruptFile, "never finalized")


def test_undefined_local_message(tmp_path: Path, good_fit: bytes) -> None:
    data = bytearray(good_fit)
    index = scan(_write(tmp_path / "g.fit", good_fit))
    last_record = max(int(max(p)) for p in index.positions if len(p))
    data[last_record] = 0x0B  # a data record of local message 11, never defined
    path = tmp_path / "undefined.fit"
    path.write_bytes(_refix(data))
    _expect(path, CorruptFile, "local message")


def test_trailing_garbage(tmp_path: Path, good_fit: bytes) -> None:
    path = tmp_path / "tail.fit"
    path.write_bytes(good_fit + b"\x00garbage-after-the-crc")
    _expect(path, CorruptFile)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _with_compressed_record(good: bytes, imu: bool) -> bytes:
    """Append a definition for local 3 and one compressed-timestamp record using it."""
    data = bytearray(good[:-2])
    if imu:  # an accelerometer_data record without a timestamp field
        data += struct.pack("<BBBHB", 0x43, 0, 0, 165, 2) + bytes([1, 2, 0x84, 5, 4, 0x88])
        data += bytes([0x80 | (3 << 5) | 5]) + struct.pack("<Hf", 0, 1000.0)
    else:  # a record message (heart_rate)
        data += struct.pack("<BBBHB", 0x43, 0, 0, 20, 1) + bytes([3, 1, 0x02])
        data += bytes([0x80 | (3 << 5) | 5, 140])
    data += b"\0\0"
    return _refix(data)


def test_compressed_timestamp_records(tmp_path: Path, good_fit: bytes) -> None:
    """The SDK refuses compressed-timestamp headers; the fast path skips them in non-IMU messages."""
    path = _write(tmp_path / "compressed.fit", _with_compressed_record(good_fit, imu=False))
    _, _, accel, _ = decode_all(path)
    _, _, expected, _ = decode_all(_write(tmp_path / "good.fit", good_fit))
    assert_same_blocks(accel, expected)
    with pytest.raises(UnknownFormat, match="compressed"):
        decode_fit(path, engine="sdk")
    path = _write(tmp_path / "compressed_imu.fit", _with_compressed_record(good_fit, imu=True))
    with pytest.raises(UnknownFormat, match="compressed"):
        decode_fit(path)


# -- fit_file_complete ---------------------------------------------------------------


def test_fit_file_complete(tmp_path: Path, good_fit: bytes) -> None:
    path = tmp_path / "copying.fit"
    assert not fit_file_complete(path)  # not there yet
    with open(path, "wb") as f:
        f.write(good_fit[: len(good_fit) // 2])
        f.flush()
        assert not fit_file_complete(path)
        f.write(good_fit[len(good_fit) // 2 : -1])
        f.flush()
        assert not fit_file_complete(path)
        f.write(good_fit[-1:])
    assert fit_file_complete(path)
    os.truncate(path, 12)
    assert not fit_file_complete(path)


# -- the readiness proof ---------------------------------------------------------------


def _spoil_crc_keeping_identity(path: Path) -> None:
    """Break the stored file CRC in place; size and mtime stay, so the file's identity does too."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(-2, os.SEEK_END)
        crc = f.read(2)
        f.seek(-2, os.SEEK_END)
        f.write(bytes([crc[0] ^ 0xFF, crc[1]]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_proof_spares_the_crc_pass_only_while_the_file_is_the_one_checked(tmp_path: Path, good_fit: bytes) -> None:
    path = _write(tmp_path / "proved.fit", good_fit)
    proof = fit_file_verified(path)
    assert isinstance(proof, Verified) and proof.identity is not None
    assert proof.identity.size == len(good_fit) and [h.data_size for h in proof.headers] == [len(good_fit) - 16]
    _, _, expected, _ = decode_all(path)
    _spoil_crc_keeping_identity(path)
    assert fit_file_verified(path) is None  # a new check sees the damage
    for engine in ENGINES:
        with pytest.raises(CorruptFile, match="CRC"):
            decode_fit(path, engine=engine)  # no proof: checked
    rec = decode_fit(path, engine="fast", verified=proof)  # the proof still names this very file
    assert_same_blocks(SensorBlock.concat([c.accel for c in rec.chunks()]), expected)
    with pytest.raises(CorruptFile, match="CRC"):  # the proof spares our check; garmin-fit-sdk still does its own
        decode_fit(path, engine="sdk", verified=proof)
    other = fit_file_verified(_write(tmp_path / "other.fit", good_fit))
    assert other is not None
    with pytest.raises(CorruptFile, match="CRC"):
        decode_fit(path, verified=[other])  # a proof of another file says nothing of this one
    renamed = path.rename(tmp_path / "claimed.fit")  # the watcher's claim keeps the identity
    assert decode_fit(renamed, verified=[other, proof]).meta["engine"] == "fast"
    os.utime(renamed, ns=(time_ns := renamed.stat().st_mtime_ns + 10**9, time_ns))  # touched since
    with pytest.raises(CorruptFile, match="CRC"):
        decode_fit(renamed, verified=proof)


# -- fields that do not hold what the profile says ------------------------------------


def _assert_clean_refusal(
    path: Path, caplog: pytest.LogCaptureFixture, *needles: str, engines: tuple[str, ...] = ("auto", *ENGINES)
) -> None:
    """Every engine refuses with a CorruptFile of ours (file, message, field, what to do), no traceback logged."""
    for engine in engines:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="har_edge.agent.decode"), pytest.raises(CorruptFile) as info:
            decode_all(path, engine)
        message = str(info.value)
        assert message.startswith(f"{path.name}: "), message
        for needle in needles:
            assert needle in message, message
        assert "export the original FIT" in message, message
        assert "float()" not in message and "index" not in message, message
        assert not [r for r in caplog.records if r.exc_info], caplog.text
        assert "garmin-fit-sdk" not in caplog.text  # the fast reader did not fall back on a bug of ours


@pytest.mark.parametrize(
    "field, value",
    [
        ("calibration_factor", [1, 1]),
        ("calibration_divisor", [4096, 4096]),
        ("level_shift", [32768, 0]),
        ("sensor_type", [0, 0]),
    ],
)
def test_array_valued_calibration_fields_are_refused_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, field: str, value: list[int]
) -> None:
    fx = write_imu_fit(tmp_path / f"cal_{field}.fit", seconds=5, raw_counts=True, with_gyro=False,
                       preamble_fields={167: {field: value}})  # fmt: skip
    _assert_clean_refusal(fx.path, caplog, "three_d_sensor_calibration", f"field {field} ", "2 values")


@pytest.mark.parametrize("field", ["timestamp", "system_timestamp", "timestamp_ms", "system_timestamp_ms"])
def test_array_valued_timestamp_correlation_fields_are_refused_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, field: str
) -> None:
    fx = write_imu_fit(tmp_path / f"corr_{field}.fit", seconds=5, system_time_s=5_000,
                       preamble_fields={162: {field: [5_000, 5_001]}})  # fmt: skip
    _assert_clean_refusal(fx.path, caplog, "timestamp_correlation", f"field {field} ", "2 values")


def test_array_valued_imu_timestamps_give_their_first_value_in_both_engines(tmp_path: Path) -> None:
    """The fast reader has always read field 253 of an IMU record as its first value; the SDK path now agrees."""
    from garmin_fit_sdk import Encoder

    real = 1_100_000_000
    enc = Encoder()
    enc.write_mesg({"mesg_num": 0, "type": 4, "manufacturer": 1, "product": 1, "time_created": real})
    for i in range(4):
        enc.write_mesg({"mesg_num": 165, "timestamp": [real + i, 7], "timestamp_ms": [250, 9],
                        "sample_time_offset": [0, 500], "calibrated_accel_x": [1.0, 2.0],
                        "calibrated_accel_y": [0.0, 0.0], "calibrated_accel_z": [1000.0, 999.0]})  # fmt: skip
    path = _write(tmp_path / "array_ts.fit", enc.close())
    expected = (real + FIT_EPOCH_S) * 1000 + 250 + np.arange(8) * 500
    for engine in ENGINES:
        _, _, accel, _ = decode_all(path, engine)
        np.testing.assert_array_equal(accel.t_ms, expected)


# -- device time (date_time below 0x10000000) ------------------------------------------


@pytest.mark.parametrize("raw_counts", [False, True])
def test_device_time_is_mapped_through_timestamp_correlation(tmp_path: Path, raw_counts: bool) -> None:
    fx = write_imu_fit(tmp_path / "system.fit", seconds=12, system_time_s=86_400, raw_counts=raw_counts)
    assert_decodes_to(fx, exact=not raw_counts)  # real times, from both engines
    for engine in ENGINES:
        rec = decode_fit(fx.path, engine=engine)
        assert rec.meta["timestamp_correlation_ms"] == (fx.accel_t_ms[0] // 1000 - FIT_EPOCH_S - 86_400) * 1000


def test_device_time_without_timestamp_correlation_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fx = write_imu_fit(tmp_path / "uncorrelated.fit", seconds=5, system_time_s=86_400, correlation=False)
    _assert_clean_refusal(fx.path, caplog, "device time", "accelerometer_data", "no timestamp_correlation")
    fx = write_imu_fit(tmp_path / "real.fit", seconds=5, correlation=True)  # a correlation in a real-time file
    assert_decodes_to(fx)

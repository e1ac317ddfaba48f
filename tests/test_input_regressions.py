"""Regression tests from minimized fuzz findings: clock jumps, long digit strings, huge numbers,
heavy xlsx, messages, and ``agent process`` pairing study tables.

Memory is measured with tracemalloc (numpy reports its buffers to it), so a test fails when the
resampling grid grows with the time span instead of the samples.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import fuzzinputs as fz
from fitgen import write_imu_fit

from har_edge.agent.decode import open_export
from har_edge.agent.decode.fit import decode_fit
from har_edge.agent.decode.tables import decode_study_tables
from har_edge.agent.decode.types import Chunk, Recording, SensorBlock
from har_edge.agent.errors import CorruptFile, InputError, TooLarge, UnsafeArchive
from har_edge.agent.preprocess import StreamWindower, plausible_until_ms, recording_windows

DAY = 86400
YEARS_68 = 68 * 365 * DAY
ACCEL_MESG, GYRO_MESG = 165, 164


def _shift(data: bytes, delta_s: int, *, first: int, count: int, mesgs=(ACCEL_MESG,)) -> bytes:
    """Add ``delta_s`` to the timestamp of data messages first..first+count-1 of the given message numbers."""
    fit = fz.parse_fit(data)
    defs: dict[int, fz.FitDef] = {}
    seen: dict[int, int] = {}
    for r in fit.records:
        if isinstance(r, fz.FitDef):
            defs[r.local] = r
            continue
        d = defs[r.header & 0xF]
        if d.global_num not in mesgs:
            continue
        k = seen.get(d.global_num, 0)
        seen[d.global_num] = k + 1
        nums = [f[0] for f in d.fields]
        if first <= k < first + count and 253 in nums:
            j = nums.index(253)
            fmt = "<I" if d.arch == 0 else ">I"
            r.fields[j] = struct.pack(fmt, (struct.unpack(fmt, r.fields[j])[0] + delta_s) & 0xFFFFFFFF)
    return fz.write_fit(fit)


def _windows_and_peak(path: Path):
    tracemalloc.start()
    try:
        ws = recording_windows(decode_fit(path, path.name), rate_hz=50, window=200, step=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return ws, peak / 2**20


@pytest.fixture(scope="module")
def minute_fit(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("fit") / "walk.fit"
    write_imu_fit(p, rate_hz=50, seconds=60)
    return p.read_bytes()


# -- 1. clock jumps ------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [DAY, 30 * DAY, YEARS_68, -3600, -30 * DAY])
@pytest.mark.parametrize("both", [False, True])
def test_one_message_with_a_wrong_time_is_dropped_at_no_memory_cost(tmp_path, minute_fit, delta, both):
    p = tmp_path / "jump.fit"
    p.write_bytes(
        _shift(minute_fit, delta, first=40, count=1, mesgs=(ACCEL_MESG, GYRO_MESG) if both else (ACCEL_MESG,))
    )
    clean, _ = _windows_and_peak(_write(tmp_path / "clean.fit", minute_fit))
    ws, peak_mb = _windows_and_peak(p)
    assert ws.quality["clock_jumps"] >= 1 or abs(delta) < 6 * 3600  # an hour back, first in time order: a gap
    # the message's samples are dropped, or kept as a segment of their own when the decoder orders by time
    assert len(ws) >= len(clean) - 3  # the rest of the recording is kept
    if abs(delta) > 6 * 3600:  # a clock jump (an hour back is only a gap)
        assert 55 <= ws.quality["duration_s"] <= 61  # the jump is not counted as recorded time
        assert ws.quality["gap_s"] < 5
    assert peak_mb < 40, f"{peak_mb:.0f} MB for a one-minute file"


@pytest.mark.parametrize("delta", [DAY, 30 * DAY, -DAY])
def test_a_lasting_clock_jump_splits_the_recording_into_segments(tmp_path, minute_fit, delta):
    p = tmp_path / "jump.fit"
    p.write_bytes(_shift(minute_fit, delta, first=60, count=10**6, mesgs=(ACCEL_MESG, GYRO_MESG)))
    ws, peak_mb = _windows_and_peak(p)
    q = ws.quality
    assert q["clock_jumps"] >= 1 and q["segments"] >= 2
    starts = np.sort(ws.start_ms)
    assert (np.diff(starts) > abs(delta) * 1000 // 2).sum() == 1  # windows on both sides of the jump
    assert len(ws) >= 26  # 14 windows on each side
    assert q["duration_s"] < 70 and q["gap_s"] < 5
    assert peak_mb < 40


def test_a_file_with_no_plausible_time_is_refused_by_name(tmp_path, minute_fit):
    p = tmp_path / "future.fit"
    p.write_bytes(_shift(minute_fit, YEARS_68, first=0, count=10**6, mesgs=(ACCEL_MESG, GYRO_MESG)))
    with pytest.raises(InputError, match=r"future\.fit: none of its \d+ accelerometer times is plausible"):
        _windows_and_peak(p)


def test_the_last_files_time_moves_the_plausibility_horizon():
    """Edge boxes without an RTC: data three years after "now" is plausible once a previous file was that late."""
    later = int(time.time() * 1000) + 3 * 365 * DAY * 1000 + np.arange(2000, dtype=np.int64) * 20
    x = np.tile(np.array([[0, 0, 1000]], np.float32), (2000, 1))
    assert plausible_until_ms(None) < later[0] <= later[-1] < plausible_until_ms(int(later[-1]))
    sw = StreamWindower(rate_hz=50, window=200, step=100, has_gyro=False, name="f.fit", last_file_ms=int(later[-1]))
    sw.feed(Chunk(SensorBlock(later, x)))
    sw.finish()
    assert sw.quality()["windows"] == 19 and sw.quality()["clock_jumps"] == 0
    sw = StreamWindower(rate_hz=50, window=200, step=100, has_gyro=False, name="f.fit")
    sw.feed(Chunk(SensorBlock(later, x)))
    with pytest.raises(InputError, match=r"f\.fit: none of its 2000 accelerometer times is plausible"):
        sw.finish()


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


T0 = 1_700_000_000_000


def _stream(n, jump_at, delta_ms, length):
    t = T0 + np.arange(n, dtype=np.int64) * 20
    t[jump_at : jump_at + length] += delta_ms
    s = np.arange(n) / 50.0
    acc = np.stack([300 * np.sin(2 * np.pi * s), 100 * np.cos(s), 1000 + 0 * s], 1).astype(np.float32)
    gyr = np.stack([30 * np.sin(s), 0 * s, 5 * np.cos(s)], 1).astype(np.float32)
    return t, acc, gyr


def _rec(t, acc, gyr, chunk):
    def chunks():
        for i in range(0, len(t), chunk):
            sl = slice(i, i + chunk)
            yield Chunk(SensorBlock(t[sl], acc[sl]), None if gyr is None else SensorBlock(t[sl], gyr[sl]))

    return Recording("r", "test", chunks, has_gyro=gyr is not None)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    chunk=st.integers(1, 5000),
    jump_at=st.integers(0, 4999),
    delta_ms=st.sampled_from([DAY * 1000, 30 * DAY * 1000, YEARS_68 * 1000, -3_600_000, -DAY * 1000, 7_000]),
    length=st.sampled_from([1, 25, 1500, 10**6]),
    gyro=st.booleans(),
)
def test_any_chunking_gives_the_windows_of_the_whole_stream_with_clock_jumps(chunk, jump_at, delta_ms, length, gyro):
    t, acc, gyr = _stream(5000, jump_at, delta_ms, length)
    g = gyr if gyro else None
    whole = recording_windows(_rec(t, acc, g, len(t)), rate_hz=50, window=200, step=100)
    parts = recording_windows(_rec(t, acc, g, chunk), rate_hz=50, window=200, step=100)
    np.testing.assert_array_equal(whole.start_ms, parts.start_ms)
    np.testing.assert_array_equal(whole.windows, parts.windows)
    assert whole.quality["clock_jumps"] == parts.quality["clock_jumps"]


def test_grid_memory_follows_samples_not_the_span():
    """Isolated samples a day apart: the grid is laid over the samples only."""
    n = 20_000
    t = T0 + np.arange(n, dtype=np.int64) * 3_600_000  # one sample an hour, for two years
    x = np.tile(np.array([[0, 0, 1000]], np.float32), (n, 1))
    tracemalloc.start()
    try:
        sw = StreamWindower(rate_hz=50, window=200, step=100, has_gyro=False, max_jump_s=10**9)
        sw.feed(Chunk(SensorBlock(t, x)))
        sw.finish()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert peak < 20, f"{peak:.0f} MB"


def test_csv_with_a_clock_jump_keeps_memory_flat(tmp_path):
    rows = fz.study_rows("accelerometer", n_rows=40)
    rows[20][0] += 30 * DAY
    a = _write(tmp_path / "r-accelerometer_data.csv", fz.csv_bytes(fz.ACC_HEAD, rows))
    tracemalloc.start()
    try:
        ws = recording_windows(decode_study_tables(a, None, a.name), rate_hz=50, window=200, step=100)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert ws.quality["clock_jumps"] == 1 and len(ws) >= 8 and peak < 20


# -- 2, 3. numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "col, cell, words",
    [
        (0, "1" + "0" * 4400, "not a usable number of seconds"),
        (0, "9" * 400, "not a usable number of seconds"),
        (1, "9" * 400, "not a number of milliseconds"),
        (0, "2025-13-01T00:00:00Z", "neither a date"),
    ],
)
def test_csv_long_digit_strings_are_refused_by_row(tmp_path, col, cell, words):
    rows = fz.study_rows("accelerometer", n_rows=3)
    rows[1][col] = cell
    a = _write(tmp_path / "r-accelerometer_data.csv", fz.csv_bytes(fz.ACC_HEAD, rows))
    with pytest.raises(InputError) as ei:
        recording_windows(decode_study_tables(a, None, a.name), rate_hz=50, window=200, step=100)
    msg = str(ei.value)
    assert msg.startswith("r-accelerometer_data.csv: row 3") and words in msg, msg
    assert "invalid literal" not in msg and "Exceeds the limit" not in msg
    assert len(msg) < 400


@pytest.mark.parametrize("col", [0, 1, 3, 5])
def test_xlsx_400_digit_numbers_are_refused_by_row(tmp_path, col):
    rows = fz.study_rows("accelerometer", n_rows=3)
    rows[1][col] = 10**400
    a = _write(tmp_path / "r-accelerometer.xlsx", fz.xlsx_bytes(fz.ACC_HEAD, rows))
    with pytest.raises(InputError) as ei:
        recording_windows(decode_study_tables(a, None, a.name), rate_hz=50, window=200, step=100)
    assert str(ei.value).startswith("r-accelerometer.xlsx: row 3"), str(ei.value)


def test_csv_sensor_values_out_of_range_are_dropped_not_crashing(tmp_path):
    rows = fz.study_rows("accelerometer", n_rows=20)
    rows[3][3] = "[" + ",".join(["1e300"] * 25) + "]"
    a = _write(tmp_path / "r-accelerometer_data.csv", fz.csv_bytes(fz.ACC_HEAD, rows))
    rec = decode_study_tables(a, None, a.name)
    recording_windows(rec, rate_hz=50, window=200, step=100)
    assert rec.meta["dropped_samples"]["accelerometer"] == 25


# -- 4. heavy xlsx -------------------------------------------------------------------------------------


def test_xlsx_with_a_cell_at_row_1048576_reads_only_its_rows(tmp_path):
    rows = fz.study_rows("accelerometer", n_rows=20)
    a = _write(tmp_path / "r-accelerometer.xlsx", fz.xlsx_bytes(fz.ACC_HEAD, rows, far_row=True))
    t0 = time.perf_counter()
    ws = recording_windows(decode_study_tables(a, None, a.name), rate_hz=50, window=200, step=100)
    took = time.perf_counter() - t0
    assert len(ws) == 4
    assert took < 2.0, f"{took:.1f} s: empty rows were iterated"


def _xlsx_with_shared_strings(path: Path, sst: bytes) -> Path:
    """A minimal valid workbook whose shared-strings part is ``sst`` (everything else tiny)."""
    base = fz.xlsx_bytes(fz.ACC_HEAD, fz.study_rows("accelerometer", n_rows=2))
    src = zipfile.ZipFile(io.BytesIO(base))
    override = (
        b'<Override PartName="/xl/sharedStrings.xml" '
        b'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"/></Types>'
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for info in src.infolist():
            blob = src.read(info.filename)
            if info.filename == "[Content_Types].xml":
                blob = blob.replace(b"</Types>", override)
            zf.writestr(info.filename, blob)
        zf.writestr("xl/sharedStrings.xml", sst)
    return path


def test_xlsx_shared_strings_expanding_823_to_1_are_refused(tmp_path):
    one = b"<si><t>" + b"A" * 8000 + b"</t></si>"
    sst = b'<?xml version="1.0"?><sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
    sst += one * 1200 + b"</sst>"
    p = _xlsx_with_shared_strings(tmp_path / "r-accelerometer.xlsx", sst)
    with pytest.raises((UnsafeArchive, TooLarge), match=r"r-accelerometer\.xlsx: .*(compression ratio|shared strings)"):
        decode_study_tables(p, None, p.name)


def test_xlsx_shared_strings_over_the_memory_budget_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    body = b"".join(b"<si><t>" + rng.bytes(48).hex().encode() + b"</t></si>" for _ in range(340_000))
    sst = b'<?xml version="1.0"?><sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
    p = _xlsx_with_shared_strings(tmp_path / "r-accelerometer.xlsx", sst + body + b"</sst>")
    with pytest.raises(TooLarge, match=r"r-accelerometer\.xlsx: .*shared strings.*export CSV"):
        decode_study_tables(p, None, p.name)


# -- 6. messages -----------------------------------------------------------------------------------------


def test_xlsx_bad_iso_date_cell_names_file_row_and_fix(tmp_path):
    rows = fz.study_rows("accelerometer", n_rows=3)
    data = fz.xlsx_bytes(fz.ACC_HEAD, rows)
    src = zipfile.ZipFile(io.BytesIO(data))
    p = tmp_path / "r-accelerometer.xlsx"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        for info in src.infolist():
            blob = src.read(info.filename)
            if info.filename == "xl/worksheets/sheet1.xml":
                blob = blob.replace(b'<c r="A3" t="n"><v>', b'<c r="A3" t="d"><v>2025-13-01T00:00:00', 1)
                blob = blob.replace(b'<c r="A3"><v>', b'<c r="A3" t="d"><v>2025-13-01T00:00:00', 1)
            zf.writestr(info.filename, blob)
    with pytest.raises(CorruptFile) as ei:
        recording_windows(decode_study_tables(p, None, p.name), rate_hz=50, window=200, step=100)
    msg = str(ei.value)
    assert msg.startswith("r-accelerometer.xlsx: row 3: cannot read the workbook") and "save it again" in msg, msg


def test_a_unit_error_names_the_file(tmp_path):
    rows = fz.study_rows("accelerometer", n_rows=12)
    for r in rows:
        r[5] = fz._list([100_000.0] * 25)  # far from 1 g in any unit
    a = _write(tmp_path / "r-accelerometer_data.csv", fz.csv_bytes(fz.ACC_HEAD, rows))
    with pytest.raises(InputError, match=r"^r-accelerometer_data\.csv: accelerometer magnitude"):
        recording_windows(decode_study_tables(a, None, a.name), rate_hz=50, window=200, step=100)


def test_zip_member_that_cannot_be_written_names_the_member_not_our_folders(tmp_path, minute_fit):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x" * 300 + ".fit", minute_fit)
    z = _write(tmp_path / "export.zip", buf.getvalue())
    scratch = tmp_path / "scratch-internal"
    with pytest.raises(InputError) as ei:
        open_export([z], scratch, max_archive_bytes=10**8)
    msg = str(ei.value)
    assert msg.startswith("export.zip: ") and "zip them again" in msg
    assert "destination" not in msg and str(tmp_path) not in msg, msg


# -- agent process pairs study tables -----------------------------------------------------------------


def test_agent_process_pairs_study_tables_given_together(tmp_path):
    a = _write(tmp_path / "rec-accelerometer_data.csv", fz.csv_bytes(fz.ACC_HEAD, fz.study_rows("accelerometer", 30)))
    g = _write(tmp_path / "rec-gyroscope_data.csv", fz.csv_bytes(fz.GYR_HEAD, fz.study_rows("gyroscope", 30)))
    env = dict(os.environ, HAR_EDGE_DATA_DIR=str(tmp_path / "var"))
    r = subprocess.run(
        [sys.executable, "-m", "har_edge.cli", "agent", "process", str(a), str(g)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rec-accelerometer_data.csv + rec-gyroscope_data.csv: " in r.stdout and "windows" in r.stdout
    assert "quarantined" not in r.stdout


def test_quality_clock_jumps_reaches_the_outbox(settings, tmp_path, minute_fit):
    from har_edge.agent.daemon import Agent

    agent = Agent(settings)
    src = _write(settings.inbox / "jump.fit", _shift(minute_fit, DAY, first=40, count=1))
    claimed = agent.folder.claim([src])
    outcome = agent.handle(claimed)
    assert outcome.status == "processed", outcome.error
    points = {p.key: p.value for p in agent.outbox.file_metrics(outcome.file_id)}
    assert points["quality_clock_jumps"] >= 1
    assert agent.processor.last_data_ms is not None

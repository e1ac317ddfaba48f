"""Garmin IMU tables: study CSV/xlsx pairs and FitCSVTool CSVs, written here and decoded exactly."""

from __future__ import annotations

import csv
import json
import re
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from har_edge.agent.decode import tables
from har_edge.agent.decode.tables import (
    decode_fitcsv,
    decode_study_tables,
    pair_key,
    pair_tables,
    parse_list_cell,
    sniff_table,
)
from har_edge.agent.decode.types import FIT_EPOCH_S, Recording, SensorBlock
from har_edge.agent.errors import CorruptFile, HarEdgeError, InputError, NoImuData, UnknownFormat
from har_edge.agent.preprocess import recording_windows

FIT0 = 1_111_111_111  # FIT seconds: 2025-03-17T00:38:31Z
ACC_COLS = ("calibrated_accel_x", "calibrated_accel_y", "calibrated_accel_z")
GYR_COLS = ("calibrated_gyro_x", "calibrated_gyro_y", "calibrated_gyro_z")
HEAD = ("timestamp", "timestamp_ms", "sample_time_offset")


@dataclass
class Msg:
    ts: int  # FIT seconds
    ms: int
    offs: list[int]
    x: list[float]
    y: list[float]
    z: list[float]

    def cols(self):
        return (self.x, self.y, self.z)


def make_msgs(n: int = 4, per: int = 25, step_ms: int = 10, start: int = FIT0, seed: int = 0, scale=1000.0):
    """Messages of ``per`` samples every ``step_ms``; values are exact in float32 (multiples of 1/4)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t0 = i * per * step_ms
        vals = (rng.integers(-4 * 200, 4 * 200, size=(3, per)) / 4.0).tolist()
        vals[2] = [v + scale for v in vals[2]]  # gravity on z, milli-g
        out.append(Msg(start + t0 // 1000, t0 % 1000, [j * step_ms for j in range(per)], *vals))
    return out


def expected(msgs: list[Msg], *, unix_base_s: int | None = None) -> SensorBlock:
    t, xyz = [], []
    for m in msgs:
        base = (m.ts + FIT_EPOCH_S if unix_base_s is None else unix_base_s + (m.ts - FIT0)) * 1000 + m.ms
        t += [base + o for o in m.offs]
        xyz += list(zip(m.x, m.y, m.z, strict=False))
    return SensorBlock(np.array(t, np.int64), np.array(xyz, np.float32).reshape(-1, 3))


def fit_date(ts: int, fmt: str = "%m/%d/%Y, %I:%M:%S %p") -> str:
    return (datetime(1989, 12, 31, tzinfo=UTC) + timedelta(seconds=ts)).strftime(fmt)


def fmt_list(values, style: str) -> str:
    if style == "json_str":  # the study's ["0","10",...]
        return json.dumps([_num(v) for v in values])
    if style == "json_num":
        return "[" + ", ".join(_num(v) for v in values) + "]"
    if style == "pipe":
        return "|".join(_num(v) for v in values)
    raise AssertionError(style)


def _num(v) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def study_rows(msgs: list[Msg], *, style: str = "json_str", ts: str = "fit"):
    for m in msgs:
        stamp = m.ts if ts == "fit" else fit_date(m.ts)
        yield [stamp, m.ms, fmt_list(m.offs, style)] + [fmt_list(c, style) for c in m.cols()]


def write_study_csv(path: Path, msgs, sensor_cols=ACC_COLS, *, header=None, **kw) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header or HEAD + sensor_cols)
        w.writerows(study_rows(msgs, **kw))
    return path


def write_study_xlsx(path: Path, msgs, sensor_cols=ACC_COLS, *, ts: str = "fit", style: str = "json_str") -> Path:
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(list(HEAD + sensor_cols))
    for m in msgs:
        if ts == "datetime_cell":
            stamp = datetime(1989, 12, 31) + timedelta(seconds=m.ts)  # naive: UTC
        elif ts == "date":
            stamp = fit_date(m.ts)
        else:
            stamp = m.ts
        ws.append([stamp, m.ms, fmt_list(m.offs, style)] + [fmt_list(c, style) for c in m.cols()])
    wb.save(path)
    return path


def write_fitcsv_rows(path: Path, acc: list[Msg], gyr: list[Msg], *, units="g") -> Path:
    """The FitCSVTool -b layout: Definition and Data rows of many messages, arrays '|'-separated."""
    width = 8
    head = ["Type", "Local Number", "Message"]
    for i in range(1, width + 1):
        head += [f"Field {i}", f"Value {i}", f"Units {i}"]
    rows = [
        ["Definition", "0", "file_id", "type", "1", "", "manufacturer", "1", ""],
        ["Data", "0", "file_id", "type", "4", "", "manufacturer", "1", ""],
        ["Definition", "1", "accelerometer_data", "timestamp", "1", "", "sample_time_offset", "25", ""],
        ["Definition", "2", "gyroscope_data", "timestamp", "1", "", "sample_time_offset", "25", ""],
        ["Data", "3", "record", "timestamp", str(FIT0), "s", "heart_rate", "80", "bpm"],
    ]
    pairs = [(m, "accelerometer_data", ACC_COLS, units) for m in acc] + [
        (m, "gyroscope_data", GYR_COLS, "deg/s") for m in gyr
    ]
    pairs.sort(key=lambda p: (p[0].ts, p[0].ms, p[1]))
    for m, msg, cols, unit in pairs:
        row = ["Data", "1" if msg.startswith("acc") else "2", msg, "timestamp", str(m.ts), "s"]
        row += ["timestamp_ms", str(m.ms), "ms", "sample_time_offset", fmt_list(m.offs, "pipe"), "ms"]
        row += ["accel_x" if msg.startswith("acc") else "gyro_x", "1|2", "counts"]
        for c, vals in zip(cols, m.cols(), strict=False):
            row += [c, fmt_list(vals, "pipe"), unit]
        rows.append(row)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
        w.writerow(head)
        w.writerows(rows)
    return path


def data_header(msg: str, cols) -> list[str]:
    return [f"{msg}.timestamp[s]", f"{msg}.timestamp_ms[ms]", f"{msg}.sample_time_offset[ms]"] + [
        f"{msg}.{c}[{'g' if 'accel' in c else 'deg/s'}]" for c in cols
    ]


def data_cells(m: Msg) -> list[str]:
    return [str(m.ts), str(m.ms), fmt_list(m.offs, "pipe")] + [fmt_list(c, "pipe") for c in m.cols()]


def write_fitcsv_data(path: Path, acc: list[Msg], gyr: list[Msg]) -> Path:
    """The FitCSVTool --data layout with both messages in one file (each row fills its own columns)."""
    head = data_header("accelerometer_data", ACC_COLS) + data_header("gyroscope_data", GYR_COLS)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for a, g in zip(acc, gyr, strict=False):
            w.writerow(data_cells(a) + [""] * 6)
            w.writerow([""] * 6 + data_cells(g))
    return path


def collect(rec: Recording) -> tuple[SensorBlock, SensorBlock, list]:
    chunks = list(rec.chunks())
    acc = SensorBlock.concat([c.accel for c in chunks])
    gyr = SensorBlock.concat([c.gyro for c in chunks if c.gyro is not None])
    return acc, gyr, chunks


def assert_block(got: SensorBlock, want: SensorBlock) -> None:
    assert got.t_ms.dtype == np.int64 and got.xyz.dtype == np.float32
    np.testing.assert_array_equal(got.t_ms, want.t_ms)
    np.testing.assert_array_equal(got.xyz, want.xyz)


# -- study tables --------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["json_str", "json_num", "pipe"])
def test_study_csv_pair_with_fit_seconds_decodes_exactly(tmp_path, style):
    acc, gyr = make_msgs(seed=1), make_msgs(seed=2, scale=0)
    a = write_study_csv(tmp_path / "2025-03-23-15-23-10-accelerometer_data.csv", acc, style=style)
    g = write_study_csv(tmp_path / "2025-03-23-15-23-10-gyroscope_data.csv", gyr, GYR_COLS, style=style)
    rec = decode_study_tables(a, g, "rec1")
    assert (rec.name, rec.format, rec.has_gyro, rec.accel_unit) == ("rec1", "study_csv", True, None)
    got_a, got_g, chunks = collect(rec)
    assert len(chunks) == 1
    assert_block(got_a, expected(acc))
    assert_block(got_g, expected(gyr))
    assert got_a.t_ms[0] == (FIT0 + FIT_EPOCH_S) * 1000  # 2025, not 1970 or 2055
    assert datetime.fromtimestamp(got_a.t_ms[0] / 1000, UTC).year == 2025
    assert rec.meta["time_base"] == "fit_s"
    assert rec.meta["samples"] == {"accelerometer": 100, "gyroscope": 100}


def test_study_csv_with_date_strings_is_utc(tmp_path):
    acc = make_msgs(n=3)
    a = write_study_csv(tmp_path / "x-accelerometer.csv", acc, ts="date")
    got, _, _ = collect(decode_study_tables(a, None, "r"))
    assert_block(got, expected(acc))
    # the thesis' own example: 03/24/2025, 07:52:19 AM (and a PM time) are UTC
    p = tmp_path / "y-accelerometer.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEAD + ACC_COLS)
        w.writerow(["03/24/2025, 07:52:19 AM", 5, '["0","10"]', '["1","2"]', '["3","4"]', '["1000","1001"]'])
        w.writerow(["03/24/2025, 01:05:00 PM", 0, '["0"]', '["1"]', '["3"]', '["1000"]'])
    got, _, _ = collect(decode_study_tables(p, None, "r"))
    t0 = int(datetime(2025, 3, 24, 7, 52, 19, tzinfo=UTC).timestamp() * 1000)
    t1 = int(datetime(2025, 3, 24, 13, 5, 0, tzinfo=UTC).timestamp() * 1000)
    assert got.t_ms.tolist() == [t0 + 5, t0 + 15, t1]
    assert got.xyz.tolist() == [[1, 3, 1000], [2, 4, 1001], [1, 3, 1000]]


@pytest.mark.parametrize("ts", ["fit", "date", "datetime_cell"])
def test_study_xlsx_pair_decodes_exactly(tmp_path, ts):
    acc, gyr = make_msgs(seed=3), make_msgs(seed=4, scale=0)
    a = write_study_xlsx(tmp_path / "P1-Accelerometer.xlsx", acc, ts=ts)
    g = write_study_xlsx(tmp_path / "P1-Gyroscope.xlsx", gyr, GYR_COLS, ts=ts, style="json_num")
    assert sniff_table(a) == "study_accel" and sniff_table(g) == "study_gyro"
    rec = decode_study_tables(a, g, "r")
    assert rec.format == "study_xlsx" and rec.has_gyro
    got_a, got_g, _ = collect(rec)
    assert_block(got_a, expected(acc))
    assert_block(got_g, expected(gyr))


def test_xlsx_with_numeric_cells_and_an_index_column(tmp_path):
    """pandas' to_excel writes an unnamed index column; single samples may be stored as numbers."""
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append([None, *HEAD, *ACC_COLS])
    ws.append([0, FIT0, 250, 0, 1.5, -2, 1000])
    ws.append([1, FIT0, 260, "[0]", "[2.5]", "[-3]", "[999.25]"])
    wb.save(tmp_path / "accelerometer.xlsx")
    got, _, _ = collect(decode_study_tables(tmp_path / "accelerometer.xlsx", None, "r"))
    base = (FIT0 + FIT_EPOCH_S) * 1000
    assert got.t_ms.tolist() == [base + 250, base + 260]
    assert got.xyz.tolist() == [[1.5, -2, 1000], [2.5, -3, 999.25]]


def test_units_in_column_names_and_semicolons(tmp_path):
    acc = make_msgs(n=2)
    header = ["timestamp (s)", "timestamp_ms (ms)", "sample_time_offset (ms)"] + [f"{c} (g)" for c in ACC_COLS]
    p = tmp_path / "accelerometer_calibrated.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(header)
        w.writerows(study_rows(acc, style="pipe"))
    assert sniff_table(p) == "study_accel"
    rec = decode_study_tables(p, None, "r")
    assert rec.has_gyro is False and rec.meta["stated_units"]["accelerometer"] == "g"
    assert_block(collect(rec)[0], expected(acc))


def test_unix_seconds_are_recognised_and_nanoseconds_refused(tmp_path):
    unix0 = 1_742_802_739  # 2025-03-24 as Unix seconds: as FIT seconds it would be 2045
    msgs = make_msgs(n=2, start=unix0)
    p = write_study_csv(tmp_path / "accelerometer.csv", msgs)
    rec = decode_study_tables(p, None, "r")
    got, _, _ = collect(rec)
    assert rec.meta["time_base"] == "unix_s"
    assert got.t_ms[0] == unix0 * 1000
    for bad, words in [(unix0 * 10**9, "nanoseconds"), (1000, "system time"), (-5, "negative")]:
        q = write_study_csv(tmp_path / f"b{abs(bad)}-accelerometer.csv", make_msgs(n=1, start=bad))
        with pytest.raises(InputError, match=words) as ei:
            decode_study_tables(q, None, "r")
        assert q.name in str(ei.value) and "row 2" in str(ei.value)


def test_rows_without_offsets_need_one_sample_each(tmp_path):
    p = tmp_path / "accelerometer.csv"
    p.write_text("timestamp,timestamp_ms," + ",".join(ACC_COLS) + f"\n{FIT0},10,1,2,1000\n{FIT0},20,3,4,1000\n")
    got, _, _ = collect(decode_study_tables(p, None, "r"))
    assert got.t_ms.tolist() == [(FIT0 + FIT_EPOCH_S) * 1000 + 10, (FIT0 + FIT_EPOCH_S) * 1000 + 20]
    p.write_text("timestamp," + ",".join(ACC_COLS) + f'\n{FIT0},"[1,2]","[1,2]","[1,2]"\n')
    with pytest.raises(InputError, match="row 2: sample_time_offset is missing"):
        decode_study_tables(p, None, "r")


def test_nan_samples_are_dropped_and_counted(tmp_path):
    p = tmp_path / "accelerometer.csv"
    p.write_text(",".join(HEAD + ACC_COLS) + f'\n{FIT0},0,"[0,10,20]","[1,NaN,3]","[1,2,3]","[1000,1000,nan]"\n')
    rec = decode_study_tables(p, None, "r")
    got, _, _ = collect(rec)
    assert got.xyz.tolist() == [[1, 1, 1000]]
    assert rec.meta["dropped_samples"] == {"accelerometer": 2}


def test_gyro_file_without_rows_means_no_gyro(tmp_path):
    a = write_study_csv(tmp_path / "k-accelerometer.csv", make_msgs(n=2))
    g = write_study_csv(tmp_path / "k-gyroscope.csv", [], GYR_COLS)
    rec = decode_study_tables(a, g, "r")
    assert rec.has_gyro is False
    assert all(c.gyro is None for c in rec.chunks())


def test_long_recordings_stream_in_time_ordered_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "CHUNK_SAMPLES", 60)
    monkeypatch.setattr(tables, "_TOKEN_BATCH", 40)
    acc, gyr = make_msgs(n=12, seed=5), make_msgs(n=14, seed=6, scale=0)  # gyro runs past the accel end
    a = write_study_csv(tmp_path / "accelerometer.csv", acc)
    g = write_study_csv(tmp_path / "gyroscope.csv", gyr, GYR_COLS)
    got_a, got_g, chunks = collect(decode_study_tables(a, g, "r"))
    assert len(chunks) > 4
    assert_block(got_a, expected(acc))
    assert_block(got_g, expected(gyr))
    for c in chunks:
        if len(c.accel) and len(c.gyro):
            assert c.gyro.t_ms.max() <= c.accel.t_ms.max()


def test_decoded_tables_feed_preprocessing(tmp_path):
    """A 30 s 100 Hz milli-g pair becomes 50 Hz windows in m/s² (units detected from magnitude)."""
    acc, gyr = make_msgs(n=120, seed=7), make_msgs(n=120, seed=8, scale=0)
    a = write_study_csv(tmp_path / "accelerometer.csv", acc)
    g = write_study_csv(tmp_path / "gyroscope.csv", gyr, GYR_COLS)
    ws = recording_windows(decode_study_tables(a, g, "r"), rate_hz=50, window=200, step=100)
    assert len(ws) >= 10
    assert ws.quality["gyro_present"] == 1.0
    assert abs(float(np.median(ws.windows[..., 2])) - 9.81) < 0.3


MEASURE = """
import resource, sys
from pathlib import Path
from har_edge.agent.decode.tables import decode_study_tables
rec = decode_study_tables(Path(sys.argv[1]), None, "r")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(len(c.accel) for c in rec.chunks())
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(n, grown)
"""


@pytest.mark.slow
def test_one_hour_at_100_hz_stays_small(tmp_path):
    """14,400 rows of 25 samples (15 MB of CSV) decode with a few tens of MB at peak."""
    import subprocess
    import sys

    per, n = 25, 14_400
    p = tmp_path / "accelerometer.csv"
    offs = json.dumps([str(j * 10) for j in range(per)])
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEAD + ACC_COLS)
        for i in range(n):
            t0 = i * 250
            xs = json.dumps([str((i + j) % 7) for j in range(per)])
            w.writerow([FIT0 + t0 // 1000, t0 % 1000, offs, xs, xs, json.dumps(["1000.5"] * per)])
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(p)], cwd=root, capture_output=True, text=True, timeout=300, check=True
    )
    total, grown_kib = map(int, out.stdout.split())
    assert total == per * n
    assert grown_kib < 80 * 1024, f"peak RSS grew by {grown_kib / 1024:.0f} MiB"


# -- pairing and sniffing ----------------------------------------------------------------------


def test_pair_key():
    assert pair_key(Path("2025-03-23-15-23-10-accelerometer_data.csv")) == ("2025-03-23-15-23-10", "accelerometer")
    assert pair_key("/d/2025-03-23-15-23-10-GYROSCOPE_data.xlsx") == ("2025-03-23-15-23-10", "gyroscope")
    assert pair_key("Accelerometer.csv") == ("", "accelerometer")
    assert pair_key("/accelerometer/notes.csv") is None
    assert pair_key("accelerometer_and_gyroscope.csv") is None
    assert pair_key("record.csv") is None


def test_pair_tables(tmp_path):
    names = [
        "2025-03-23-15-23-10-accelerometer_data.csv",
        "2025-03-23-15-23-10-gyroscope_data.csv",
        "2025-03-24-07-00-00-Accelerometer_data.xlsx",
        "2025-03-24-07-00-00-gyroscope_data.xlsx",
        "solo-accelerometer.csv",
        "orphan-gyroscope.csv",
        "other.csv",
    ]
    paths = [tmp_path / n for n in names]
    got = pair_tables(paths)
    assert got == [
        (paths[0], paths[1]),
        (paths[2], paths[3]),
        (paths[4], None),
    ]


def test_sniff_table(tmp_path):
    acc = make_msgs(n=1)
    assert sniff_table(write_study_csv(tmp_path / "a.csv", acc)) == "study_accel"
    assert sniff_table(write_study_csv(tmp_path / "g.csv", acc, GYR_COLS)) == "study_gyro"
    assert sniff_table(write_fitcsv_rows(tmp_path / "r.csv", acc, acc)) == "fitcsv"
    assert sniff_table(write_fitcsv_data(tmp_path / "d.csv", acc, acc)) == "fitcsv"
    (tmp_path / "plain.csv").write_text("time,x,y,z\n1,2,3,4\n")
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "bin.fit").write_bytes(bytes([14, 16, 0, 0, 0, 0, 0, 0]) + b".FIT" + bytes(100))
    (tmp_path / "latin.csv").write_bytes(b"\xff\xfe\xfa timestamp\n")
    (tmp_path / "bad.xlsx").write_bytes(b"PK\x03\x04 not really")
    for n in ("plain.csv", "empty.csv", "bin.fit", "latin.csv", "bad.xlsx", "missing.csv"):
        assert sniff_table(tmp_path / n) is None, n


# -- FitCSVTool --------------------------------------------------------------------------------


def test_fitcsv_row_layout_decodes_exactly(tmp_path):
    acc, gyr = make_msgs(seed=9), make_msgs(seed=10, scale=0)
    p = write_fitcsv_rows(tmp_path / "out.csv", acc, gyr)
    rec = decode_fitcsv(p, "r")
    assert (rec.format, rec.has_gyro, rec.accel_unit, rec.meta["layout"]) == ("fitcsv", True, None, "fitcsv_rows")
    got_a, got_g, _ = collect(rec)
    assert_block(got_a, expected(acc))
    assert_block(got_g, expected(gyr))
    assert rec.meta["stated_units"] == {"accelerometer": "g", "gyroscope": "deg/s"}


def test_fitcsv_row_layout_with_iso_timestamps_and_no_gyro(tmp_path):
    acc = make_msgs(n=2)
    p = write_fitcsv_rows(tmp_path / "out.csv", acc, [])
    text = p.read_text()
    for m in acc:
        text = text.replace(f"timestamp,{m.ts},s", f"timestamp,{fit_date(m.ts, '%Y-%m-%dT%H:%M:%SZ')},s")
    p.write_text(text)
    rec = decode_fitcsv(p, "r")
    assert rec.has_gyro is False
    got_a, _got_g, chunks = collect(rec)
    assert_block(got_a, expected(acc))
    assert all(c.gyro is None for c in chunks)


def test_fitcsv_data_layout_both_messages(tmp_path):
    acc, gyr = make_msgs(seed=11), make_msgs(seed=12, scale=0)
    p = write_fitcsv_data(tmp_path / "out_data.csv", acc, gyr)
    rec = decode_fitcsv(p, "r")
    assert rec.meta["layout"] == "fitcsv_data" and rec.has_gyro
    got_a, got_g, _ = collect(rec)
    assert_block(got_a, expected(acc))
    assert_block(got_g, expected(gyr))


def test_fitcsv_data_per_message_files_pair_like_study_tables(tmp_path):
    acc, gyr = make_msgs(seed=13), make_msgs(seed=14, scale=0)
    paths = {}
    for msgs, msg, cols in ((acc, "accelerometer_data", ACC_COLS), (gyr, "gyroscope_data", GYR_COLS)):
        p = tmp_path / f"out_{msg}.csv"
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(data_header(msg, cols))
            w.writerows(data_cells(m) for m in msgs)
        paths[msg] = p
    a, g = paths["accelerometer_data"], paths["gyroscope_data"]
    assert (sniff_table(a), sniff_table(g)) == ("study_accel", "study_gyro")
    assert pair_tables([a, g]) == [(a, g)]
    rec = decode_study_tables(a, g, "r")
    assert rec.format == "fitcsv" and rec.meta["layout"] == "fitcsv_data"
    got_a, got_g, _ = collect(rec)
    assert_block(got_a, expected(acc))
    assert_block(got_g, expected(gyr))
    # alone, the accelerometer file decodes without gyroscope
    assert decode_fitcsv(a, "r").has_gyro is False


def test_fitcsv_without_imu_messages_says_so(tmp_path):
    p = write_fitcsv_rows(tmp_path / "activity.csv", [], [])
    with pytest.raises(NoImuData, match=r"activity.csv: no accelerometer_data rows \(messages: file_id, record\)"):
        decode_fitcsv(p, "r")
    text = p.read_text().replace("record", "hsa_accelerometer_data")
    p.write_text(text)
    with pytest.raises(NoImuData, match="Health SDK"):
        decode_fitcsv(p, "r")


def test_fitcsv_raw_counts_only_is_explained(tmp_path):
    acc = make_msgs(n=1)
    p = write_fitcsv_rows(tmp_path / "raw.csv", acc, [])
    lines = p.read_text().splitlines()
    lines = [
        ln.split(",calibrated_accel_x")[0] if ",accelerometer_data," in ln and ln.startswith("Data") else ln
        for ln in lines
    ]
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        InputError,
        match=r"raw.csv: row \d+: accelerometer_data message without calibrated_accel_x.*"
        r"raw counts only",
    ):
        decode_fitcsv(p, "r")


# -- bad input ----------------------------------------------------------------------------------


def test_missing_column_names_file_column_and_fix(tmp_path):
    p = tmp_path / "accel.csv"
    p.write_text("timestamp,timestamp_ms,sample_time_offset,calibrated_accel_x,calibrated_accel_z\n1,2,3,4,5\n")
    with pytest.raises(InputError) as ei:
        decode_study_tables(p, None, "r")
    msg = str(ei.value)
    assert msg.startswith("accel.csv: column calibrated_accel_y missing (found: timestamp, timestamp_ms,")
    assert "export the accelerometer_data message with calibrated values" in msg


def test_swapped_and_raw_only_files_are_explained(tmp_path):
    g = write_study_csv(tmp_path / "g.csv", make_msgs(n=1), GYR_COLS)
    with pytest.raises(InputError, match="pass it as the gyroscope file"):
        decode_study_tables(g, None, "r")
    raw = tmp_path / "raw.csv"
    raw.write_text("timestamp,timestamp_ms,sample_time_offset,accel_x,accel_y,accel_z\n1,2,3,4,5,6\n")
    with pytest.raises(InputError, match="raw accel_x counts only"):
        decode_study_tables(raw, None, "r")


BAD_CELLS = [
    (3, "[1, 2", "calibrated_accel_x cell '\\[1, 2' is not a list of numbers"),
    (5, "__import__('os').system('true')", "is not a list of numbers"),
    (3, "[1, 2, 3, 4]", "arrays of different lengths \\(calibrated_accel_x 4, calibrated_accel_y 3"),
    (5, '["a","b","c"]', "is not a list of numbers"),
    (5, "[1e999, 1, 1]", None),  # parses; inf samples are dropped like nan
    (2, "[0, 10]", "sample_time_offset has 2 values, calibrated_accel_x 3"),
    (2, "[0, nan, 20]", "sample_time_offset holds an invalid value"),
    (1, "12x", "timestamp_ms '12x' is not a number"),
    (0, "yesterday", "timestamp 'yesterday' is neither a date"),
    (0, "", "timestamp is empty"),
]


@pytest.mark.parametrize("col,cell,words", BAD_CELLS)
def test_malformed_cells_name_the_row(tmp_path, col, cell, words):
    p = tmp_path / "accelerometer.csv"
    rows = [[FIT0, 0, "[0,10,20]", "[1,2,3]", "[1,2,3]", "[1000,1000,1000]"] for _ in range(3)]
    rows[1][col] = cell
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEAD + ACC_COLS)
        w.writerows(rows)
    if words is None:
        rec = decode_study_tables(p, None, "r")
        assert len(collect(rec)[0]) == 8 and rec.meta["dropped_samples"] == {"accelerometer": 1}
        return
    with pytest.raises(InputError, match=words) as ei:
        list(decode_study_tables(p, None, "r").chunks())
    assert str(ei.value).startswith("accelerometer.csv: row 3: ")


def test_bad_rows_in_xlsx_name_the_row(tmp_path):
    acc = make_msgs(n=3)
    p = write_study_xlsx(tmp_path / "accelerometer.xlsx", acc)
    import openpyxl

    wb = openpyxl.load_workbook(p)
    wb.active["D4"] = "[1, 2]"
    wb.save(p)
    with pytest.raises(InputError, match=r"accelerometer.xlsx: row 4: arrays of different lengths"):
        list(decode_study_tables(p, None, "r").chunks())


def test_unreadable_files(tmp_path):
    cases = {
        "header-only-accelerometer.csv": (",".join(HEAD + ACC_COLS) + "\n").encode(),
        "empty-accelerometer.csv": b"",
        "broken.xlsx": b"PK\x03\x04 truncated",
        "old.xls": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100),
        "watch.fit": bytes([14, 16, 0, 0, 0, 0, 0, 0]) + b".FIT" + bytes(50),
        "latin1.csv": "timestamp,caf\xe9\n".encode("latin-1"),
        "huge-line.csv": b"timestamp," + b"x" * (tables.MAX_LINE_CHARS + 10),
    }
    expect = {
        "header-only-accelerometer.csv": (NoImuData, "no accelerometer samples"),
        "empty-accelerometer.csv": (InputError, "column"),
        "broken.xlsx": (CorruptFile, "zip"),
        "old.xls": (UnknownFormat, "save it as .xlsx"),
        "watch.fit": (UnknownFormat, "binary FIT"),
        "latin1.csv": (UnknownFormat, "not UTF-8"),
        "huge-line.csv": (InputError, "longer than"),
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        err, words = expect[name]
        with pytest.raises(err, match=words) as ei:
            decode_study_tables(p, None, "r")
        assert name in str(ei.value)
        with pytest.raises(HarEdgeError):
            decode_fitcsv(p, "r")
    with pytest.raises(InputError, match="cannot read"):
        decode_study_tables(tmp_path / "nope.csv", None, "r")


def test_xlsx_bomb_is_refused_before_openpyxl(tmp_path):
    p = tmp_path / "accelerometer.xlsx"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("xl/worksheets/sheet1.xml", b"\0" * (8 << 20))
    with pytest.raises(HarEdgeError, match="compression ratio"):
        decode_study_tables(p, None, "r")


def test_damaged_xlsx_is_corrupt(tmp_path):
    p = tmp_path / "accelerometer.xlsx"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("hello.txt", "not a workbook")
    with pytest.raises(CorruptFile, match=re.escape("accelerometer.xlsx: cannot read the workbook")):
        decode_study_tables(p, None, "r")


# -- list cells (property based) -------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, max_size=40), st.sampled_from(["json_str", "json_num", "json_dumps", "pipe", "bare"]))
def test_list_cells_round_trip(values, style):
    if style == "json_dumps":
        cell = json.dumps(values)
    elif style == "json_str":
        cell = json.dumps([repr(v) for v in values])
    elif style == "json_num":
        cell = "[" + " , ".join(repr(v) for v in values) + " ]"
    elif style == "pipe":
        cell = "|".join(repr(v) for v in values)
    else:
        cell = ", ".join(repr(v) for v in values)
    got = [float(x) for x in parse_list_cell(cell)]
    assert got == values


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_list_cell_parser_raises_only_value_error(text):
    try:
        out = parse_list_cell(text)
    except ValueError:
        return
    assert all(isinstance(x, str) for x in out)
    np.asarray(out, dtype=np.float64)  # whatever it accepts is numeric

"""Structure-aware mutators of FIT, CSV, xlsx and zip inputs, and the invariant every input must keep.

Used by ``tests/test_fuzz_inputs.py`` (Hypothesis, in ``make test``) and ``tests/fuzz/atheris_inputs.py``
(``make fuzz``). A mutation is a list of small integer tuples, so Hypothesis can shrink it and atheris
can drive it from bytes.

FIT files are parsed into definition and data records (:func:`parse_fit`), mutated in that model
(field sizes, base types, array lengths, field and message numbers, endianness, timestamps, record
order) and written back with consistent sizes and fresh header and file CRCs (:func:`write_fit`), so
the decoder's own logic is exercised rather than its CRC check.

The invariant (:func:`check_input`): decoding and windowing an input either succeeds or raises an
:class:`~har_edge.agent.errors.InputError` whose message names the file; nothing else escapes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tempfile
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

FIT_EPOCH_S = 631065600
DAY_S = 86400
#: a FIT timestamp of 2025-03-24 07:52:19
FIT_2025 = 1111737139

Op = tuple[int, int, int]

# -- FIT CRC -----------------------------------------------------------------------------


def _crc_table() -> tuple[int, ...]:
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
        out.append(c)
    return tuple(out)


_CRC_TABLE = _crc_table()


def fit_crc(data: bytes, crc: int = 0) -> int:
    """The FIT CRC (CRC-16/ARC, as the FIT SDK's nibble table computes it), a byte at a time."""
    table = _CRC_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


# -- FIT model ------------------------------------------------------------------------------

BASE_TYPES = (0x00, 0x01, 0x02, 0x83, 0x84, 0x85, 0x86, 0x07, 0x88, 0x89, 0x0A, 0x8B, 0x8C, 0x0D, 0x8E, 0x8F, 0x90)


@dataclass
class FitDef:
    local: int
    arch: int
    global_num: int
    fields: list[list[int]]  # [num, size, base_type]
    dev_fields: list[list[int]] | None = None  # [num, size, dev_index]; None: no developer flag


@dataclass
class FitData:
    header: int  # the record header byte (normal or compressed timestamp)
    fields: list[bytes]
    dev: list[bytes] = field(default_factory=list)


@dataclass
class Fit:
    header: bytearray
    records: list[FitDef | FitData]
    tail: bytes = b""  # bytes the parser could not read as records (kept as they are)


def parse_fit(data: bytes) -> Fit:
    """Records of a well-formed FIT file (as fitgen writes them); stops at the first record it cannot read."""
    hsize = data[0]
    size = struct.unpack_from("<I", data, 4)[0]
    end = min(hsize + size, len(data))
    pos = hsize
    defs: dict[int, FitDef] = {}
    out: list[FitDef | FitData] = []
    while pos < end:
        h = data[pos]
        if h & 0x80:
            local = (h >> 5) & 0x3
        elif h & 0x40:
            if pos + 6 > end:
                break
            arch = data[pos + 2]
            gnum = struct.unpack_from("<H" if arch == 0 else ">H", data, pos + 3)[0]
            n = data[pos + 5]
            p = pos + 6
            fields = [list(data[p + 3 * i : p + 3 * i + 3]) for i in range(n)]
            p += 3 * n
            dev = None
            if h & 0x20:
                nd = data[p]
                dev = [list(data[p + 1 + 3 * i : p + 4 + 3 * i]) for i in range(nd)]
                p += 1 + 3 * nd
            if p > end:
                break
            d = FitDef(h & 0xF, arch, gnum, fields, dev)
            defs[d.local] = d
            out.append(d)
            pos = p
            continue
        else:
            local = h & 0xF
        d = defs.get(local)
        if d is None:
            break
        p = pos + 1
        fbytes = []
        for _num, fsize, _bt in d.fields:
            fbytes.append(data[p : p + fsize])
            p += fsize
        dbytes = []
        for _num, fsize, _idx in d.dev_fields or []:
            dbytes.append(data[p : p + fsize])
            p += fsize
        if p > end:
            break
        out.append(FitData(h, fbytes, dbytes))
        pos = p
    return Fit(bytearray(data[:hsize]), out, data[pos:end])


def write_fit(fit: Fit, *, fix_crc: bool = True, fix_size: bool = True) -> bytes:
    """Serialize, each data record laid out by the definition in force (fields padded or cut to its sizes)."""
    body = bytearray()
    defs: dict[int, FitDef] = {}
    for r in fit.records:
        if isinstance(r, FitDef):
            defs[r.local] = r
            h = 0x40 | (r.local & 0xF) | (0x20 if r.dev_fields is not None else 0)
            body += bytes([h, 0, r.arch & 0xFF]) + struct.pack("<H" if r.arch == 0 else ">H", r.global_num & 0xFFFF)
            body.append(len(r.fields) & 0xFF)
            for f in r.fields[:255]:
                body += bytes(v & 0xFF for v in f)
            if r.dev_fields is not None:
                body.append(len(r.dev_fields) & 0xFF)
                for f in r.dev_fields[:255]:
                    body += bytes(v & 0xFF for v in f)
            continue
        body.append(r.header & 0xFF)
        local = (r.header >> 5) & 0x3 if r.header & 0x80 else r.header & 0xF
        d = defs.get(local)
        if d is None:
            for b in r.fields:
                body += b
            continue
        for i, (_num, fsize, _bt) in enumerate(d.fields[:255]):
            b = r.fields[i] if i < len(r.fields) else b""
            body += (b + b"\xff" * fsize)[: fsize & 0xFF]
        for i, (_num, fsize, _idx) in enumerate((d.dev_fields or [])[:255]):
            b = r.dev[i] if i < len(r.dev) else b""
            body += (b + b"\xff" * fsize)[: fsize & 0xFF]
    body += fit.tail
    head = bytearray(fit.header)
    if fix_size and len(head) >= 8:
        struct.pack_into("<I", head, 4, len(body))
    if fix_crc and len(head) >= 14:
        struct.pack_into("<H", head, 12, fit_crc(bytes(head[:12])))
    out = bytes(head) + bytes(body)
    return out + struct.pack("<H", fit_crc(out) if fix_crc else 0)


def _defs_in_force(fit: Fit) -> list[tuple[int, FitDef]]:
    """(index of a data record, its definition) for every data record."""
    defs: dict[int, FitDef] = {}
    out = []
    for i, r in enumerate(fit.records):
        if isinstance(r, FitDef):
            defs[r.local] = r
        else:
            local = (r.header >> 5) & 0x3 if r.header & 0x80 else r.header & 0xF
            if local in defs:
                out.append((i, defs[local]))
    return out


#: interesting timestamp values: a day, a month, 68 years ahead, backwards, the ends of uint32
def _timestamp(base: int, k: int) -> int:
    choices = (base + DAY_S, base + 30 * DAY_S, base + 68 * 365 * DAY_S, base - 3600, base - 30 * DAY_S,
               0, 1, 0x0FFFFFFF, 0x10000000, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF, base + 1, base - 1,
               base + (k % 100000))  # fmt: skip
    return choices[k % len(choices)] & 0xFFFFFFFF


def mutate_fit(data: bytes, ops: Sequence[Op]) -> bytes:
    """Apply structure-aware mutations to a FIT file and write it back with consistent sizes and CRCs."""
    fit = parse_fit(data)
    fix_crc = fix_size = True
    for op, a, b in ops:
        recs = fit.records
        defs = [r for r in recs if isinstance(r, FitDef)]
        datas = _defs_in_force(fit)
        kind = op % 16
        if kind == 0 and defs:  # a field's size (and with it the array length of its data)
            d = defs[a % len(defs)]
            if d.fields:
                f = d.fields[b % len(d.fields)]
                f[1] = (b >> 8) % 256 if (b >> 16) & 1 else max(0, f[1] + ((b >> 8) % 9) - 4)
        elif kind == 1 and defs:  # a field's base type
            d = defs[a % len(defs)]
            if d.fields:
                f = d.fields[b % len(d.fields)]
                f[2] = BASE_TYPES[(b >> 8) % len(BASE_TYPES)] if (b >> 16) & 1 else (b >> 8) & 0xFF
        elif kind == 2 and defs:  # a field's number
            d = defs[a % len(defs)]
            if d.fields:
                d.fields[b % len(d.fields)][0] = (b >> 8) & 0xFF
        elif kind == 3 and defs:  # drop or add a field
            d = defs[a % len(defs)]
            if d.fields and b & 1:
                del d.fields[(b >> 1) % len(d.fields)]
            else:
                d.fields.insert((b >> 1) % (len(d.fields) + 1), [(b >> 8) & 0xFF, (b >> 16) % 8, BASE_TYPES[b % 17]])
        elif kind == 4 and defs:  # the message number (accelerometer 165, gyroscope 164, calibration 167, ...)
            d = defs[a % len(defs)]
            d.global_num = (165, 164, 167, 162, 0, 20, 0xFFFF, b & 0xFFFF)[b % 8]
        elif kind == 5 and defs:  # endianness flag, data left as it is
            defs[a % len(defs)].arch ^= 1
        elif kind in (6, 7) and datas:  # a timestamp (field 253), or any uint field set to an edge value
            i, d = datas[a % len(datas)]
            r = recs[i]
            assert isinstance(r, FitData)
            nums = [f[0] for f in d.fields]
            j = nums.index(253) if kind == 6 and 253 in nums else (b % len(nums) if nums else None)
            if j is not None and j < len(r.fields) and len(r.fields[j]) >= 4:
                fmt = "<I" if d.arch == 0 else ">I"
                old = struct.unpack(fmt, r.fields[j][:4])[0]
                r.fields[j] = struct.pack(fmt, _timestamp(old, b)) + r.fields[j][4:]
            elif j is not None and j < len(r.fields) and r.fields[j]:
                r.fields[j] = bytes([(b >> 8) & 0xFF]) * len(r.fields[j])
        elif kind == 8 and datas:  # a burst of timestamps shifted by one offset (a clock jump over many records)
            shift = (DAY_S, 30 * DAY_S, 68 * 365 * DAY_S, -3600, -DAY_S, 7 * DAY_S)[b % 6]
            for i, d in datas[a % len(datas) : a % len(datas) + 1 + (b >> 8) % 200]:
                r = recs[i]
                assert isinstance(r, FitData)
                nums = [f[0] for f in d.fields]
                if 253 in nums:
                    j = nums.index(253)
                    if j < len(r.fields) and len(r.fields[j]) == 4:
                        fmt = "<I" if d.arch == 0 else ">I"
                        r.fields[j] = struct.pack(fmt, (struct.unpack(fmt, r.fields[j])[0] + shift) & 0xFFFFFFFF)
        elif kind == 9 and datas:  # bytes inside one field of a data record
            i, _d = datas[a % len(datas)]
            r = recs[i]
            assert isinstance(r, FitData)
            if r.fields:
                j = b % len(r.fields)
                fb = bytearray(r.fields[j])
                if fb:
                    fb[(b >> 8) % len(fb)] = (b >> 16) & 0xFF
                r.fields[j] = bytes(fb)
        elif kind == 10 and recs:  # drop a record
            del recs[a % len(recs)]
        elif kind == 11 and recs:  # duplicate a record somewhere
            recs.insert(b % (len(recs) + 1), recs[a % len(recs)])
        elif kind == 12 and datas:  # a normal header becomes a compressed-timestamp one (or the local type changes)
            i, _d = datas[a % len(datas)]
            r = recs[i]
            assert isinstance(r, FitData)
            r.header = (0x80 | ((b & 3) << 5) | ((b >> 2) & 0x1F)) if b & 0x100 else (b & 0x0F)
        elif kind == 13:  # header fields: protocol/profile version, header size
            fit.header[(1, 2, 3, 0)[b % 4] % len(fit.header)] = (b >> 8) & 0xFF
        elif kind == 14:  # leave a size or the CRC wrong, or cut the file
            fix_crc, fix_size = bool(b & 1), bool(b & 2)
            if b & 4 and recs:
                del recs[a % len(recs) :]
        elif kind == 15 and defs:  # the developer-data flag and fields
            d = defs[a % len(defs)]
            d.dev_fields = None if d.dev_fields is not None and b & 1 else [[(b >> 8) & 0xFF, (b >> 16) % 16, b % 4]]
    return write_fit(fit, fix_crc=fix_crc, fix_size=fix_size)


# -- tables ----------------------------------------------------------------------------------

ACC_HEAD = ["timestamp", "timestamp_ms", "sample_time_offset", "calibrated_accel_x", "calibrated_accel_y",
            "calibrated_accel_z"]  # fmt: skip
GYR_HEAD = ["timestamp", "timestamp_ms", "sample_time_offset", "calibrated_gyro_x", "calibrated_gyro_y",
            "calibrated_gyro_z"]  # fmt: skip

#: cell values that broke parsers: long digit strings, huge numbers, odd dates, grammar edge cases
NASTY_CELLS: tuple[object, ...] = (
    "1" * 5000, "9" * 400, 10**400, -(10**400), 10**30, 2**63, -1, 0, 1e308, float("inf"), float("nan"),
    "1e999", "-1e999", "nan", "", " ", "[]", "[", "]", '["1",', "1|", "|", ",", "0x10", "1_000", "١٢٣",
    "03/24/2025, 07:52:19 AM", "13/45/2025, 99:99:99 PM", "2025-13-01T00:00:00Z", "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00", "2025-03-24T07:52:19Z", "Z", "\x00", "\ufeff", "'", '"', "1e-400",
    str(FIT_2025), str(FIT_2025 + DAY_S), str(FIT_2025 + 68 * 365 * DAY_S), str(FIT_2025 - 3600),
    str(0x0FFFFFFF), str(10**11), str(10**19), "1" + "0" * 4400, True, False, "[" + ",".join(["0"] * 2000) + "]",
)  # fmt: skip


def _list(values: Sequence[float]) -> str:
    return json.dumps([str(int(v)) if float(v).is_integer() else repr(float(v)) for v in values])


def study_rows(sensor: str, n_rows: int = 12, per: int = 25, start: int = FIT_2025) -> list[list[object]]:
    rows: list[list[object]] = []
    for i in range(n_rows):
        t0 = i * per * 20
        offs = [j * 20 for j in range(per)]
        if sensor == "accelerometer":
            vals = [[50.0 * ((j + i) % 5) for j in range(per)], [10.0] * per, [1000.0 - j for j in range(per)]]
        else:
            vals = [[3.0 * j for j in range(per)], [-1.0] * per, [0.5] * per]
        rows.append([start + t0 // 1000, t0 % 1000, _list(offs), *(_list(v) for v in vals)])
    return rows


def mutate_rows(rows: list[list[object]], ops: Sequence[Op], width: int) -> list[list[object]]:
    """Cells replaced by nasty values or shifted timestamps, rows dropped, duplicated or widened."""
    rows = [list(r) for r in rows]
    for op, a, b in ops:
        kind = op % 6
        if not rows:
            rows.append([None] * width)
        r = rows[a % len(rows)]
        if len(r) < 2:
            r.extend([None] * (2 - len(r)))
        if kind == 0:
            r[b % len(r)] = NASTY_CELLS[(b >> 8) % len(NASTY_CELLS)]
        elif kind == 1:  # the timestamp jumps (a day, a month, 68 years, backwards)
            if isinstance(r[0], int):
                r[0] += (DAY_S, 30 * DAY_S, 68 * 365 * DAY_S, -3600, -DAY_S)[b % 5]
        elif kind == 2:
            del rows[a % len(rows)]
        elif kind == 3:
            rows.insert(b % (len(rows) + 1), list(r))
        elif kind == 4:  # an array loses or gains items
            col = 2 + b % (width - 2)
            if col < len(r) and isinstance(r[col], str) and r[col].startswith("["):
                items = json.loads(r[col]) if _is_json(r[col]) else []
                items = items[: (b >> 8) % 30] if b & 0x10000 else items + items[: (b >> 8) % 5]
                r[col] = json.dumps(items)
        else:  # a row longer or shorter than the header
            if b & 1:
                r.extend([NASTY_CELLS[(b >> 8) % len(NASTY_CELLS)]] * ((b >> 1) % 4))
            elif len(r) > 1:
                del r[1 + (b >> 1) % (len(r) - 1) :]
    return rows


def _is_json(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return False
    return True


def csv_bytes(header: Sequence[str], rows: list[list[object]], ops: Sequence[Op] = ()) -> bytes:
    import csv

    buf = io.StringIO()
    w = csv.writer(buf, delimiter=(",", ";", "\t")[ops[0][2] % 3] if ops and ops[0][0] % 7 == 6 else ",")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if c is None else c for c in r])
    return buf.getvalue().encode("utf-8", "surrogatepass")


def xlsx_bytes(header: Sequence[str], rows: list[list[object]], *, far_row: bool = False) -> bytes:
    """A workbook written by openpyxl; ``far_row`` adds a cell at row 1048576 (dimension A1:XFD1048576)."""
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(list(header))
    for r in rows:
        ws.append([_xlsx_cell(c) for c in r])
    if far_row:
        ws.cell(row=1048576, column=16384, value=" ")
    buf = io.BytesIO()
    wb.save(buf)
    data = buf.getvalue()
    if not any(_BIG in (r or []) for r in rows):
        return data
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for info in src.infolist():
            blob = src.read(info.filename)
            if info.filename.startswith("xl/worksheets/"):
                blob = blob.replace(b"<v>" + repr(_BIG).encode() + b"</v>", b"<v>" + b"9" * 400 + b"</v>")
            zf.writestr(info.filename, blob)
    return out.getvalue()


#: stands for a 400-digit number in a workbook (openpyxl cannot write one; the XML is edited after)
_BIG = 1.2345e300


def _xlsx_cell(c: object) -> object:
    if isinstance(c, str):
        return "".join(ch for ch in c if ch >= " " or ch in "\t\n")[:32000]
    if isinstance(c, float) and c != c:  # nan: openpyxl writes it as text NaN
        return "nan"
    if isinstance(c, int) and not isinstance(c, bool) and abs(c) > 2**63:
        return _BIG  # replaced by a 400-digit number in the XML: the reader gets a 400-digit int back
    return c


def rewrite_xlsx_part(data: bytes, ops: Sequence[Op]) -> bytes:
    """Byte-level edits inside the workbook's XML parts (cell types, row numbers, dimension, shared strings)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    parts = {i.filename: src.read(i.filename) for i in src.infolist()}
    edits = (
        (b' t="s"', b' t="n"'), (b' t="n"', b' t="d"'), (b"<v>", b"<v>1"), (b"<v>", b"<v>99999999999999999999"),
        (b'r="2"', b'r="1048576"'), (b'<dimension ref="', b'<dimension ref="A1:XFD1048576" x="'),
        (b"<row ", b'<row r="0" '), (b"<v>", b"<v>x"), (b' t="s"', b' t="e"'), (b'r="A', b'r="ZZZZ'),
        (b"<si>", b"<si><t>" + b"A" * 1000 + b"</t></si><si>"), (b' s="', b' s="999'),
    )  # fmt: skip
    for op, a, _b in ops:
        old, new = edits[op % len(edits)]
        for name in sorted(parts):
            if name.endswith(".xml") and old in parts[name]:
                chunks = parts[name].split(old)
                k = 1 + a % (len(chunks) - 1)
                parts[name] = old.join(chunks[:k]) + new + old.join(chunks[k:])
                break
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, blob in parts.items():
            zf.writestr(name, blob)
    return out.getvalue()


# -- zip ---------------------------------------------------------------------------------------

ZIP_NAMES = ("a.fit", "x-accelerometer_data.csv", "x-gyroscope_data.csv", "dir/b.fit", "../evil.fit", "/abs.fit",
             "C:evil.fit", "n\x00ul.fit", "a" * 300 + ".fit", "d/" + "b" * 250 + "/c.fit", "inner.zip", "dup.fit",
             "dup.fit", "f", "f/g.fit", "x.xlsx")  # fmt: skip


def zip_bytes(members: list[tuple[str, bytes]], ops: Sequence[Op]) -> bytes:
    """A zip of the members, then header-level damage (sizes, CRC, method, flags, offsets) from ``ops``."""
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore", UserWarning)  # duplicate names are on purpose
        for name, blob in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, blob)
    data = bytearray(out.getvalue())
    for op, a, b in ops:
        kind = op % 5
        sig = (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06")[a % 3]
        hits = [i for i in range(len(data) - 3) if data[i : i + 4] == sig]
        if not hits:
            continue
        at = hits[b % len(hits)]
        if kind == 0:  # a 4-byte size/CRC/offset field
            off = {b"PK\x03\x04": (14, 18, 22), b"PK\x01\x02": (16, 20, 24, 42), b"PK\x05\x06": (12, 16)}[sig]
            pos = at + off[(b >> 4) % len(off)]
            if pos + 4 <= len(data):
                struct.pack_into("<I", data, pos, (0, 1, 0xFFFFFFFF, b >> 8, 1 << 31)[(b >> 8) % 5])
        elif kind == 1:  # compression method / flags
            pos = at + (8 if sig == b"PK\x03\x04" else 10)
            if pos + 2 <= len(data):
                struct.pack_into("<H", data, pos, (0, 8, 12, 14, 99, 1)[(b >> 8) % 6])
        elif kind == 2:  # external attributes: symlink, fifo, dir
            if sig == b"PK\x01\x02" and at + 42 <= len(data):
                struct.pack_into("<I", data, at + 38, (0o120777 << 16, 0o010644 << 16, 0o040755 << 16)[b % 3])
        elif kind == 3:  # entry counts in the end record
            if sig == b"PK\x05\x06" and at + 12 <= len(data):
                struct.pack_into("<HH", data, at + 8, b & 0xFFFF, b & 0xFFFF)
        else:  # cut
            del data[max(4, len(data) - 1 - (b % 64)) :]
    return bytes(data)


# -- the invariant --------------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    windows: int
    error: str | None
    seconds: float


class InvariantBroken(AssertionError):
    pass


def check_input(paths: list[Path], *, max_archive_bytes: int = 50_000_000, max_seconds: float = 20.0) -> Outcome:
    """Decode and window ``paths`` as the agent does; fail unless it succeeds or raises a named InputError."""
    from har_edge.agent.decode import open_export
    from har_edge.agent.errors import InputError
    from har_edge.agent.preprocess import StreamWindower

    t0 = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="fuzz-scratch-"))
    windows = 0
    try:
        recordings = open_export(paths, scratch, max_archive_bytes=max_archive_bytes)
        for rec in recordings:
            sw = StreamWindower(
                rate_hz=50, window=200, step=100, has_gyro=rec.has_gyro, accel_unit=rec.accel_unit, name=rec.name
            )
            for chunk in rec.chunks():
                windows += len(sw.feed(chunk))
            windows += len(sw.finish())
            sw.quality()
        return Outcome(True, windows, None, _bounded_time(t0, max_seconds, paths))
    except InputError as e:
        msg = str(e)
        names = {p.name for p in paths}
        if not any(n in msg for n in names):
            raise InvariantBroken(f"{type(e).__name__} does not name the file {sorted(names)}: {msg!r}") from e
        if len(msg) > 2000:
            raise InvariantBroken(f"message of {len(msg)} characters: {msg[:200]!r}...") from e
        return Outcome(False, windows, msg, _bounded_time(t0, max_seconds, paths))
    except Exception as e:  # the invariant: nothing but InputError escapes
        raise InvariantBroken(f"{type(e).__name__} escaped for {[p.name for p in paths]}: {e}") from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _bounded_time(t0: float, limit: float, paths: list[Path]) -> float:
    took = time.perf_counter() - t0
    if took > limit:
        raise InvariantBroken(f"{[p.name for p in paths]} took {took:.1f} s (limit {limit} s)")
    return took


def write_files(folder: Path, files: list[tuple[str, bytes]]) -> list[Path]:
    out = []
    for name, blob in files:
        p = folder / name
        p.write_bytes(blob)
        out.append(p)
    return out


def rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss), MB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - not Linux
        return rss_mb()

"""Garmin IMU samples exported as tables: study CSV/xlsx and FitCSVTool CSV.

Three layouts are accepted. In all of them a row is one FIT message
(``accelerometer_data``, mesg 165, or ``gyroscope_data``, mesg 164) holding
an array of samples, and the time of sample ``i`` is, in ms since the Unix epoch,
``timestamp + timestamp_ms + sample_time_offset[i]``.

1. **Study tables** (:func:`decode_study_tables`; the layout of the public
   MasterArbeit_MLops thesis): one file per sensor, CSV or xlsx, paired by the
   file-name prefix before ``accelerometer`` / ``gyroscope`` (see
   :func:`pair_key`). Columns (header row first, any order, extra columns
   ignored, names case-insensitive):
   ``timestamp``, ``timestamp_ms`` (optional, 0 when absent or empty),
   ``sample_time_offset`` (optional only if every row holds one sample) and
   ``calibrated_accel_x|y|z`` or ``calibrated_gyro_x|y|z``. A column name may
   carry a unit, ``calibrated_accel_x (g)`` or ``calibrated_accel_x[g]``, and a
   FitCSVTool message prefix, ``accelerometer_data.calibrated_accel_x[g]``
   (columns prefixed with another message are ignored), so FitCSVTool
   ``--data`` per-message files and ``field (units)`` exports are read here too.
   The first worksheet of an xlsx is read. CSV: UTF-8 (a BOM is fine), the
   delimiter is ``,``, ``;`` or tab (whichever the header line has most of).
2. **FitCSVTool row layout** (:func:`decode_fitcsv`; ``java -jar FitCSVTool.jar
   -b in.fit out.csv``): header ``Type,Local Number,Message,Field 1,Value 1,
   Units 1,...``; ``Definition`` rows and messages other than the two above are
   skipped; in ``Data`` rows the fields are read by name from the
   (Field N, Value N, Units N) triples.
3. **FitCSVTool ``--data`` layout with both messages in one file**
   (:func:`decode_fitcsv`): header columns ``<message>.<field>[<units>]`` for
   both ``accelerometer_data`` and ``gyroscope_data``; a row belongs to the
   message whose columns it fills.

Cells:

* arrays: ``["0","10","20"]`` or ``[0, 10, 20]`` (JSON-like, items optionally
  quoted), ``0|10|20`` (FitCSVTool), ``0, 10, 20``, or one bare number. They are
  validated by a strict grammar and never evaluated. ``nan`` items are allowed
  in the sensor arrays (FIT invalid values): those samples are dropped and
  counted in ``meta["dropped_samples"]``. Arrays of one row must have equal
  lengths. A row whose arrays are all empty is skipped.
* ``timestamp``: a date string, UTC unless it carries an offset —
  ``03/24/2025, 07:52:19 AM`` (12 h or 24 h, comma optional) or ISO 8601
  (``2025-03-24T07:52:19Z``, FitCSVTool ``-iso8601``), or an xlsx date cell —
  or a number of seconds. Numbers are **FIT seconds** (since
  1989-12-31T00:00:00Z), never nanoseconds. The base is decided on a file's
  first numeric timestamp: FIT seconds unless that would put it in the future
  while the same number read as Unix seconds is a date from 2000 to now, in
  which case the whole file is read as Unix seconds (logged, and
  ``meta["time_base"]`` says so; Unix seconds of 2000..2029 are FIT seconds of
  2020..2049, so until 2030 the two cannot be confused). Refused: values below
  0x10000000 (device system time since power-up, not a date: decode the .fit,
  whose ``timestamp_correlation`` maps it), values above 1e11 (milli/nano
  seconds) and negative ones.
* ``timestamp_ms`` and ``sample_time_offset``: milliseconds, rounded to whole ms.

Units are left as written (``accel_unit=None``): preprocessing detects milli-g
from the magnitude (the study's and real devices' values are milli-g even where
FitCSVTool's units column says g). Stated units are kept in ``meta``.

Not accepted (a clear error says so): raw-count-only exports (``accel_x``
without ``calibrated_accel_x``: give the .fit), Health SDK ``hsa_*`` messages,
tables holding both sensors in one row, .xls and password-protected workbooks.

Memory: rows are streamed; each sensor is parsed into compact arrays and handed
out in chunks of :data:`CHUNK_SAMPLES` samples (a one-hour 100 Hz file is one
chunk of ~7 MB per sensor). Rows may be out of time order within a chunk
(preprocessing sorts it); across chunks, times must increase as Garmin writes
them. An xlsx is read with openpyxl in read-only mode after its zip container
passed :func:`har_edge.agent.decode.archive.inspect_zip` (its shared-strings table is
held in memory: tens of MB for an hour).

Errors are :class:`~har_edge.agent.errors.UnknownFormat` (not one of these tables),
:class:`~har_edge.agent.errors.InputError` (a missing column, a malformed cell: the
message names the file, row and column), :class:`~har_edge.agent.errors.NoImuData`
(no accelerometer rows) and :class:`~har_edge.agent.errors.CorruptFile` (unreadable
workbook or bytes); nothing else escapes on bad input.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from har_edge.agent.decode.archive import inspect_zip
from har_edge.agent.decode.types import FIT_EPOCH_S, Chunk, Recording, SensorBlock
from har_edge.agent.errors import CorruptFile, HarEdgeError, InputError, NoImuData, TooLarge, UnknownFormat

log = logging.getLogger(__name__)

ACCEL = "accelerometer"
GYRO = "gyroscope"
SENSORS = (ACCEL, GYRO)
MESSAGE = {ACCEL: "accelerometer_data", GYRO: "gyroscope_data"}
AXES = {
    ACCEL: ("calibrated_accel_x", "calibrated_accel_y", "calibrated_accel_z"),
    GYRO: ("calibrated_gyro_x", "calibrated_gyro_y", "calibrated_gyro_z"),
}
_RAW_X = {ACCEL: "accel_x", GYRO: "gyro_x"}
_BY_MESSAGE = {m: s for s, m in MESSAGE.items()}

#: samples per sensor handed to preprocessing in one Chunk
CHUNK_SAMPLES = 1 << 19
#: samples parsed as text before being packed into arrays
_TOKEN_BATCH = 1 << 16
#: longest CSV line accepted (a row of ~30 samples is ~1 kB)
MAX_LINE_CHARS = 1 << 20
#: zip container limits for xlsx (an hour of study data is ~20 MB of XML)
XLSX_MAX_BYTES = 1 << 30
XLSX_MAX_RATIO = 200.0
#: bytes of xlsx parts held in memory while reading (shared strings, styles, workbook; sheets are streamed)
XLSX_HELD_MAX_BYTES = 32 << 20
#: widest row read from an xlsx (columns past the header's last name are ignored)
XLSX_MAX_COLUMNS = 1024
#: longest number accepted in a cell (characters), and the largest magnitudes
MAX_NUMBER_CHARS = 40
MAX_SECONDS_DIGITS = 20
MAX_MAGNITUDE = 1e15
MAX_SENSOR_VALUE = 1e9

XLSX_SUFFIXES = (".xlsx", ".xlsm")

_FIT_SYSTEM_TIME_MAX = 0x10000000
_UNIX_MIN_MS = 946_684_800_000  # 2000-01-01
_DAY_MS = 86_400_000
_OFFSET_MAX_MS = 1e7

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[nN][aA][nN]"
_ITEM = rf"\s*(?:\"(?:{_NUM})\"|'(?:{_NUM})'|(?:{_NUM}))\s*"
_LIST_RE = re.compile(rf"\[\s*\]|\[{_ITEM}(?:,{_ITEM})*\]|{_ITEM}(?:,{_ITEM})*|{_ITEM}(?:\|{_ITEM})*")
_FINITE_RE = re.compile(r"\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*")
_HEADER_RE = re.compile(
    r"^(?:(?P<msg>[a-z][a-z0-9_]*)\.)?(?P<field>[a-z][a-z0-9_]*)\s*(?:\[(?P<u1>[^\]]*)\]|\((?P<u2>[^)]*)\))?$"
)
_KEY_RE = re.compile(r"accelerometer|gyroscope", re.IGNORECASE)
_DATE_FORMATS = ("%m/%d/%Y, %I:%M:%S %p", "%m/%d/%Y %I:%M:%S %p", "%m/%d/%Y, %H:%M:%S", "%m/%d/%Y %H:%M:%S")
_ROW_LAYOUT_HEAD = ("type", "local number", "message")
_TIME_FIELDS = ("timestamp_ms", "sample_time_offset")


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- file names -----------------------------------------------------------------


def pair_key(path: Path | str) -> tuple[str, str] | None:
    """``(prefix, "accelerometer"|"gyroscope")`` from a file name, or None.

    The keyword is matched case-insensitively in the file name (not the folder);
    the prefix is what comes before it, lower-cased, with trailing ``-_. ``
    removed: ``2025-03-23-15-23-10-accelerometer_data.csv`` ->
    ``("2025-03-23-15-23-10", "accelerometer")``. A name holding both keywords
    or neither gives None.
    """
    name = Path(path).name
    matches = list(_KEY_RE.finditer(name))
    if not matches or len({m.group(0).lower() for m in matches}) != 1:
        return None
    m = matches[0]
    return name[: m.start()].rstrip(" -_.").lower(), m.group(0).lower()


def pair_tables(paths: Iterable[Path]) -> list[tuple[Path, Path | None]]:
    """Pair accelerometer and gyroscope files of one folder by :func:`pair_key`.

    Returns ``(accel, gyro or None)`` for every accelerometer file, sorted. Within
    a prefix, files whose names agree after the keyword pair first
    (``x-accelerometer_data.csv`` with ``x-gyroscope_data.csv``), then a lone
    accelerometer file takes a lone gyroscope file. Gyroscope files left without
    a partner are logged and left out (they cannot be used alone).
    """
    groups: dict[tuple[Path, str], dict[str, list[Path]]] = {}
    for p in map(Path, paths):
        key = pair_key(p)
        if key is None:
            continue
        groups.setdefault((p.parent, key[0]), {ACCEL: [], GYRO: []})[key[1]].append(p)

    def tail(p: Path) -> str:
        m = _KEY_RE.search(p.name)
        return p.name[m.end() :].lower() if m else ""

    out: list[tuple[Path, Path | None]] = []
    for (_parent, prefix), g in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        accels, gyros = sorted(g[ACCEL]), sorted(g[GYRO])
        pairs: dict[Path, Path | None] = {a: None for a in accels}
        for a in accels:
            same = [y for y in gyros if tail(y) == tail(a)]
            if len(same) == 1:
                pairs[a] = same[0]
                gyros.remove(same[0])
        lone = [a for a in accels if pairs[a] is None]
        if len(lone) == 1 and len(gyros) == 1:
            pairs[lone[0]] = gyros.pop()
        for y in gyros:
            log.warning("%s: gyroscope file without an accelerometer file of prefix %r: skipped", y.name, prefix)
        out.extend(pairs.items())
    return out


# -- opening tables -------------------------------------------------------------


def _container(path: Path) -> str:
    """``"xlsx"`` or ``"csv"`` by the first bytes (and the suffix), else UnknownFormat."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise InputError(f"{path.name}: cannot read ({e})") from e
    if head.startswith(b"PK\x03\x04"):
        return "xlsx"
    if head.startswith(b"\xd0\xcf\x11\xe0"):
        raise UnknownFormat(
            f"{path.name}: an old .xls or a password-protected workbook: save it as .xlsx without a password, "
            "or export CSV"
        )
    if len(head) >= 12 and head[8:12] == b".FIT":
        raise UnknownFormat(f"{path.name}: a binary FIT file, not a table: decode it as FIT")
    if b"\x00" in head:
        raise UnknownFormat(f"{path.name}: binary data, not a CSV or xlsx table")
    if path.suffix.lower() in XLSX_SUFFIXES:
        raise CorruptFile(f"{path.name}: named .xlsx but not a zip container: the workbook is damaged")
    return "csv"


def _bounded_lines(f: TextIO, path: Path) -> Iterator[str]:
    lineno = 0
    while True:
        line = f.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        lineno += 1
        if len(line) > MAX_LINE_CHARS:
            raise InputError(
                f"{path.name}: line {lineno} is longer than {MAX_LINE_CHARS} characters: not a Garmin table"
            )
        yield line


def _delimiter(header_line: str) -> str:
    counts = {d: header_line.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


@dataclass
class _Table:
    path: Path
    kind: str  # "csv" | "xlsx"
    header: list[str]
    rows: Iterator[tuple[int, Sequence[object]]]  # (row number as a spreadsheet shows it, cells)


@contextmanager
def _open_table(path: Path) -> Iterator[_Table]:
    """Open a CSV or xlsx table: header plus a row iterator (errors wrapped)."""
    kind = _container(path)
    if kind == "csv":
        with _open_csv(path) as t:
            yield t
    else:
        with _open_xlsx(path) as t:
            yield t


@contextmanager
def _open_csv(path: Path) -> Iterator[_Table]:
    try:
        f = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise InputError(f"{path.name}: cannot read ({e})") from e
    with f:
        lines = _bounded_lines(f, path)

        def guarded(it: Iterator[str]) -> Iterator[str]:
            try:
                yield from it
            except UnicodeDecodeError as e:
                raise UnknownFormat(f"{path.name}: not UTF-8 text ({e}): not a Garmin CSV export") from e

        lines = guarded(lines)
        first = next(lines, "")
        delim = _delimiter(first)
        reader = csv.reader(_chain_first(first, lines), delimiter=delim)

        def rows() -> Iterator[tuple[int, Sequence[object]]]:
            try:
                for cells in reader:
                    yield reader.line_num, cells
            except csv.Error as e:
                raise InputError(f"{path.name}: line {reader.line_num}: malformed CSV ({e})") from e

        it = rows()
        head = next(it, None)
        header = [str(c).strip() for c in head[1]] if head else []
        yield _Table(path, "csv", header, it)


def _chain_first(first: str, rest: Iterator[str]) -> Iterator[str]:
    if first:
        yield first
    yield from rest


def _held_bytes(infos: Sequence[object]) -> int:
    """Uncompressed bytes of the xlsx parts openpyxl holds in memory (all but the streamed worksheets)."""
    total = 0
    for info in infos:
        name = getattr(info, "filename", "").lower()
        if name.endswith((".xml", ".rels")) and not name.startswith("xl/worksheets/"):
            total += int(getattr(info, "file_size", 0))
    return total


@contextmanager
def _open_xlsx(path: Path) -> Iterator[_Table]:
    """Open the first worksheet of an xlsx with bounded memory.

    The zip container must pass :func:`inspect_zip` at :data:`XLSX_MAX_RATIO`; the
    parts held in memory (shared strings above all) must fit
    :data:`XLSX_HELD_MAX_BYTES`. Rows are read straight from the sheet's XML: rows
    the sheet does not hold are never produced (a stray cell at row 1048576 costs
    one row, not a million), and a row is at most as wide as the header
    (:data:`XLSX_MAX_COLUMNS` for the header itself).
    """
    infos = inspect_zip(path, max_bytes=XLSX_MAX_BYTES, max_files=10_000, max_ratio=XLSX_MAX_RATIO)
    held = _held_bytes(infos)
    if held > XLSX_HELD_MAX_BYTES:
        raise TooLarge(
            f"{path.name}: the workbook's shared strings and other parts read into memory take {held / 1e6:.0f} MB, "
            f"over the limit of {XLSX_HELD_MAX_BYTES / 1e6:.0f} MB (about two hours of study data): export CSV instead "
            "(CSV is streamed and has no such limit)"
        )
    try:
        import openpyxl
        from openpyxl.worksheet._reader import WorkSheetParser
    except ImportError as e:  # pragma: no cover - openpyxl is a dependency of the edge extra
        raise UnknownFormat(f"{path.name}: reading xlsx needs openpyxl (pip install openpyxl)") from e

    def wrap(e: Exception, row: int | None = None) -> CorruptFile:
        where = f"{path.name}: row {row}" if row else path.name
        return CorruptFile(
            f"{where}: cannot read the workbook ({type(e).__name__} from openpyxl: {_snippet(str(e))}): "
            "it is damaged or not written by a spreadsheet program; open and save it again as .xlsx, or export CSV"
        )

    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except HarEdgeError:
        raise
    except Exception as e:  # openpyxl raises many kinds on damaged workbooks
        raise wrap(e) from e
    try:
        if not wb.worksheets:
            raise UnknownFormat(f"{path.name}: the workbook has no worksheet: save the data on the first sheet")
        ws = wb.worksheets[0]
        width = [XLSX_MAX_COLUMNS]

        def rows() -> Iterator[tuple[int, Sequence[object]]]:
            idx = None
            try:
                with ws._get_source() as src:
                    parser = WorkSheetParser(
                        src,
                        ws._shared_strings,
                        data_only=True,
                        epoch=wb.epoch,
                        date_formats=wb._date_formats,
                        timedelta_formats=wb._timedelta_formats,
                    )
                    for idx, cells in parser.parse():
                        out: list[object] = [None] * min(
                            width[0], max((c["column"] for c in cells if c["column"]), default=0)
                        )
                        for c in cells:
                            col = c["column"]
                            if col and col <= len(out):
                                out[col - 1] = c["value"]
                        yield idx, out
            except HarEdgeError:
                raise
            except Exception as e:
                raise wrap(e, idx + 1 if isinstance(idx, int) else None) from e

        it = rows()
        head = next(it, None)
        header = ["" if c is None else str(c).strip() for c in head[1]] if head else []
        width[0] = max(len(header), 1)
        yield _Table(path, "xlsx", header, it)
    finally:
        try:
            wb.close()
        except Exception:  # closing a damaged workbook must not hide the real error
            log.debug("%s: closing the workbook failed", path.name, exc_info=True)


# -- headers --------------------------------------------------------------------


def _norm_header(header: Sequence[str]) -> list[tuple[str | None, str, str | None] | None]:
    """``(message or None, field, unit or None)`` per column; None for names that are no field."""
    out: list[tuple[str | None, str, str | None] | None] = []
    for h in header:
        m = _HEADER_RE.match(str(h).strip().lower())
        if not m:
            out.append(None)
            continue
        unit = m.group("u1") if m.group("u1") is not None else m.group("u2")
        out.append((m.group("msg"), m.group("field"), unit.strip() if unit is not None else None))
    return out


def _is_row_layout(header: Sequence[str]) -> bool:
    return tuple(h.strip().lower() for h in header[:3]) == _ROW_LAYOUT_HEAD


def _classify(header: Sequence[str]) -> str | None:
    """sniff result for a header row."""
    if _is_row_layout(header):
        return "fitcsv"
    cols = [c for c in _norm_header(header) if c is not None]
    msgs = {c[0] for c in cols if c[0] is not None}
    has = {s: any(c[1] in (AXES[s][0], _RAW_X[s]) for c in cols if c[0] in (None, MESSAGE[s])) for s in SENSORS}
    if MESSAGE[ACCEL] in msgs and MESSAGE[GYRO] in msgs:
        return "fitcsv"
    timed = any(c[1] in ("timestamp", "sample_time_offset") for c in cols)
    if not timed:
        return None
    if has[ACCEL] and not has[GYRO]:
        return "study_accel"
    if has[GYRO] and not has[ACCEL]:
        return "study_gyro"
    return None


def _read_header(path: Path) -> list[str]:
    with _open_table(path) as t:
        return t.header


def sniff_table(path: Path) -> str | None:
    """What table ``path`` is, from its header row only: ``"study_accel"``, ``"study_gyro"``,
    ``"fitcsv"`` or None (not a table this module reads). Never raises on bad input.

    ``study_*`` means one sensor per file and one message per row (study tables,
    FitCSVTool ``--data`` files of a single message, ``field (units)`` exports):
    decode it with :func:`decode_study_tables`, paired by :func:`pair_key`.
    ``fitcsv`` is a FitCSVTool file holding both messages (or the ``-b`` row
    layout): decode it alone with :func:`decode_fitcsv`.
    """
    path = Path(path)
    try:
        return _classify(_read_header(path))
    except (HarEdgeError, OSError) as e:
        log.debug("%s: not a known table: %s", path.name, e)
        return None


def _found(header: Sequence[str]) -> str:
    names = [h for h in header if h]
    text = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return text or "no columns"


@dataclass(frozen=True)
class _Cols:
    """Column indexes of one sensor in a one-message-per-row table."""

    ts: int
    ms: int | None
    off: int | None
    xyz: tuple[int, int, int]
    unit: str | None
    prefixed: bool  # FitCSVTool message.field names


def _find_cols(path: Path, header: Sequence[str], sensor: str) -> _Cols:
    msg = MESSAGE[sensor]
    idx: dict[str, int] = {}
    units: dict[str, str | None] = {}
    prefixed = False
    for i, c in enumerate(_norm_header(header)):
        if c is None or (c[0] is not None and c[0] != msg):
            continue
        prefixed = prefixed or c[0] is not None
        if c[1] not in idx:
            idx[c[1]] = i
            units[c[1]] = c[2]
    axes = AXES[sensor]
    missing = [c for c in ("timestamp", *axes) if c not in idx]
    if missing:
        other = GYRO if sensor == ACCEL else ACCEL
        if all(a not in idx for a in axes) and any(a in idx for a in AXES[other]):
            hint = f"it holds {other} columns ({AXES[other][0]}...): pass it as the {other} file"
        elif all(a not in idx for a in axes) and _RAW_X[sensor] in idx:
            hint = (
                f"it holds raw {_RAW_X[sensor]} counts only: export the calibrated values ({axes[0]}) or give "
                "the .fit file (raw counts need its three_d_sensor_calibration message)"
            )
        else:
            hint = f"export the {msg} message with calibrated values"
        raise InputError(
            f"{path.name}: column{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing "
            f"(found: {_found(header)}): {hint}"
        )
    return _Cols(
        ts=idx["timestamp"],
        ms=idx.get("timestamp_ms"),
        off=idx.get("sample_time_offset"),
        xyz=(idx[axes[0]], idx[axes[1]], idx[axes[2]]),
        unit=units[axes[0]],
        prefixed=prefixed,
    )


# -- cells ----------------------------------------------------------------------


def _blank(v: object) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _list_text(value: object) -> tuple[str, int]:
    """An array cell as ``"a,b,c"`` plus its item count (``("", 0)`` when empty); ValueError if malformed."""
    if value is None:
        return "", 0
    if isinstance(value, bool):
        raise ValueError("a boolean, not a number")
    if isinstance(value, (int, float)):
        return repr(_bounded(value)), 1
    if not isinstance(value, str):
        raise ValueError(f"a {type(value).__name__}, not a list of numbers")
    s = value.strip()
    if not s:
        return "", 0
    if not _LIST_RE.fullmatch(s):
        raise ValueError("not a list of numbers")
    if s[0] == "[":
        s = s[1:-1]
    s = s.replace('"', "").replace("'", "").replace("|", ",")
    if not s.strip():
        return "", 0
    return s, s.count(",") + 1


def parse_list_cell(value: object) -> list[str]:
    """The numbers of an array cell as strings (``nan`` allowed); ValueError if malformed.

    Accepts ``["0","10"]``, ``[0, 10]``, ``['0', '10']``, ``0|10``, ``0, 10``, one
    number, ``[]`` and an empty cell (no items). Numbers stored as numbers
    (xlsx) are one item. Validated by a strict grammar; never evaluated.
    """
    text, n = _list_text(value)
    return [t.strip() for t in text.split(",")] if n else []


def _numbers(cells: list[str], total: int) -> np.ndarray | None:
    """Validated ``"a,b"`` texts -> float64 array of ``total`` items (None if the count disagrees)."""
    if total == 0:
        return np.empty(0, np.float64)
    out = np.fromstring(",".join(cells), dtype=np.float64, sep=",")
    return out if len(out) == total else None


def _bounded(value: int | float | str) -> float:
    """``float(value)`` for a number of at most MAX_NUMBER_CHARS characters and magnitude MAX_MAGNITUDE.

    ValueError otherwise (never OverflowError: xlsx cells may hold 400-digit integers).
    """
    if isinstance(value, str):
        if len(value.strip()) > MAX_NUMBER_CHARS:
            raise ValueError(f"a number of more than {MAX_NUMBER_CHARS} characters")
    elif isinstance(value, int) and abs(value) > MAX_MAGNITUDE:
        raise ValueError(f"a number beyond ±{MAX_MAGNITUDE:.0e}")
    try:
        v = float(value)
    except (OverflowError, ValueError):
        raise ValueError("not a usable number") from None
    if not math.isfinite(v):
        raise ValueError("not a finite number")
    if abs(v) > MAX_MAGNITUDE:
        raise ValueError(f"a number beyond ±{MAX_MAGNITUDE:.0e}")
    return v


def _scalar(value: object) -> float | None:
    """A finite, bounded number from a cell, None if empty; ValueError otherwise."""
    if _blank(value):
        return None
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, (int, float)) or (isinstance(value, str) and _FINITE_RE.fullmatch(value)):
        return _bounded(value)
    raise ValueError("not a number")


def _snippet(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


class _Clock:
    """Turns timestamp cells of one file into ms since the Unix epoch (see the module docstring)."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        self.base: str | None = None  # "fit" | "unix" for numeric timestamps
        self.now_ms = _now_ms()
        self._last: tuple[object, int] | None = None

    def ms(self, value: object, where: str) -> int:
        if self._last is not None and self._last[0] == value:
            return self._last[1]
        out = self._convert(value, where)
        self._last = (value, out)
        return out

    def _convert(self, value: object, where: str) -> int:
        if isinstance(value, datetime):
            return _datetime_ms(value, where)
        if isinstance(value, bool):
            raise InputError(f"{where}: timestamp {_snippet(value)} is not a time")
        if isinstance(value, (int, float)) or (isinstance(value, str) and _FINITE_RE.fullmatch(value)):
            return self._seconds(value, where)
        if isinstance(value, str):
            return self._date(value.strip(), where)
        raise InputError(f"{where}: timestamp {_snippet(value)} is not a time")

    def _date(self, s: str, where: str) -> int:
        if len(s) <= 64:
            for fmt in _DATE_FORMATS:
                try:
                    return _datetime_ms(datetime.strptime(s, fmt), where)
                except ValueError:
                    pass
            iso = s[:-1] + "+00:00" if s.endswith(("Z", "z")) else s
            try:
                return _datetime_ms(datetime.fromisoformat(iso), where)
            except ValueError:
                pass
        raise InputError(
            f"{where}: timestamp {_snippet(s)} is neither a date (like '03/24/2025, 07:52:19 AM' or ISO 8601) "
            "nor FIT seconds"
        )

    def _seconds(self, value: object, where: str) -> int:
        text = value.strip() if isinstance(value, str) else None
        if text is not None and re.fullmatch(r"[+-]?\d+", text) and len(text.lstrip("+-")) <= MAX_SECONDS_DIGITS:
            sec_ms = int(text) * 1000
        elif isinstance(value, int) and abs(value) < 10**MAX_SECONDS_DIGITS:
            sec_ms = value * 1000
        else:
            try:
                v = _bounded(value)  # type: ignore[arg-type]  # validated numeric above
            except ValueError as e:
                raise InputError(
                    f"{where}: timestamp {_snippet(value)} is {e}, not a usable number of seconds: "
                    "Garmin tables hold FIT seconds (since 1989-12-31) or dates"
                ) from None
            sec_ms = round(v * 1000)
        if sec_ms < 0:
            raise InputError(f"{where}: timestamp {_snippet(value)} is negative")
        if sec_ms >= 100_000_000_000_000:  # 1e11 s
            raise InputError(
                f"{where}: timestamp {_snippet(value)} is far too large for seconds: it looks like milli- or "
                "nanoseconds; Garmin tables hold FIT seconds (since 1989-12-31)"
            )
        if self.base is None:
            self.base = self._decide(sec_ms, value, where)
            self.meta["time_base"] = "fit_s" if self.base == "fit" else "unix_s"
        if self.base == "unix":
            return sec_ms
        if sec_ms < _FIT_SYSTEM_TIME_MAX * 1000:
            raise InputError(
                f"{where}: timestamp {_snippet(value)} is below 0x10000000: device system time (seconds since "
                "power-up), not a date: decode the .fit file, whose timestamp_correlation message maps it"
            )
        return sec_ms + FIT_EPOCH_S * 1000

    def _decide(self, sec_ms: int, value: object, where: str) -> str:
        if sec_ms < _FIT_SYSTEM_TIME_MAX * 1000:
            return "fit"  # refused with the system-time message by the caller
        limit = self.now_ms + _DAY_MS
        if sec_ms + FIT_EPOCH_S * 1000 <= limit:
            return "fit"
        if _UNIX_MIN_MS <= sec_ms <= limit:
            log.warning(
                "%s: timestamp %s as FIT seconds would be in the future; reading the file's timestamps as Unix seconds",
                self.path.name,
                value,
            )
            return "unix"
        raise InputError(
            f"{where}: timestamp {_snippet(value)} is in the future both as FIT seconds and as Unix seconds"
        )


def _datetime_ms(d: datetime, where: str = "") -> int:
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    try:
        return round(d.timestamp() * 1000)
    except (OverflowError, OSError, ValueError):
        raise InputError(f"{where}: timestamp {d.isoformat()} is out of range: give dates of the recording") from None


# -- rows -> samples ----------------------------------------------------------------


@dataclass
class _Stats:
    rows: int = 0
    samples: int = 0
    dropped: int = 0
    empty_rows: int = 0


class _Builder:
    """Parsed rows of one sensor, packed into compact arrays and handed out as SensorBlocks."""

    def __init__(self, path: Path, sensor: str, clock: _Clock) -> None:
        self.path = path
        self.sensor = sensor
        self.clock = clock
        self.stats = _Stats()
        self._blocks: list[SensorBlock] = []
        self._packed = 0
        self._reset_tokens()

    def _reset_tokens(self) -> None:
        self._where: list[str] = []
        self._counts: list[int] = []
        self._base: list[int] = []
        self._off: list[str] = []
        self._xyz: tuple[list[str], list[str], list[str]] = ([], [], [])
        self._n = 0

    def pending(self) -> int:
        return self._packed + self._n

    def add(self, where: str, ts: object, ms: object, off: object, x: object, y: object, z: object) -> None:
        """Add one message row; blank rows are ignored."""
        axes = AXES[self.sensor]
        cells = (x, y, z)
        if all(_blank(c) for c in cells) and _blank(ts) and _blank(off):
            return
        texts = []
        for name, cell in zip(axes, cells, strict=False):
            try:
                texts.append(_list_text(cell))
            except ValueError as e:
                raise InputError(
                    f'{where}: {name} cell {_snippet(cell)} is {e} (expected e.g. ["0","10"], [0, 10] or 0|10)'
                ) from None
        n = texts[0][1]
        if any(t[1] != n for t in texts):
            lens = ", ".join(f"{a} {t[1]}" for a, t in zip(axes, texts, strict=False))
            raise InputError(f"{where}: arrays of different lengths ({lens}): every array of a row must match")
        if n == 0:
            self.stats.empty_rows += 1
            return
        try:
            off_text, n_off = _list_text(off)
        except ValueError as e:
            raise InputError(f"{where}: sample_time_offset cell {_snippet(off)} is {e}") from None
        if n_off == 0:
            if n != 1:
                raise InputError(
                    f"{where}: sample_time_offset is missing or empty but the row holds {n} samples: "
                    "export the sample_time_offset field"
                )
            off_text, n_off = "0", 1
        if n_off != n:
            raise InputError(
                f"{where}: sample_time_offset has {n_off} values, {axes[0]} {n}: every array of a row must match"
            )
        if _blank(ts):
            raise InputError(f"{where}: timestamp is empty")
        base = self.clock.ms(ts, where)
        try:
            extra = _scalar(ms)
        except ValueError as e:
            raise InputError(
                f"{where}: timestamp_ms {_snippet(ms)} is {e}, not a number of milliseconds (0..999): "
                "fix or clear the cell"
            ) from None
        if extra is not None:
            if abs(extra) > _OFFSET_MAX_MS:
                raise InputError(f"{where}: timestamp_ms {_snippet(ms)} is out of range")
            base += round(extra)
        self._where.append(where)
        self._counts.append(n)
        self._base.append(base)
        self._off.append(off_text)
        for acc, (text, _n) in zip(self._xyz, texts, strict=False):
            acc.append(text)
        self._n += n
        self.stats.rows += 1
        if self._n >= _TOKEN_BATCH:
            self._pack()

    def _pack(self) -> None:
        if not self._n:
            return
        counts = np.asarray(self._counts, dtype=np.int64)
        off = _numbers(self._off, self._n)
        cols = [_numbers(c, self._n) for c in self._xyz]
        if off is None or any(c is None for c in cols):  # cannot happen for validated cells; be exact anyway
            raise InputError(f"{self._where[0]}: a list cell in this or the next rows could not be read")
        bad = ~np.isfinite(off) | (np.abs(off) > _OFFSET_MAX_MS)
        if bad.any():
            row = int(np.searchsorted(np.cumsum(counts), int(np.flatnonzero(bad)[0]), side="right"))
            raise InputError(f"{self._where[row]}: sample_time_offset holds an invalid value (nan or out of range)")
        t = np.repeat(np.asarray(self._base, dtype=np.int64), counts) + np.rint(off).astype(np.int64)
        xyz = np.column_stack([c for c in cols if c is not None])
        with np.errstate(over="ignore", invalid="ignore"):
            xyz[np.abs(xyz) > MAX_SENSOR_VALUE] = np.nan  # not a sensor reading: dropped like nan and inf
            xyz32 = xyz.astype(np.float32)
        ok = np.isfinite(xyz32).all(axis=1)
        if not ok.all():
            self.stats.dropped += int((~ok).sum())
            t, xyz32 = t[ok], xyz32[ok]
        self.stats.samples += len(t)
        self._blocks.append(SensorBlock(t, xyz32))
        self._packed += len(t)
        self._reset_tokens()

    def take(self) -> SensorBlock:
        self._pack()
        out = SensorBlock.concat(self._blocks)
        self._blocks = []
        self._packed = 0
        return out

    def report(self, meta: dict[str, Any]) -> None:
        s = self.stats
        meta.setdefault("rows", {})[self.sensor] = s.rows
        meta.setdefault("samples", {})[self.sensor] = s.samples
        if s.dropped:
            meta.setdefault("dropped_samples", {})[self.sensor] = s.dropped
            log.warning(
                "%s: %d %s samples with invalid (nan or out-of-range) values dropped",
                self.path.name,
                s.dropped,
                self.sensor,
            )


# -- study tables ---------------------------------------------------------------------


def _study_blocks(path: Path, sensor: str, meta: dict[str, Any], *, first_only: bool = False) -> Iterator[SensorBlock]:
    """SensorBlocks of one per-sensor table, CHUNK_SAMPLES at a time, in file order."""
    with _open_table(path) as t:
        cols = _find_cols(path, t.header, sensor)
        b = _Builder(path, sensor, _Clock(path, meta))
        width = max((cols.ts, cols.ms or 0, cols.off or 0, *cols.xyz)) + 1
        for n, cells in t.rows:
            if len(cells) < width:
                cells = list(cells) + [None] * (width - len(cells))
            b.add(
                f"{path.name}: row {n}",
                cells[cols.ts],
                cells[cols.ms] if cols.ms is not None else None,
                cells[cols.off] if cols.off is not None else None,
                *(cells[i] for i in cols.xyz),
            )
            if b.pending() >= (1 if first_only else CHUNK_SAMPLES):
                yield b.take()
                if first_only:
                    return
        if b.pending():
            yield b.take()
        b.report(meta)


def _probe_study(path: Path, sensor: str) -> tuple[_Cols, str, bool]:
    """Check a per-sensor table eagerly: columns, and its first data row parses. -> (cols, kind, has rows)."""
    with _open_table(path) as t:
        cols = _find_cols(path, t.header, sensor)
        kind = t.kind
    first = next(_study_blocks(path, sensor, {}, first_only=True), None)
    return cols, kind, first is not None and len(first) > 0


def _merge(accel: Iterator[SensorBlock], gyro: Iterator[SensorBlock] | None) -> Iterator[Chunk]:
    """Chunks of accel blocks with the gyro samples up to each block's last time."""
    if gyro is None:
        for a in accel:
            yield Chunk(a, None)
        return
    pend = SensorBlock.empty()
    gyro_done = False
    for a in accel:
        if not len(a):
            continue
        end = int(a.t_ms.max())
        # (bounded: an accelerometer time far ahead must not pull in the whole gyroscope file)
        while not gyro_done and (len(pend) == 0 or int(pend.t_ms.max()) <= end) and len(pend) < 2 * CHUNK_SAMPLES:
            g = next(gyro, None)
            if g is None:
                gyro_done = True
            else:
                pend = SensorBlock.concat([pend, g])
        now = pend.t_ms <= end
        yield Chunk(a, SensorBlock(pend.t_ms[now], pend.xyz[now]))
        pend = SensorBlock(pend.t_ms[~now], pend.xyz[~now])
    if len(pend):
        yield Chunk(SensorBlock.empty(), pend)
    if not gyro_done:
        for g in gyro:
            yield Chunk(SensorBlock.empty(), g)


def decode_study_tables(accel: Path, gyro: Path | None, name: str) -> Recording:
    """A Recording from a per-sensor accelerometer table and, optionally, its gyroscope partner.

    Columns and the first data row of each file are checked here (errors raise
    now); the rest is parsed lazily by ``chunks()``. ``has_gyro`` is False when
    no gyroscope file is given or it has no data rows.
    """
    accel = Path(accel)
    gyro = Path(gyro) if gyro is not None else None
    cols, kind, rows = _probe_study(accel, ACCEL)
    if not rows:
        raise NoImuData(f"{accel.name}: no accelerometer samples (only a header, or empty rows)")
    meta: dict[str, Any] = {
        "accel_file": str(accel),
        "gyro_file": str(gyro) if gyro is not None else None,
        "layout": "fitcsv_data" if cols.prefixed else "study",
        "stated_units": {ACCEL: cols.unit},
    }
    has_gyro = False
    if gyro is not None:
        gcols, _gkind, grows = _probe_study(gyro, GYRO)
        meta["stated_units"][GYRO] = gcols.unit
        has_gyro = grows
        if not grows:
            log.warning("%s: no gyroscope samples: the recording is used without gyroscope", gyro.name)
    fmt = "fitcsv" if cols.prefixed else ("study_xlsx" if kind == "xlsx" else "study_csv")

    def chunks() -> Iterator[Chunk]:
        a = _study_blocks(accel, ACCEL, meta)
        g = _study_blocks(gyro, GYRO, meta) if has_gyro and gyro is not None else None
        yield from _merge(a, g)

    log.info("%s: %s table%s", accel.name, fmt, f" + {gyro.name}" if has_gyro and gyro else " (no gyroscope)")
    return Recording(name=name, format=fmt, chunks=chunks, accel_unit=None, has_gyro=has_gyro, meta=meta)


# -- FitCSVTool -----------------------------------------------------------------------


def _row_layout_messages(cells: Sequence[object]) -> tuple[str | None, dict[str, tuple[object, str]]]:
    """Message name and {field: (value, units)} of a FitCSVTool -b Data row (message None otherwise)."""
    if len(cells) < 3 or str(cells[0]).strip() != "Data":
        return None, {}
    msg = str(cells[2]).strip()
    if msg not in _BY_MESSAGE and msg not in _WATCH_MESSAGES:
        return msg, {}
    fields: dict[str, tuple[object, str]] = {}
    for i in range(3, len(cells) - 1, 3):
        f = str(cells[i]).strip()
        if f and f not in fields:
            fields[f] = (cells[i + 1], str(cells[i + 2]).strip() if i + 2 < len(cells) else "")
    return msg, fields


_Message = tuple[str, str, tuple[object, ...]]  # (where, sensor, (ts, ms, off, x, y, z))

#: FitCSVTool messages naming the watch, and the fields of them kept in ``meta["device"]`` / ``meta["devices"]``
_WATCH_MESSAGES = ("file_id", "device_info")
_WATCH_FIELDS = {"manufacturer": "manufacturer", "product": "product", "garmin_product": "product_name",
                 "serial_number": "serial_number", "software_version": "software_version"}  # fmt: skip


def _watch_meta(msg: str, fields: dict[str, tuple[object, str]], meta: dict[str, Any]) -> None:
    """Keep the watch's manufacturer, product, serial and firmware of a file_id / device_info row."""
    found = {
        k: str(fields[f][0]).strip() for f, k in _WATCH_FIELDS.items() if f in fields and str(fields[f][0]).strip()
    }
    if not found:
        return
    if msg == "file_id":
        meta.setdefault("device", found)
    elif len(meta.setdefault("devices", [])) < 8:
        meta["devices"].append(found)


def _fitcsv_messages(
    path: Path, row_layout: bool, cols: dict[str, _Cols], others: set[str], meta: dict[str, Any] | None = None
) -> Iterator[_Message]:
    """The accelerometer and gyroscope message rows of a FitCSVTool CSV, fields checked.

    Names of other messages (-b layout) are added to ``others`` (at most 50); the watch's
    file_id and device_info fields to ``meta`` when given.
    """
    with _open_table(path) as t:
        for n, cells in t.rows:
            where = f"{path.name}: row {n}"
            if row_layout:
                msg, fields = _row_layout_messages(cells)
                sensor = _BY_MESSAGE.get(msg or "")
                if msg in _WATCH_MESSAGES and meta is not None:
                    _watch_meta(msg, fields, meta)
                if sensor is None:
                    if msg and len(others) < 50:
                        others.add(msg)
                    continue
                axes = AXES[sensor]
                missing = [a for a in ("timestamp", *axes) if a not in fields]
                if missing:
                    hint = (
                        "it holds raw counts only: give the .fit file (raw counts need three_d_sensor_calibration)"
                        if _RAW_X[sensor] in fields
                        else "export the message with calibrated values"
                    )
                    raise InputError(
                        f"{where}: {msg} message without {', '.join(missing)} "
                        f"(fields: {', '.join(list(fields)[:12])}): {hint}"
                    )
                values = [fields[f][0] if f in fields else None for f in ("timestamp", *_TIME_FIELDS, *axes)]
                yield where, sensor, (*values, fields[axes[0]][1] or None)
            else:
                for sensor, c in cols.items():
                    if all(_blank(_cell(cells, i)) for i in c.xyz):
                        continue
                    idx = (c.ts, c.ms, c.off, *c.xyz)
                    yield where, sensor, (*(_cell(cells, i) for i in idx), c.unit)


def _cell(cells: Sequence[object], i: int | None) -> object:
    return cells[i] if i is not None and i < len(cells) else None


def _scan_fitcsv(
    path: Path, row_layout: bool, cols: dict[str, _Cols], meta: dict[str, Any] | None = None
) -> tuple[set[str], set[str]]:
    """Which sensors have rows (the first accelerometer row is parsed, so a bad file fails now),
    and the names of other messages seen (the watch's messages before them go to ``meta``)."""
    present: set[str] = set()
    others: set[str] = set()
    probe = _Builder(path, ACCEL, _Clock(path, {}))
    for where, sensor, values in _fitcsv_messages(path, row_layout, cols, others, meta):
        if sensor == ACCEL and ACCEL not in present:
            probe.add(where, *values[:6])
            probe.take()
        present.add(sensor)
        if len(present) == 2:
            break
    return present, others


def _fitcsv_chunks(
    path: Path, row_layout: bool, cols: dict[str, _Cols], has_gyro: bool, meta: dict[str, Any]
) -> Iterator[Chunk]:
    clock = _Clock(path, meta)
    builders = {s: _Builder(path, s, clock) for s in SENSORS}
    units = meta.setdefault("stated_units", {})
    for where, sensor, values in _fitcsv_messages(path, row_layout, cols, set()):
        if sensor == GYRO and not has_gyro:
            continue
        units.setdefault(sensor, values[6])
        builders[sensor].add(where, *values[:6])
        if max(b.pending() for b in builders.values()) >= CHUNK_SAMPLES:
            g = builders[GYRO].take()
            yield Chunk(builders[ACCEL].take(), g if has_gyro else None)
    a, g = builders[ACCEL].take(), builders[GYRO].take()
    if len(a) or len(g):
        yield Chunk(a, g if has_gyro else None)
    builders[ACCEL].report(meta)
    if has_gyro:
        builders[GYRO].report(meta)


def decode_fitcsv(path: Path, name: str) -> Recording:
    """A Recording from a Garmin FitCSVTool CSV (the ``-b`` row layout, or ``--data`` columns).

    A ``--data`` file of the accelerometer message alone (or a per-sensor study
    table) is decoded without gyroscope; pair it with its gyroscope file through
    :func:`decode_study_tables` instead when there is one. The file is scanned
    once here (until both messages were seen) and parsed lazily by ``chunks()``.
    """
    path = Path(path)
    if _container(path) != "csv":
        raise UnknownFormat(f"{path.name}: not a FitCSVTool CSV (FitCSVTool writes CSV, not xlsx)")
    header = _read_header(path)
    kind = _classify(header)
    if kind == "study_gyro":
        raise NoImuData(f"{path.name}: holds gyroscope data only: give its accelerometer file too")
    if kind is None:
        raise UnknownFormat(
            f"{path.name}: not a FitCSVTool CSV (header: {_found(header)}): expected 'Type,Local Number,Message,...' "
            "from FitCSVTool -b, or accelerometer_data.* columns from --data"
        )
    if kind == "study_accel":
        return decode_study_tables(path, None, name)
    row_layout = _is_row_layout(header)
    cols = {} if row_layout else {s: _find_cols(path, header, s) for s in SENSORS}
    watch: dict[str, Any] = {}
    present, others = _scan_fitcsv(path, row_layout, cols, watch)
    if ACCEL not in present:
        hsa = sorted(m for m in others if m.startswith("hsa_"))
        hint = (
            f": {', '.join(hsa)} (Health SDK) is not read from CSV: give the .fit file"
            if hsa
            else ": the watch did not log the IMU (an ordinary activity has no accelerometer data)"
        )
        seen = f" (messages: {', '.join(sorted(others)[:12])})" if others else ""
        raise NoImuData(f"{path.name}: no accelerometer_data rows{seen}{hint}")
    has_gyro = GYRO in present
    meta: dict[str, Any] = {"layout": "fitcsv_rows" if row_layout else "fitcsv_data", "file": str(path), **watch}
    log.info("%s: FitCSVTool %s layout%s", path.name, meta["layout"], "" if has_gyro else " (no gyroscope)")
    return Recording(
        name=name,
        format="fitcsv",
        chunks=lambda: _fitcsv_chunks(path, row_layout, cols, has_gyro, meta),
        accel_unit=None,
        has_gyro=has_gyro,
        meta=meta,
    )


__all__ = [
    "CHUNK_SAMPLES",
    "decode_fitcsv",
    "decode_study_tables",
    "pair_key",
    "pair_tables",
    "parse_list_cell",
    "sniff_table",
]

"""Turn a dropped export into recordings: FIT, study CSV/xlsx pairs, FitCSVTool CSVs, zips of these.

The format is told from the bytes (FIT header, zip signature) and, for tables,
from the header row; the extension is only a hint. Every failure is an
:class:`agent.errors.InputError` whose message names the file and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from har_edge.agent.decode.types import Chunk, Recording, SensorBlock, named_in, prefixed
from har_edge.agent.errors import InputError, UnknownFormat

if TYPE_CHECKING:
    from har_edge.agent.decode.fit import Verified

log = logging.getLogger(__name__)

__all__ = ["Chunk", "Recording", "SensorBlock", "check_complete", "is_complete", "open_export", "pair_key", "sniff"]

TABLE_SUFFIXES = (".csv", ".xlsx", ".xlsm")


def _head(path: Path, n: int = 16) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def sniff(path: Path) -> str:
    """``fit``, ``zip``, ``table`` or ``unknown``, from the first bytes (and the header row of tables)."""
    head = _head(path)
    if len(head) >= 12 and head[8:12] == b".FIT":
        return "fit"
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        if path.suffix.lower() in (".xlsx", ".xlsm"):
            return "table"
        return "zip"
    if path.suffix.lower() in TABLE_SUFFIXES:
        return "table"
    return "unknown"


def pair_key(path: Path) -> tuple[str, str] | None:
    """(prefix, 'accelerometer'|'gyroscope') of a study table's name, or None."""
    from har_edge.agent.decode.tables import pair_key as _pair_key

    return _pair_key(path)


def is_complete(path: Path) -> bool:
    """True when the file's own structure says it is whole (FIT: header, size and CRC; zip: end record)."""
    return bool(check_complete(path))


def check_complete(path: Path) -> Verified | bool:
    """:func:`is_complete`, and for a whole FIT file the proof of its check (a truthy ``Verified``).

    Hand the proof to :func:`open_export` (``verified=``) to spare decoding a second CRC pass.
    """
    try:
        kind = sniff(path)
    except OSError:
        return False
    if kind == "fit":
        from har_edge.agent.decode.fit import fit_file_verified

        return fit_file_verified(path) or False
    if kind == "zip":
        import zipfile

        return zipfile.is_zipfile(path)
    return True


def _table_recordings(paths: list[Path], label: str) -> list[Recording]:
    from har_edge.agent.decode.tables import decode_fitcsv, decode_study_tables, pair_tables, sniff_table

    out: list[Recording] = []
    study: list[Path] = []
    for p in sorted(paths):
        kind = sniff_table(p)
        if kind == "fitcsv":
            out.append(decode_fitcsv(p, p.name))
        elif kind in ("study_accel", "study_gyro"):
            study.append(p)
        elif kind is None and len(paths) == 1:
            raise UnknownFormat(
                f"{p.name}: not a FIT file, zip or known IMU table (study accelerometer/gyroscope CSV/xlsx, "
                "FitCSVTool CSV): export the watch's original FIT file"
            )
    pairs = pair_tables(study)
    if study and not pairs:
        raise InputError(
            f"{study[0].name}: gyroscope table without its accelerometer partner "
            "(same prefix, 'accelerometer' in the name): drop both files of the recording together"
        )
    for accel, gyro in pairs:
        out.append(decode_study_tables(accel, gyro, accel.name if label == accel.name else f"{label}:{accel.name}"))
    return out


def open_export(
    paths: list[Path],
    scratch: Path,
    *,
    max_archive_bytes: int,
    name: str | None = None,
    verified: Iterable[Verified] = (),
) -> list[Recording]:
    """Recordings of one dropped export (one file, a table pair, or a zip), in the order found.

    ``scratch`` is an empty folder the caller removes afterwards (zips are extracted there).
    ``verified``: proofs from :func:`check_complete`; a FIT file one of them still names is not
    CRC-checked again.
    """
    verified = tuple(verified)
    name = name or paths[0].name
    recordings: list[Recording] = []
    tables: list[Path] = []
    for p in paths:
        kind = sniff(p)
        if kind == "fit":
            from har_edge.agent.decode.fit import decode_fit

            recordings.append(decode_fit(p, p.name, verified=verified))
        elif kind == "zip":
            from har_edge.agent.decode.archive import safe_extract

            members = safe_extract(p, scratch / p.name, max_bytes=max_archive_bytes)
            inner_fit = [m for m in members if m.is_file() and sniff(m) == "fit"]
            inner_tables = [m for m in members if m.is_file() and sniff(m) == "table"]
            from har_edge.agent.decode.fit import decode_fit

            try:  # errors of members name the zip first (also those raised while chunks are read)
                recordings.extend(named_in(decode_fit(m, f"{p.name}:{m.name}"), p.name) for m in sorted(inner_fit))
                if inner_tables:
                    recordings.extend(named_in(r, p.name) for r in _table_recordings(inner_tables, p.name))
            except InputError as e:
                raise prefixed(e, p.name) from e
            if not inner_fit and not inner_tables:
                raise UnknownFormat(
                    f"{p.name}: the zip holds no FIT file or IMU table "
                    f"({len(members)} other members): export the activity's original FIT file"
                )
        elif kind == "table":
            tables.append(p)
        else:
            raise UnknownFormat(
                f"{p.name}: not a FIT file, zip or IMU table (first bytes {_head(p, 8)!r}): "
                "drop Garmin FIT exports, Garmin Connect zips, or accelerometer/gyroscope CSV/xlsx"
            )
    if tables:
        recordings.extend(_table_recordings(tables, name))
    if not recordings:
        raise UnknownFormat(f"{name}: nothing to decode")
    return recordings

"""Safe extraction of zip archives (Garmin Connect "Export Original" and the like).

What :func:`safe_extract` accepts, and what it refuses with
:class:`~har_edge.agent.errors.UnsafeArchive` (naming the member and the reason):

* Members stored (method 0) or deflated (method 8), which is what Garmin
  Connect and every common zip tool write. Other methods (bzip2, LZMA,
  Deflate64, ...) are refused with :class:`~har_edge.agent.errors.InputError`: re-zip
  with ordinary compression.
* Member names are taken as POSIX paths (``\\`` is read as ``/``). Refused:
  absolute names (``/x``, ``C:x``, ``\\\\server\\x``), any ``..`` component,
  NUL characters, a name given twice, names whose local header disagrees with
  the central directory.
* Refused: symlinks and every other non-regular file type in the Unix mode
  bits of ``external_attr``; encrypted members; members whose data overlap
  another member's (the "overlapping files" zip bomb); more than ``max_files``
  entries (checked from the end record before the central directory is even
  parsed, then again per entry, nested archives included).
* Sizes: the declared uncompressed sizes must fit ``max_bytes`` in total, and
  the bytes actually inflated are counted while streaming (the headers are not
  trusted: a member inflating to more than it declares is refused, and so is
  an archive whose real output passes ``max_bytes``). A member whose output
  exceeds ``max_ratio`` times the compressed bytes read so far (past
  :data:`RATIO_FLOOR` bytes) is refused as a compression bomb. CRC-32 is
  checked; a mismatch or truncated data is :class:`~har_edge.agent.errors.CorruptFile`.
* Nested zips: a member whose name ends in ``.zip`` is extracted **once** into
  a folder named after it without the suffix (``a/b.zip`` -> ``a/b/...``),
  sharing the same byte and file budgets; the inner ``.zip`` itself is not
  returned. A ``.zip`` inside that one (depth 2) refuses the whole archive.
  (Garmin's account-wide export nests one level; nothing legitimate nests
  deeper.) Other zip-based files (``.xlsx``) are ordinary members.
* Directories are skipped (created as needed). Extraction is all-or-nothing:
  members go to a staging folder inside ``dest`` and are moved into place only
  when every member passed; on refusal nothing is left behind. A member whose
  target already exists in ``dest`` is refused (extract into a fresh folder).
  File modes from the archive are not applied.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from har_edge.agent.errors import CorruptFile, InputError, UnsafeArchive

log = logging.getLogger(__name__)

#: default refusal threshold for inflated / compressed bytes of one member
MAX_RATIO = 200.0
#: the ratio check starts only past this many output bytes (small files of zeros are fine)
RATIO_FLOOR = 1 << 20
#: nested archives: how many levels below the given zip are extracted
MAX_NESTING = 1

_READ = 1 << 16
_LOCAL_MAGIC = b"PK\x03\x04"
_EOCD_MAGIC = b"PK\x05\x06"
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # 30 bytes
_SUPPORTED = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
#: OSError numbers that come from a member's name or layout (an input problem), not from the disk
_MEMBER_ERRNOS = frozenset(
    {errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ELOOP}
)


def is_zip(path: Path) -> bool:
    """True if the file starts like a zip archive (local header or empty-archive record).

    Note that ``.xlsx`` workbooks are zips too: look at the suffix first.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (_LOCAL_MAGIC, _EOCD_MAGIC, b"PK\x07\x08")


@dataclass
class _Budget:
    max_bytes: int
    max_files: int
    max_ratio: float
    bytes_left: int
    files_left: int


def safe_extract(
    zip_path: Path,
    dest: Path,
    *,
    max_bytes: int,
    max_files: int = 1000,
    max_ratio: float = MAX_RATIO,
) -> list[Path]:
    """Extract the regular files of ``zip_path`` under ``dest``; return their paths in archive order.

    ``max_bytes`` bounds the total bytes written (nested archives included),
    ``max_files`` the number of entries. See the module docstring for every rule.
    """
    if max_bytes <= 0 or max_files <= 0:
        raise ValueError("max_bytes and max_files must be positive")
    zip_path, dest = Path(zip_path), Path(dest)
    budget = _Budget(max_bytes, max_files, max_ratio, max_bytes, max_files)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        rel_paths = _extract_into(zip_path, staging, PurePosixPath(), budget, depth=0, label=zip_path.name)
        out: list[Path] = []
        for rel in rel_paths:
            target = dest.joinpath(*rel.parts)
            if target.exists() or target.is_symlink():
                raise UnsafeArchive(
                    f"{zip_path.name}: member {rel.as_posix()!r} would overwrite a file already extracted there: "
                    "extract into an empty folder"
                )
        for rel in rel_paths:
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging.joinpath(*rel.parts), target)
            out.append(target)
        log.info("%s: extracted %d files (%d bytes)", zip_path.name, len(out), max_bytes - budget.bytes_left)
        return out
    except OSError as e:
        if e.errno in _MEMBER_ERRNOS:
            raise InputError(
                f"{zip_path.name}: a member cannot be written as a file ({e.strerror or type(e).__name__}): "
                "its name is too long, not valid here, or clashes with another member; "
                "rename the files and zip them again"
            ) from None
        # the disk or the folder, not the archive: propagate, so the file is retried rather than quarantined
        raise OSError(
            e.errno,
            f"{zip_path.name}: cannot extract: {e.strerror or e} (check free space and "
            "permissions of the agent's work folder)",
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def inspect_zip(
    zip_path: Path,
    *,
    max_bytes: int,
    max_files: int = 1000,
    max_ratio: float = MAX_RATIO,
    label: str | None = None,
) -> list[zipfile.ZipInfo]:
    """Check the central directory of a zip without extracting; return its entries.

    Applies every header rule of :func:`safe_extract` (names, types, encryption,
    overlap, counts, declared sizes and ratios). On its own this trusts the
    declared sizes, which is enough before handing the file to :mod:`zipfile`
    (it never inflates a member past its declared size); :func:`safe_extract`
    also counts the real bytes.
    """
    label = label or Path(zip_path).name
    _check_entry_count(Path(zip_path), max_files, label)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
        size = os.path.getsize(zip_path)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        EOFError,
        ValueError,
        OverflowError,
        NotImplementedError,
        struct.error,
    ) as e:
        raise CorruptFile(f"{label}: not a readable zip archive ({e}): download the export again") from e
    except OSError as e:
        raise InputError(f"{label}: cannot read ({e.strerror or e}): check the file and drop it again") from e
    _check_infos(infos, label, max_bytes=max_bytes, max_files=max_files, max_ratio=max_ratio, file_size=size)
    return infos


# -- internals ----------------------------------------------------------------


def _check_entry_count(zip_path: Path, max_files: int, label: str) -> None:
    """Refuse archives announcing too many entries before zipfile parses them all."""
    try:
        with open(zip_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - (65535 + 22)))
            tail = f.read()
    except OSError as e:
        raise InputError(f"{label}: cannot read ({e.strerror or e}): check the file and drop it again") from e
    at = tail.rfind(_EOCD_MAGIC)
    if at < 0 or len(tail) - at < 22:
        return  # zipfile will call it corrupt
    entries = struct.unpack_from("<H", tail, at + 10)[0]
    if entries != 0xFFFF and entries > max_files:
        raise UnsafeArchive(f"{label}: holds {entries} entries, more than the limit of {max_files}: refused")


def _member_path(name: str, label: str) -> PurePosixPath | None:
    """The safe relative path of a member name; None for a directory entry."""
    norm = name.replace("\\", "/")
    if "\x00" in norm:
        raise UnsafeArchive(f"{label}: member {name!r}: NUL character in the name: refused")
    if norm.startswith("/") or (len(norm) >= 2 and norm[1] == ":"):
        raise UnsafeArchive(f"{label}: member {name!r}: absolute path: refused")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"{label}: member {name!r}: '..' in the path (zip slip): refused")
    if not parts or norm.endswith("/"):
        return None
    return PurePosixPath(*parts)


def _check_infos(
    infos: list[zipfile.ZipInfo],
    label: str,
    *,
    max_bytes: int,
    max_files: int,
    max_ratio: float,
    file_size: int | None,
) -> None:
    if len(infos) > max_files:
        raise UnsafeArchive(f"{label}: holds {len(infos)} entries, more than the limit of {max_files}: refused")
    seen: set[str] = set()
    declared = 0
    spans: list[tuple[int, int, str]] = []
    for info in infos:
        name = info.filename
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise UnsafeArchive(f"{label}: member {name!r}: symbolic link: refused")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchive(f"{label}: member {name!r}: special file (mode {oct(mode)}): refused")
        rel = _member_path(name, label)
        if rel is None or kind == stat.S_IFDIR:
            continue
        if info.flag_bits & 0x1:
            raise UnsafeArchive(f"{label}: member {name!r}: encrypted: refused (export without a password)")
        key = rel.as_posix()
        if key in seen:
            raise UnsafeArchive(f"{label}: member {name!r}: the name appears twice: refused")
        seen.add(key)
        declared += info.file_size
        if declared > max_bytes:
            raise UnsafeArchive(
                f"{label}: member {name!r}: declared size {info.file_size} bytes brings the archive to {declared}, "
                f"beyond the limit of {max_bytes}: refused"
            )
        if info.file_size > RATIO_FLOOR and info.file_size > max_ratio * max(info.compress_size, 1):
            raise UnsafeArchive(
                f"{label}: member {name!r}: compression ratio {info.file_size / max(info.compress_size, 1):.0f}:1 "
                f"above {max_ratio:.0f}:1 (compression bomb): refused"
            )
        if file_size is not None and info.header_offset + info.compress_size > file_size:
            raise CorruptFile(f"{label}: member {name!r} reaches past the end of the file: the archive is truncated")
        spans.append((info.header_offset, info.header_offset + _LOCAL_HEADER.size + info.compress_size, name))
    spans.sort()
    for (_a0, a1, an), (b0, _b1, bn) in itertools.pairwise(spans):
        if b0 < a1:
            raise UnsafeArchive(
                f"{label}: member {bn!r} overlaps member {an!r} (overlapping-entries zip bomb): refused"
            )


def _extract_into(
    zip_path: Path,
    root: Path,
    prefix: PurePosixPath,
    budget: _Budget,
    *,
    depth: int,
    label: str,
) -> list[PurePosixPath]:
    """Extract ``zip_path`` into ``root/prefix``; return paths relative to ``root``."""
    infos = inspect_zip(
        zip_path, max_bytes=budget.bytes_left, max_files=budget.files_left, max_ratio=budget.max_ratio, label=label
    )
    budget.files_left -= len(infos)
    out: list[PurePosixPath] = []
    try:
        f = open(zip_path, "rb")  # noqa: SIM115
    except OSError as e:
        raise InputError(f"{label}: cannot read ({e.strerror or e}): check the file and drop it again") from e
    with f:
        for info in infos:
            rel = _member_path(info.filename, label)
            if rel is None or stat.S_IFMT(info.external_attr >> 16) == stat.S_IFDIR:
                continue
            full = prefix / rel
            target = root.joinpath(*full.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.resolve().is_relative_to(root.resolve()):
                raise UnsafeArchive(f"{label}: member {info.filename!r}: resolves outside the destination: refused")
            nested = rel.suffix.lower() == ".zip"
            if nested and depth + 1 > MAX_NESTING:
                raise UnsafeArchive(
                    f"{label}: member {info.filename!r}: a zip nested more than {MAX_NESTING} level deep: refused"
                )
            _copy_member(f, info, target, budget, label)
            if nested:
                inner_prefix = full.with_suffix("")
                inner = _extract_into(
                    target, root, inner_prefix, budget, depth=depth + 1, label=f"{label}/{info.filename}"
                )
                target.unlink()
                out.extend(inner)
            else:
                out.append(full)
    return out


def _copy_member(f: BinaryIO, info: zipfile.ZipInfo, target: Path, budget: _Budget, label: str) -> None:
    """Stream one member's real bytes to ``target``, enforcing size, ratio and CRC."""
    name = info.filename
    method = _SUPPORTED.get(info.compress_type)
    if method is None:
        raise InputError(
            f"{label}: member {name!r}: compression method {info.compress_type} is not supported: "
            "re-zip with ordinary (deflate) compression"
        )
    f.seek(info.header_offset)
    head = f.read(_LOCAL_HEADER.size)
    if len(head) < _LOCAL_HEADER.size:
        raise CorruptFile(f"{label}: member {name!r}: local header truncated")
    fields = _LOCAL_HEADER.unpack(head)
    if fields[0] != _LOCAL_MAGIC:
        raise CorruptFile(f"{label}: member {name!r}: bad local header")
    name_len, extra_len = fields[-2], fields[-1]
    local_name = f.read(name_len).decode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace")
    if local_name != info.orig_filename:
        raise UnsafeArchive(f"{label}: member {name!r}: its local header names {local_name!r}: refused")
    f.seek(extra_len, os.SEEK_CUR)

    raw_left = info.compress_size
    raw_read = 0
    written = 0
    crc = 0
    inflater = zlib.decompressobj(-zlib.MAX_WBITS) if method == "deflate" else None

    def emit(data: bytes) -> None:
        nonlocal written, crc
        if not data:
            return
        written += len(data)
        if written > info.file_size:
            raise UnsafeArchive(
                f"{label}: member {name!r}: inflates past its declared size of {info.file_size} bytes "
                "(lying header): refused"
            )
        if len(data) > budget.bytes_left:
            raise UnsafeArchive(
                f"{label}: member {name!r}: uncompressed data passes the limit of {budget.max_bytes} bytes: refused"
            )
        if written > RATIO_FLOOR and written > budget.max_ratio * max(raw_read, 1):
            raise UnsafeArchive(
                f"{label}: member {name!r}: compression ratio above {budget.max_ratio:.0f}:1 "
                "(compression bomb): refused"
            )
        budget.bytes_left -= len(data)
        crc = zlib.crc32(data, crc)
        out.write(data)

    try:
        with open(target, "xb") as out:
            if inflater is None:
                while raw_left > 0:
                    block = f.read(min(_READ, raw_left))
                    if not block:
                        raise CorruptFile(f"{label}: member {name!r}: data truncated")
                    raw_left -= len(block)
                    raw_read += len(block)
                    emit(block)
            else:
                while not inflater.eof:
                    data = inflater.unconsumed_tail
                    if not data:
                        if raw_left <= 0:
                            raise CorruptFile(f"{label}: member {name!r}: compressed data truncated")
                        data = f.read(min(_READ, raw_left))
                        if not data:
                            raise CorruptFile(f"{label}: member {name!r}: compressed data truncated")
                        raw_left -= len(data)
                        raw_read += len(data)
                    emit(inflater.decompress(data, _READ))
    except zlib.error as e:
        raise CorruptFile(f"{label}: member {name!r}: damaged compressed data ({e})") from e
    if written != info.file_size:
        raise UnsafeArchive(
            f"{label}: member {name!r}: declares {info.file_size} bytes but holds {written} (lying header): refused"
        )
    if crc != info.CRC:
        raise CorruptFile(f"{label}: member {name!r}: CRC-32 mismatch: the archive is damaged")

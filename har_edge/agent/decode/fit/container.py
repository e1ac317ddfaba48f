"""The FIT container: header, definition messages, the record walk, the record index, scan and verify.

:func:`verify` checks every (chained) file's header, size and CRC without
decoding and returns a :class:`Verified` proof naming the file's identity.
:func:`scan` walks the records once (a tight loop that only looks at each
record's header byte), checks header, size and CRC (unless handed a proof that
still matches the file), interns definition messages and keeps, per definition,
the file offsets of its records (as arithmetic runs, :class:`Offsets`: a day of
IMU records in a few KB). Calibration, timestamp correlation, file_id and
device_info messages (a handful) are decoded on the spot.

Anything this reader does not support raises :class:`FastPathUnsupported`, and
the caller falls back to garmin-fit-sdk.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from har_edge.agent.decode.fit.crc import Crc16, crc16_py
from har_edge.agent.decode.fit.profile import IMU_MESGS, SMALL_MESGS
from har_edge.agent.errors import CorruptFile, UnknownFormat

I64 = npt.NDArray[np.int64]
#: one value of a field as decoded from a record (None: the field's invalid value)
Value = int | float | str | None

SMALL_MESG_LIMIT = 64  # keep at most this many of each small message
HEADER_SIZES = (12, 14)
BLOCK_SIZE = 1 << 20  # bytes read at a time: small enough to stay out of the resident set


class FastPathUnsupported(Exception):
    """The file is valid as far as we know, but this reader does not handle its layout."""


# -- base types ----------------------------------------------------------------

# base type number -> (numpy type code, size, invalid value or None)
BASE_TYPES: dict[int, tuple[str, int, int | None]] = {
    0x00: ("u1", 1, 0xFF),  # enum
    0x01: ("i1", 1, 0x7F),
    0x02: ("u1", 1, 0xFF),
    0x03: ("i2", 2, 0x7FFF),
    0x04: ("u2", 2, 0xFFFF),
    0x05: ("i4", 4, 0x7FFFFFFF),
    0x06: ("u4", 4, 0xFFFFFFFF),
    0x07: ("u1", 1, None),  # string
    0x08: ("f4", 4, None),  # floats: garmin-fit-sdk never treats them as invalid
    0x09: ("f8", 8, None),
    0x0A: ("u1", 1, 0),  # uint8z
    0x0B: ("u2", 2, 0),
    0x0C: ("u4", 4, 0),
    0x0D: ("u1", 1, 0xFF),  # byte
    0x0E: ("i8", 8, 0x7FFFFFFFFFFFFFFF),
    0x0F: ("u8", 8, 0xFFFFFFFFFFFFFFFF),
    0x10: ("u8", 8, 0),
}
UINT8 = 0x02
STRING = 0x07


# -- header --------------------------------------------------------------------


@dataclass(frozen=True)
class FitHeader:
    offset: int  # where this (possibly chained) FIT file starts
    header_size: int
    protocol_version: int
    profile_version: int
    data_size: int
    header_crc: int | None

    @property
    def data_start(self) -> int:
        return self.offset + self.header_size

    @property
    def data_end(self) -> int:
        return self.offset + self.header_size + self.data_size

    @property
    def end(self) -> int:
        """Offset just past the file CRC."""
        return self.data_end + 2


def parse_header(raw: bytes, offset: int, file_size: int, name: str) -> FitHeader:
    """Check a FIT file header; raise the InputError a person can act on."""
    first = offset == 0
    if first and file_size == 0:
        raise CorruptFile(f"{name} is empty (0 bytes): the copy failed or the export is incomplete; export it again")
    where = "" if first else f" at byte {offset} (after the end of the first FIT file)"
    if len(raw) < 12 or raw[0] not in HEADER_SIZES or raw[8:12] != b".FIT":
        if not first:
            raise CorruptFile(f"{name} has {file_size - offset} unexpected bytes{where}: the file is damaged")
        if len(raw) < 12 and raw[:1] in (b"\x0c", b"\x0e") and b".FIT".startswith(raw[8:12]):
            raise CorruptFile(f"{name} stops inside its FIT header ({file_size} bytes): the copy is incomplete")
        raise UnknownFormat(
            f"{name} is not a FIT file (no '.FIT' signature in its header): "
            "drop the .fit (or the Garmin Connect 'Export Original' zip) of a recording"
        )
    if len(raw) < raw[0]:
        raise CorruptFile(f"{name} stops inside its FIT header{where}: the copy is incomplete")
    header_size = raw[0]
    protocol, profile, data_size = struct.unpack_from("<BHI", raw, 1)
    header_crc = None
    if header_size == 14:
        header_crc = struct.unpack_from("<H", raw, 12)[0]
        if header_crc not in (0, crc16_py(raw[:12])):
            raise CorruptFile(f"{name} has a bad header CRC{where}: the file is damaged")
    header = FitHeader(offset, header_size, protocol, profile, data_size, header_crc)
    if data_size == 0 and file_size > header.end:
        raise CorruptFile(
            f"{name} was never finalized (its header says 0 bytes of data but the file holds {file_size}): "
            "the device did not close the recording; sync the watch again and export the original FIT"
        )
    if header.end > file_size:
        raise CorruptFile(
            f"{name} is truncated{where}: its header promises {header.end - offset} bytes, "
            f"only {file_size - offset} are there; the copy is incomplete or the recording was cut off"
        )
    return header


def _crc_error(name: str, offset: int) -> CorruptFile:
    chained = "" if offset == 0 else f" (chained file at byte {offset})"
    return CorruptFile(
        f"{name} fails its CRC check{chained}: the bytes were damaged in transfer or on disk; copy or export it again"
    )


@dataclass(frozen=True)
class FileIdentity:
    """(device, inode, size, mtime in ns): the same file, unchanged, as long as these are equal.

    A rename (the watcher's claim) keeps all four.
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, f: BinaryIO | Path) -> FileIdentity:
        """The identity of an open file, or of the file at a path."""
        st = os.stat(f) if isinstance(f, Path) else os.fstat(f.fileno())
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Verified:
    """What :func:`verify` found: this file, with these headers, has every byte and a right CRC."""

    identity: FileIdentity | None  # None: the file changed while it was read, so nothing is proven of it now
    headers: tuple[FitHeader, ...]

    def holds_for(self, identity: FileIdentity) -> bool:
        """True when the file is still the one checked, unchanged."""
        return self.identity is not None and self.identity == identity


def verify(path: Path, name: str | None = None) -> Verified:
    """Check every (chained) file's header, size and CRC without decoding; raise InputError on damage.

    The proof it returns can be handed to :func:`scan` (through ``decode_fit``), which then
    skips the CRC pass as long as the file still has the same identity.
    """
    name = name or Path(path).name
    headers = []
    view = memoryview(bytearray(BLOCK_SIZE))  # one buffer, reused: no allocation per block
    with open(path, "rb") as f:
        before = FileIdentity.of(f)
        size = before.size
        offset = 0
        while offset == 0 or offset < size:
            f.seek(offset)
            header = parse_header(f.read(14), offset, size, name)
            headers.append(header)
            crc = Crc16()
            f.seek(offset)
            remaining = header.data_end - offset
            while remaining:
                got = f.readinto(view[: min(BLOCK_SIZE, remaining)])
                if not got:
                    raise CorruptFile(
                        f"{name} is truncated at byte {header.data_end - remaining}: the copy is incomplete"
                    )
                crc.update(view[:got])
                remaining -= got
            stored = f.read(2)
            if len(stored) < 2 or struct.unpack("<H", stored)[0] != crc.value:
                raise _crc_error(name, offset)
            offset = header.end
        stable = FileIdentity.of(f) == before  # not written to while we read it
    return Verified(before if stable else None, tuple(headers))


def file_complete(path: Path) -> Verified | None:
    """The proof that the header is valid and every (chained) file's bytes are there with a right CRC; else None."""
    try:
        return verify(path)
    except (CorruptFile, UnknownFormat):
        return None


# -- definitions ---------------------------------------------------------------


@dataclass(frozen=True)
class FieldDef:
    num: int
    size: int
    base_type: int

    @property
    def effective_type(self) -> int:
        """garmin-fit-sdk reads a field whose size is no multiple of its type as bytes."""
        return self.base_type if self.size % BASE_TYPES[self.base_type][1] == 0 else UINT8

    @property
    def count(self) -> int:
        return self.size // BASE_TYPES[self.effective_type][1]


@dataclass(frozen=True)
class MesgDef:
    global_num: int
    big_endian: bool
    fields: tuple[FieldDef, ...]
    dev_size: int = 0

    @property
    def record_size(self) -> int:
        """Bytes of one data record, its header byte included."""
        return 1 + sum(f.size for f in self.fields) + self.dev_size

    def field(self, num: int) -> FieldDef | None:
        """The field with this number (the last one if a writer repeated it, as the SDK does)."""
        found = None
        for f in self.fields:
            if f.num == num:
                found = f
        return found

    def dtype(self) -> np.dtype[np.void]:
        """A structured dtype for one whole record; fields are named ``f<num>``."""
        return _record_dtype(self)

    def _dtype(self) -> np.dtype[np.void]:
        order = ">" if self.big_endian else "<"
        spec: dict[str, tuple[np.dtype, int]] = {}
        offset = 1
        for f in self.fields:
            if f.count:
                code = BASE_TYPES[f.effective_type][0]
                spec[f"f{f.num}"] = (np.dtype((order + code, (f.count,))), offset)
            offset += f.size
        return np.dtype(
            {
                "names": list(spec),
                "formats": [v[0] for v in spec.values()],
                "offsets": [v[1] for v in spec.values()],
                "itemsize": self.record_size,
            }
        )

    def values(self, raw: bytes) -> dict[int, list[Value]]:
        """Decode one record (header byte excluded) into ``{field num: [values]}``, invalid as None."""
        order = ">" if self.big_endian else "<"
        out: dict[int, list[Value]] = {}
        offset = 0
        for f in self.fields:
            code, _size, invalid = BASE_TYPES[f.effective_type]
            chunk = raw[offset : offset + f.size]
            offset += f.size
            if f.effective_type == STRING:
                out[f.num] = [chunk.split(b"\0", 1)[0].decode("utf-8", "replace")]
                continue
            vals = np.frombuffer(chunk, order + code, count=f.count).tolist()
            out[f.num] = [None if v == invalid else v for v in vals]
        return out


@lru_cache(maxsize=256)
def _record_dtype(mdef: MesgDef) -> np.dtype[np.void]:
    return mdef._dtype()


class Offsets:
    """Sorted file offsets of one definition's records, as arithmetic runs plus single offsets.

    IMU records repeat every few hundred bytes, so a day of them (170k records
    per sensor) is a few hundred runs: memory does not grow with the file's
    length. The walker appends single offsets (``append``, in file order) and
    runs (``add_run``); readers take slices (``take``) or iterate.
    """

    __slots__ = ("_run_at", "_run_count", "_run_start", "_run_step", "_segments", "_singles", "append")

    def __init__(self) -> None:
        self._singles = array("q")
        self._run_start, self._run_step, self._run_count, self._run_at = array("q"), array("q"), array("q"), array("q")
        self.append = self._singles.append  # the walker's hot loop: a C call per record
        self._segments: tuple[I64, I64, I64, I64] | None = None

    def add_run(self, start: int, step: int, count: int) -> None:
        """``count`` records at ``start``, ``start + step``, ... (after every offset added so far)."""
        self._run_start.append(start)
        self._run_step.append(step)
        self._run_count.append(count)
        self._run_at.append(len(self._singles))
        self._segments = None

    def __len__(self) -> int:
        return len(self._singles) + sum(self._run_count)

    def _segs(self) -> tuple[I64, I64, I64, I64]:
        """(start, step, count, cumulative count) of every segment in file order; a single is a segment of one."""
        if self._segments is None or len(self._segments[0]) != len(self._singles) + len(self._run_at):
            n = len(self._singles)

            def arr(a: array[int]) -> I64:
                return np.frombuffer(a, np.int64) if len(a) else np.empty(0, np.int64)

            at = arr(self._run_at)
            # single i sorts at 2i+1; a run added after a singles at 2a (stable: runs keep their order)
            key = np.concatenate([np.arange(n, dtype=np.int64) * 2 + 1, at * 2])
            order = np.argsort(key, kind="stable")
            start = np.concatenate([arr(self._singles), arr(self._run_start)])[order]
            step = np.concatenate([np.zeros(n, np.int64), arr(self._run_step)])[order]
            count = np.concatenate([np.ones(n, np.int64), arr(self._run_count)])[order]
            self._segments = (start, step, count, np.cumsum(count))
        return self._segments

    def take(self, i: int, n: int) -> I64:
        """Offsets ``i`` to ``i + n`` (fewer at the end) as int64."""
        start, step, count, ends = self._segs()
        j = min(int(ends[-1]) if len(ends) else 0, i + n)
        if i >= j:
            return np.empty(0, np.int64)
        first, last = int(np.searchsorted(ends, i, "right")), int(np.searchsorted(ends, j - 1, "right"))
        cnt = count[first : last + 1]
        which = np.repeat(np.arange(first, last + 1), cnt)
        within = np.arange(len(which)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        out: I64 = start[which] + step[which] * within
        skip = i - int(ends[first] - count[first])  # records of the first segment before i
        return out[skip : skip + (j - i)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.take(0, len(self)).tolist())


@dataclass
class FitIndex:
    """What one pass over a FIT file learned: definitions and where their records are."""

    path: Path
    name: str
    size: int
    headers: list[FitHeader] = field(default_factory=list)
    defs: list[MesgDef] = field(default_factory=list)
    positions: list[Offsets] = field(default_factory=list)  # per def: offsets of record header bytes
    compressed_records: int = 0
    #: decoded small messages: global num -> [(record offset, {field num: [values]})]
    small: dict[int, list[tuple[int, dict[int, list[Value]]]]] = field(default_factory=dict)

    def positions_of(self, def_id: int, start: int = 0, count: int | None = None) -> I64:
        """Offsets of a definition's records (``count`` of them from the ``start``-th; all by default)."""
        pos = self.positions[def_id]
        return pos.take(start, len(pos) - start if count is None else count)

    def message_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for d, pos in zip(self.defs, self.positions, strict=True):
            counts[d.global_num] = counts.get(d.global_num, 0) + len(pos)
        return counts


def _no_sink(offset: int) -> None:  # pragma: no cover - only header bytes with a record size are sunk
    raise AssertionError(f"no definition for the record at byte {offset}")


class _Walker:
    """Walks the records of a FIT file's data section, block by block."""

    def __init__(self, index: FitIndex) -> None:
        self.index = index
        self.def_ids: dict[MesgDef, int] = {}
        self.local: list[int | None] = [None] * 16
        # indexed by the header byte of a normal data record: record size (0 = undefined) and sink
        self.size_of = [0] * 256
        self.sink: list[Callable[[int], None]] = [_no_sink] * 256
        self.store: list[Offsets | None] = [None] * 256

    def walk(self, buf: bytes, base: int, final: bool) -> int:
        """Walk the records in ``buf`` (which starts at file offset ``base``); return bytes consumed."""
        size_of, sink = self.size_of, self.sink
        n = len(buf)
        pos = 0
        view = np.frombuffer(buf, np.uint8)
        budget = backoff = 0
        while pos < n:
            if budget <= 0:  # now and then, try to take a long periodic run of records at once
                taken = self._periodic(buf, view, pos, base)
                pos += taken
                backoff = 16 if taken else min(2 * backoff + 16, 4096)
                budget = backoff
                continue
            budget -= 1
            h = buf[pos]
            size = size_of[h]
            if size:
                if pos + size > n:
                    break
                sink[h](base + pos)
                pos += size
                continue
            if h & 0x80:
                size = self._compressed(buf, pos, base)
            elif h & 0x40:
                size = self._definition(buf, pos)
            else:
                raise CorruptFile(
                    f"{self.index.name} uses local message {h & 0x0F} at byte {base + pos} before defining it: "
                    "the file is damaged"
                )
            if not size:
                break
            pos += size
        if final and pos < n:
            raise CorruptFile(
                f"{self.index.name}: the record at byte {base + pos} runs past the end of the data its header "
                "states: the file is damaged (a bad write or an unfinished recording)"
            )
        return pos

    def _periodic(self, buf: bytes, view: np.ndarray, pos: int, base: int, min_cycles: int = 8) -> int:
        """Take a run of records that repeats a cycle of 1-4 data records; return the bytes taken.

        IMU files are mostly accel, gyro, accel, gyro... with fixed sizes. Guess
        the cycle from the next records, predict where the next N cycles' header
        bytes are, and check them all with numpy: a prefix of cycles whose header
        bytes all match is exactly what the record-by-record walk would find.
        """
        size_of, n = self.size_of, len(buf)
        headers: list[int] = []
        offsets: list[int] = []
        p = pos
        for _ in range(4):
            if p >= n or not size_of[buf[p]]:
                return 0
            headers.append(buf[p])
            offsets.append(p - pos)
            p += size_of[buf[p]]
            cycle = p - pos
            if p >= n or buf[p] != headers[0]:
                continue
            count = (n - pos) // cycle
            if count < min_cycles:
                return 0
            grid = (pos + np.arange(count, dtype=np.int64) * cycle)[:, None] + np.array(offsets, np.int64)
            ok = (view[grid] == np.array(headers, np.uint8)).all(axis=1)
            k = count if ok.all() else int(np.argmin(ok))
            if k < min_cycles:
                continue
            for h in dict.fromkeys(headers):
                cols = [j for j, hj in enumerate(headers) if self.store[hj] is self.store[h]]
                if cols[0] != headers.index(h):
                    continue  # a definition seen earlier in this cycle: stored with it
                store = self.store[h]
                assert store is not None  # h has a record size, so a definition
                if len(cols) == 1:
                    store.add_run(int(grid[0, cols[0]]) + base, cycle, k)
                else:  # one definition several times per cycle: its offsets interleave, add them one by one
                    for off in np.sort((grid[:k, cols] + base).reshape(-1)).tolist():
                        store.append(off)
            return k * cycle
        return 0

    def _compressed(self, buf: bytes, pos: int, base: int) -> int:
        local = (buf[pos] >> 5) & 0x03
        def_id = self.local[local]
        if def_id is None:
            raise CorruptFile(
                f"{self.index.name} uses local message {local} at byte {base + pos} before defining it: "
                "the file is damaged"
            )
        mdef = self.index.defs[def_id]
        if pos + mdef.record_size > len(buf):
            return 0
        if mdef.global_num in IMU_MESGS or mdef.global_num in SMALL_MESGS:
            raise FastPathUnsupported(f"compressed-timestamp record of message {mdef.global_num}")
        self.index.compressed_records += 1
        self.index.positions[def_id].append(base + pos)
        return mdef.record_size

    def _definition(self, buf: bytes, pos: int) -> int:
        n = len(buf)
        if pos + 6 > n:
            return 0
        h = buf[pos]
        big = buf[pos + 2] != 0
        global_num = int.from_bytes(buf[pos + 3 : pos + 5], "big" if big else "little")
        end = pos + 6 + 3 * buf[pos + 5]
        if end > n:
            return 0
        fields = tuple(FieldDef(buf[i], buf[i + 1], buf[i + 2] & 0x1F) for i in range(pos + 6, end, 3))
        dev_size = 0
        if h & 0x20:
            if end + 1 > n:
                return 0
            dev_end = end + 1 + 3 * buf[end]
            if dev_end > n:
                return 0
            dev_size = sum(buf[i + 1] for i in range(end + 1, dev_end, 3))
            end = dev_end
        for f in fields:
            if f.base_type not in BASE_TYPES:
                raise CorruptFile(
                    f"{self.index.name} defines field {f.num} of message {global_num} with an invalid base type "
                    f"{f.base_type:#x}: the file is damaged"
                )
        mdef = MesgDef(global_num, big, fields, dev_size)
        def_id = self.def_ids.get(mdef)
        if def_id is None:
            def_id = self.def_ids[mdef] = len(self.index.defs)
            self.index.defs.append(mdef)
            self.index.positions.append(Offsets())
        local = h & 0x0F
        self.local[local] = def_id
        store = self.index.positions[def_id]
        for header in (local, local | 0x10, local | 0x20, local | 0x30):
            self.size_of[header] = mdef.record_size
            self.sink[header] = store.append
            self.store[header] = store
        return end - pos


def scan(
    path: Path, name: str | None = None, *, block_size: int = BLOCK_SIZE, verified: Verified | None = None
) -> FitIndex:
    """One streaming pass: check the file and index its records. Raises InputError on damage.

    ``verified``: what :func:`verify` found for this file earlier; its CRC is not computed again
    when the file still has the identity the proof names.
    """
    path = Path(path)
    index = FitIndex(path, name or path.name, 0)
    walker = _Walker(index)
    with open(path, "rb") as f:
        ident = FileIdentity.of(f)
        index.size = size = ident.size
        check_crc = verified is None or not verified.holds_for(ident)  # else verify() checked these very bytes
        offset = 0
        while offset == 0 or offset < size:
            f.seek(offset)
            raw_header = f.read(14)
            header = parse_header(raw_header, offset, size, index.name)
            index.headers.append(header)
            crc = Crc16() if check_crc else None
            if crc is not None:
                crc.update(raw_header[: header.header_size])
            f.seek(header.data_start)
            pos, carry = header.data_start, b""
            while pos < header.data_end:
                block = f.read(min(block_size, header.data_end - pos))
                if not block:  # the file shrank under us
                    raise CorruptFile(f"{index.name} is truncated at byte {pos}: the copy is incomplete")
                if crc is not None:
                    crc.update(block)
                pos += len(block)
                buf = carry + block if carry else block
                used = walker.walk(buf, pos - len(buf), final=pos >= header.data_end)
                carry = buf[used:]
            stored = f.read(2)
            if crc is not None and (len(stored) < 2 or struct.unpack("<H", stored)[0] != crc.value):
                raise _crc_error(index.name, offset)
            offset = header.end
        _read_small_messages(f, index)
    return index


def _read_small_messages(f: BinaryIO, index: FitIndex) -> None:
    for def_id, mdef in enumerate(index.defs):
        if mdef.global_num not in SMALL_MESGS:
            continue
        kept = index.small.setdefault(mdef.global_num, [])
        for pos in index.positions_of(def_id, 0, SMALL_MESG_LIMIT).tolist():
            f.seek(pos + 1)
            kept.append((pos, mdef.values(f.read(mdef.record_size - 1))))
    for kept in index.small.values():
        kept.sort(key=lambda item: item[0])

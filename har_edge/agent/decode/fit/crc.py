"""The FIT CRC-16: byte by byte, a word at a time, and streamed over large inputs with numpy."""

from __future__ import annotations

from array import array

import numpy as np
import numpy.typing as npt

U16 = npt.NDArray[np.uint16]

_NIBBLE = (0x0000, 0xCC01, 0xD801, 0x1400, 0xF001, 0x3C00, 0x2800, 0xE401,
           0xA001, 0x6C00, 0x7800, 0xB401, 0x5000, 0x9C01, 0x8801, 0x4400)  # fmt: skip


def _crc_byte(crc: int, byte: int) -> int:
    tmp = _NIBBLE[crc & 0xF]
    crc = ((crc >> 4) & 0x0FFF) ^ tmp ^ _NIBBLE[byte & 0xF]
    tmp = _NIBBLE[crc & 0xF]
    return ((crc >> 4) & 0x0FFF) ^ tmp ^ _NIBBLE[(byte >> 4) & 0xF]


def crc16_py(data: bytes | memoryview, crc: int = 0) -> int:
    """The FIT CRC (CRC-16, polynomial 0xA001 reflected, nibble table), byte by byte."""
    for byte in bytes(data):
        crc = _crc_byte(crc, byte)
    return crc


def _word_table() -> U16:
    """CRC register after feeding one little-endian 16-bit word w to a zero register."""
    byte_table = np.array([crc16_py(bytes([i])) for i in range(256)], np.uint32)
    w = np.arange(65536, dtype=np.uint32)
    c = byte_table[w & 0xFF]
    c = byte_table[(c ^ (w >> 8)) & 0xFF] ^ (c >> 8)
    out: U16 = c.astype(np.uint16)
    return out


_WORD = _word_table()
_WORD_ARRAY = array("H", _WORD.tobytes())  # indexed from Python: ints without a list of 65,536 objects


class Crc16:
    """Streaming FIT CRC, vectorized with numpy.

    The CRC is linear over GF(2) and its register is one 16-bit word wide, so
    feeding word w to register c gives ``A(c ^ w)`` with A a table lookup. The
    stream is cut into rows of ``LANES`` words; lane k accumulates every row's
    k-th word as ``s_k = A^LANES(s_k) ^ w`` (one table lookup and one XOR per
    row, across all lanes at once), and at the end the lanes, read as a word
    sequence, are fed through the plain CRC. ~0.2 s per 100 MB here, against
    ~40 s byte by byte in Python.
    """

    LANES = 8192  # a power of two
    _row_table: U16 | None = None

    def __init__(self) -> None:
        self._lanes: U16 | None = None
        self._tmp: U16 | None = None
        self._pending = b""

    @classmethod
    def _table(cls) -> U16:
        if cls._row_table is None:
            table, k = _WORD.copy(), 1
            while k < cls.LANES:  # A^(2k) = A^k o A^k
                table, k = table[table], k * 2
            cls._row_table = table
        return cls._row_table

    def update(self, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        row_bytes = 2 * self.LANES
        if self._pending:
            need = row_bytes - len(self._pending)
            if len(data) < need:
                self._pending += bytes(data)
                return
            self._rows(self._pending + bytes(data[:need]))
            data = data[need:]
            self._pending = b""
        full = len(data) - len(data) % row_bytes
        if full:
            self._rows(data[:full])
        self._pending = bytes(data[full:])

    def _rows(self, data: bytes | memoryview) -> None:
        rows = np.frombuffer(data, "<u2").reshape(-1, self.LANES)
        if self._lanes is None:
            self._lanes = np.zeros(self.LANES, np.uint16)
            self._tmp = np.empty(self.LANES, np.uint16)
        table, lanes, tmp = self._table(), self._lanes, self._tmp
        assert tmp is not None
        for row in rows:
            np.take(table, lanes, out=tmp)
            np.bitwise_xor(tmp, row, out=lanes)

    @property
    def value(self) -> int:
        crc = 0
        if self._lanes is not None:
            crc = _crc16_words(self._lanes.tolist(), crc)
        return crc16_words(self._pending, crc)


def _crc16_words(words: list[int], crc: int) -> int:
    word = _WORD_ARRAY
    for w in words:
        crc = word[crc ^ w]
    return crc


def crc16_words(data: bytes | memoryview, crc: int = 0) -> int:
    """:func:`crc16_py` two bytes at a time (one table lookup per little-endian word): ~10x faster."""
    data = bytes(data)
    even = len(data) & ~1
    crc = _crc16_words(np.frombuffer(data, "<u2", count=even // 2).tolist(), crc)
    return _crc_byte(crc, data[-1]) if even < len(data) else crc


def crc16(data: bytes | memoryview) -> int:
    """The FIT CRC of ``data`` (vectorized for large inputs)."""
    if len(data) < 4 * Crc16.LANES:
        return crc16_words(data)
    crc = Crc16()
    crc.update(data)
    return crc.value

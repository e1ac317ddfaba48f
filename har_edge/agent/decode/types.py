"""What every decoder hands to preprocessing.

Times are integer milliseconds since the Unix epoch (UTC). Samples stay in the
units the file holds; ``accel_unit`` says which when the decoder knows it, and
preprocessing detects it from the magnitude otherwise (Garmin's profile says g,
real devices write milli-g).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: seconds between the Unix epoch and the FIT epoch (1989-12-31T00:00:00Z)
FIT_EPOCH_S = 631065600

ACCEL_UNITS = ("mg", "g", "m/s^2")


@dataclass(frozen=True)
class SensorBlock:
    """Samples of one three-axis sensor, sorted by time."""

    t_ms: np.ndarray  # int64, shape (n,)
    xyz: np.ndarray  # float32, shape (n, 3)

    def __post_init__(self) -> None:
        if self.t_ms.ndim != 1 or self.xyz.shape != (len(self.t_ms), 3):
            raise ValueError(f"SensorBlock shapes disagree: t {self.t_ms.shape}, xyz {self.xyz.shape}")

    def __len__(self) -> int:
        return len(self.t_ms)

    @staticmethod
    def empty() -> SensorBlock:
        return SensorBlock(np.empty(0, np.int64), np.empty((0, 3), np.float32))

    @staticmethod
    def concat(blocks: list[SensorBlock]) -> SensorBlock:
        blocks = [b for b in blocks if len(b)]
        if not blocks:
            return SensorBlock.empty()
        return SensorBlock(
            np.concatenate([b.t_ms for b in blocks]).astype(np.int64, copy=False),
            np.concatenate([b.xyz for b in blocks]).astype(np.float32, copy=False),
        )


@dataclass(frozen=True)
class Chunk:
    """A stretch of a recording: accelerometer samples and, if recorded, gyroscope ones.

    Chunks of one recording come in time order; a chunk's gyro block may end a
    little before or after its accel block (the stream fuser holds back the rest).
    """

    accel: SensorBlock
    gyro: SensorBlock | None = None


@dataclass
class Recording:
    """A decoded export, read lazily: ``chunks()`` may be called once."""

    name: str
    format: str
    chunks: Callable[[], Iterator[Chunk]]
    accel_unit: str | None = None  # None: detect from magnitude
    has_gyro: bool = True
    meta: dict[str, Any] = field(default_factory=dict)


def named_in(rec: Recording, container: str) -> Recording:
    """``rec`` whose InputErrors, raised now or while its chunks are read, name ``container`` (a zip) first."""
    from har_edge.agent.errors import InputError

    inner = rec.chunks

    def chunks() -> Iterator[Chunk]:
        try:
            yield from inner()
        except InputError as e:
            raise prefixed(e, container) from e

    rec.chunks = chunks
    return rec


def prefixed(e: Exception, container: str) -> Exception:
    """The same InputError with ``container: `` in front of its message, unless the message starts with it."""
    msg = str(e)
    if msg.startswith(container):
        return e
    try:
        return type(e)(f"{container}: {msg}")
    except TypeError:  # pragma: no cover - every InputError takes one message
        return e

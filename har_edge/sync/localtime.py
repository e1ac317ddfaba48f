"""The wearer's local time for the MLflow pages: the export's own UTC offset, else the ``timezone`` setting.

An export may state its offset (the decoder keeps it in ``files.utc_offset_s`` with the field it came
from: ``activity.local_timestamp`` or ``device_settings.time_offset``); that fixed offset then applies to
the whole file. Otherwise the IANA zone of the setting ``timezone`` applies, daylight saving included.
Stored times stay UTC: only the pages show local ones, and they say which rule applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]

#: the zone's offset is looked up once per this many ms (every zone changes offset on a quarter hour)
_BUCKET_MS = 15 * 60 * 1000


def format_offset(offset_s: int) -> str:
    """``UTC+01:00``, ``UTC-05:30``, ``UTC``."""
    if offset_s == 0:
        return "UTC"
    sign = "+" if offset_s > 0 else "-"
    hours, minutes = divmod(abs(offset_s) // 60, 60)
    return f"UTC{sign}{hours:02d}:{minutes:02d}"


@dataclass(frozen=True)
class LocalTime:
    """How UTC times of one file become the wearer's local times."""

    #: a fixed offset (s) stated by the export, or None: the zone applies
    offset_s: int | None
    #: the IANA zone of the setting ``timezone`` (used when the export states no offset)
    zone: str
    #: where the rule comes from: the export's field, or ``setting timezone``
    source: str

    @staticmethod
    def of(offset_s: int | None, offset_source: str | None, zone: str) -> LocalTime:
        if offset_s is not None:
            return LocalTime(int(offset_s), zone, f"export {offset_source or 'offset'}")
        return LocalTime(None, zone, "setting timezone")

    def offsets_ms(self, utc_ms: I64) -> I64:
        """Local time minus UTC in ms for each time."""
        utc_ms = np.asarray(utc_ms, dtype=np.int64)
        if self.offset_s is not None:
            return np.full(utc_ms.shape, self.offset_s * 1000, dtype=np.int64)
        tz = ZoneInfo(self.zone)
        buckets, inverse = np.unique(utc_ms // _BUCKET_MS, return_inverse=True)
        per_bucket = np.array(
            [_zone_offset_ms(tz, int(b) * _BUCKET_MS) for b in buckets.tolist()], dtype=np.int64
        ).reshape(-1)
        return per_bucket[inverse.reshape(utc_ms.shape)] if len(buckets) else np.zeros(utc_ms.shape, np.int64)

    def to_local_ms(self, utc_ms: I64) -> I64:
        """Local wall-clock times, as ms since 1970-01-01 00:00 *local* (for day boundaries and axes)."""
        utc_ms = np.asarray(utc_ms, dtype=np.int64)
        return utc_ms + self.offsets_ms(utc_ms)

    def offset_at(self, utc_ms: int) -> int:
        """Local time minus UTC in seconds at one time."""
        return int(self.offsets_ms(np.array([utc_ms], np.int64))[0] // 1000)

    def local_text(self, utc_ms: int, fmt: str = "%Y-%m-%d %H:%M") -> str:
        return (datetime(1970, 1, 1) + timedelta(milliseconds=int(self.to_local_ms(np.array([utc_ms]))[0]))).strftime(
            fmt
        )

    def describe(self, at_ms: int) -> str:
        """E.g. ``UTC+01:00, from the export's activity.local_timestamp`` or ``Europe/Berlin (UTC+02:00), ...``."""
        here = format_offset(self.offset_at(at_ms))
        if self.offset_s is not None:
            return f"{here}, from the export's {self.source.removeprefix('export ')}"
        return f"{self.zone} ({here}), from the setting timezone: the export states no UTC offset"


def _zone_offset_ms(tz: ZoneInfo, utc_ms: int) -> int:
    offset = datetime.fromtimestamp(utc_ms / 1000, tz=UTC).astimezone(tz).utcoffset()
    return int(offset.total_seconds() * 1000) if offset is not None else 0

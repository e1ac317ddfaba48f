"""Pure preprocessing shared by serving (the agent) and training (the trainer).

Raw sensor samples -> units -> fused, resampled 6-channel stream -> windows.

The stream is processed chunk by chunk (:class:`StreamWindower`), so a day of
samples is never held at once; :func:`recording_windows` runs it over a whole
recording for callers that want everything (the trainer, tests). Both paths are
the same code, so training and serving see identical windows.

Channel order and units of the windows: ``acc_x, acc_y, acc_z`` in m/s² with
gravity, ``gyro_x, gyro_y, gyro_z`` in deg/s (see :data:`har_edge.agent.manifest.CHANNELS`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from har_edge.agent.decode.types import Chunk, Recording, SensorBlock
from har_edge.agent.errors import InputError, TooShort

ACCEL_MS2_PER_G = 9.80665
_GRAVITY_IN = {"mg": 1000.0, "g": 1.0, "m/s^2": ACCEL_MS2_PER_G}
_TO_MS2 = {"mg": ACCEL_MS2_PER_G / 1000.0, "g": ACCEL_MS2_PER_G, "m/s^2": 1.0}


# -- units ------------------------------------------------------------------


def detect_accel_unit(xyz: np.ndarray) -> str:
    """Tell milli-g, g and m/s² apart by the median magnitude (gravity dominates it).

    Raises :class:`InputError` when the magnitude fits none of them by a factor of 3,
    which means the column is not an accelerometer in any of these units.
    """
    if len(xyz) == 0:
        raise TooShort("no accelerometer samples to detect units from")
    mag = float(np.median(np.linalg.norm(np.asarray(xyz, dtype=np.float64), axis=1)))
    best = min(_GRAVITY_IN, key=lambda u: abs(np.log(max(mag, 1e-9) / _GRAVITY_IN[u])))
    if abs(np.log(max(mag, 1e-9) / _GRAVITY_IN[best])) > np.log(3.0):
        raise InputError(
            f"accelerometer magnitude {mag:.3g} at rest-median matches none of milli-g (~1000), "
            "g (~1) or m/s² (~9.8): the file's accelerometer columns are not in a known unit"
        )
    return best


def accel_to_ms2(xyz: np.ndarray, unit: str) -> np.ndarray:
    """Convert accelerometer samples to m/s² (gravity kept)."""
    try:
        factor = _TO_MS2[unit]
    except KeyError:
        raise ValueError(f"unknown accelerometer unit {unit!r}; one of {sorted(_TO_MS2)}") from None
    return (np.asarray(xyz, dtype=np.float32) * np.float32(factor)).astype(np.float32, copy=False)


# -- windows ----------------------------------------------------------------


def sliding_windows(samples: np.ndarray, window: int, step: int) -> np.ndarray:
    """Windows of ``window`` rows every ``step`` rows, as a read-only view (k, window, c)."""
    if samples.shape[0] < window:
        return np.empty((0, window) + samples.shape[1:], dtype=samples.dtype)
    view = sliding_window_view(samples, window, axis=0)[::step]  # (k, c, window)
    return np.moveaxis(view, -1, 1)


def _contiguous_windows(samples: np.ndarray, window: int, step: int) -> np.ndarray:
    """:func:`sliding_windows` as a new C-contiguous array, copied a whole window (one memory run) at a time."""
    n, c = samples.shape
    if n < window:
        return np.empty((0, window, c), dtype=samples.dtype)
    flat = np.ascontiguousarray(samples).reshape(-1)
    k = (n - window) // step + 1
    rows = sliding_window_view(flat, window * c)[: (k - 1) * step * c + 1 : step * c]
    return np.ascontiguousarray(rows).reshape(k, window, c)


def apply_scaler(windows: np.ndarray, mean, scale) -> np.ndarray:
    """Standardise per channel: ``(raw - mean) / scale`` as float32."""
    mean = np.asarray(mean, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    out = np.subtract(np.asarray(windows, dtype=np.float32), mean)  # one new array, divided in place
    return np.divide(out, scale, out=out)


@dataclass
class WindowSet:
    """Windows in raw SI units with the time (ms since the Unix epoch) of their first sample."""

    start_ms: np.ndarray  # int64 (k,)
    windows: np.ndarray  # float32 (k, window, 6)
    quality: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.start_ms)

    @staticmethod
    def concat(parts: Iterable[WindowSet], window: int, channels: int = 6) -> WindowSet:
        parts = [p for p in parts if len(p)]
        if not parts:
            return WindowSet(np.empty(0, np.int64), np.empty((0, window, channels), np.float32))
        return WindowSet(
            np.concatenate([p.start_ms for p in parts]),
            np.concatenate([p.windows for p in parts]),
        )


# -- the stream ---------------------------------------------------------------


def _sorted_unique(block: SensorBlock) -> tuple[np.ndarray, np.ndarray, int]:
    """Sort by time and drop repeated timestamps; return how many samples were out of order."""
    t, x = block.t_ms, block.xyz
    disorder = 0
    if len(t) > 1:
        d = np.diff(t)
        if (d < 0).any():
            disorder = int((d < 0).sum())
            order = np.argsort(t, kind="stable")
            t, x = t[order], x[order]
            d = np.diff(t)
        if (d == 0).any():
            keep = np.concatenate(([True], d != 0))
            t, x = t[keep], x[keep]
    return t, x, disorder


class _Sensor:
    """Raw samples of one sensor not yet consumed by the grid, in SI units."""

    def __init__(self) -> None:
        self.t = np.empty(0, np.int64)
        self.x = np.empty((0, 3), np.float32)

    def add(self, t: np.ndarray, x: np.ndarray) -> None:
        if len(self.t) and len(t) and t[0] <= self.t[-1]:
            # a chunk overlapping the previous one: keep only what is new
            keep = t > self.t[-1]
            t, x = t[keep], x[keep]
        self.t = np.concatenate((self.t, t))
        self.x = np.concatenate((self.x, x))

    def sample(self, tg: np.ndarray, max_gap_ms: int) -> tuple[np.ndarray, np.ndarray]:
        """Linear interpolation at grid times; valid where no gap is bridged.

        A grid point is valid when it is a sample time, or lies between two
        samples at most ``max_gap_ms`` apart.
        """
        t, x = self.t, self.x
        n = len(tg)
        if len(t) == 0:
            return np.empty((n, 3), np.float32), np.zeros(n, bool)
        on_grid = self._on_grid(tg)
        if on_grid is not None:  # every grid time is a sample time: interpolation would return the samples
            return on_grid, np.ones(n, bool)
        out = np.empty((n, 3), np.float32)
        tf = (t - t[0]).astype(np.float64)
        tgf = (tg - t[0]).astype(np.float64)
        for axis in range(3):
            out[:, axis] = np.interp(tgf, tf, x[:, axis])
        # valid: t[0] <= tg <= t[-1], except strictly inside an interval longer than max_gap_ms
        valid = (tg >= t[0]) & (tg <= t[-1])
        for j in np.flatnonzero(np.diff(t) > max_gap_ms).tolist():
            lo = np.searchsorted(tg, t[j], side="right")
            hi = np.searchsorted(tg, t[j + 1], side="left")
            valid[lo:hi] = False
        return out, valid

    def _on_grid(self, tg: np.ndarray) -> np.ndarray | None:
        """The samples at the grid times when every grid time is a sample time (a stride apart), else None."""
        t, n = self.t, len(tg)
        if n == 0:
            return None
        i0 = int(np.searchsorted(t, tg[0]))
        if i0 >= len(t) or t[i0] != tg[0]:
            return None
        stride = 1
        if n > 1:
            i1 = int(np.searchsorted(t, tg[1]))
            if i1 >= len(t) or t[i1] != tg[1]:
                return None
            stride = i1 - i0
        end = i0 + stride * (n - 1)
        if end >= len(t) or t[end] != tg[-1]:
            return None
        picked = slice(i0, end + 1, stride)
        if not np.array_equal(t[picked], tg):
            return None
        return self.x[picked]

    def drop_before(self, t_next: int) -> None:
        """Forget samples no longer needed for grid times >= t_next (keep one before it)."""
        i = int(np.searchsorted(self.t, t_next, side="left")) - 1
        if i > 0:
            self.t = self.t[i:]
            self.x = self.x[i:]


class StreamWindower:
    """Fuse accelerometer and gyroscope, resample to ``rate_hz`` and cut windows, chunk by chunk.

    The grid is ``t0 + k / rate_hz`` from the first accelerometer sample. A grid
    point is kept only where every sensor has samples around it no further apart
    than ``max_gap_s``; runs of kept points are the recording's segments, and a
    window never spans two segments. Without a gyroscope, the gyro channels are 0.
    """

    def __init__(
        self,
        *,
        rate_hz: float,
        window: int,
        step: int,
        max_gap_s: float = 1.0,
        has_gyro: bool = True,
        accel_unit: str | None = None,
        saturation_g: float = 7.9,
        saturation_dps: float = 1990.0,
    ) -> None:
        if window <= 0 or step <= 0:
            raise ValueError("window and step must be positive")
        self.rate_hz = float(rate_hz)
        self.window, self.step = int(window), int(step)
        self.dt_ms = 1000.0 / self.rate_hz
        self.max_gap_ms = int(round(max_gap_s * 1000))
        self.has_gyro = has_gyro
        self.accel_unit = accel_unit
        self._sat = np.float32(saturation_g * ACCEL_MS2_PER_G)
        self._gsat = np.float32(saturation_dps)  # Garmin gyroscopes clip at +-2000 deg/s
        self._gyro_saturated = 0
        self._acc, self._gyr = _Sensor(), _Sensor()
        self._t0: int | None = None
        self._next_k = 0
        self._run = np.empty((0, 6), np.float32)  # samples of the open segment not yet windowed away
        self._run_k0 = 0  # grid index of _run[0]
        self._run_end_k = -2  # grid index after the last sample appended to _run
        # quality counters
        self._n_acc = 0
        self._n_gyr = 0
        self._first_t: int | None = None
        self._last_t: int | None = None
        self._dts: list[np.ndarray] = []
        self._gaps = 0
        self._gap_ms = 0
        self._saturated = 0
        self._disorder = 0
        self._segments = 0
        self._grid_kept = 0
        self._windows = 0

    # -- feeding -----------------------------------------------------------

    def feed(self, chunk: Chunk) -> WindowSet:
        at, ax, dis = _sorted_unique(chunk.accel)
        self._disorder += dis
        if len(at):
            if self.accel_unit is None:
                self.accel_unit = detect_accel_unit(ax)
            ax = accel_to_ms2(ax, self.accel_unit)
            self._account_accel(at, ax)
            self._acc.add(at, ax)
        if self.has_gyro and chunk.gyro is not None and len(chunk.gyro):
            gt, gx, dis = _sorted_unique(chunk.gyro)
            self._disorder += dis
            self._n_gyr += len(gt)
            self._gyro_saturated += int((np.abs(gx) >= self._gsat).any(axis=1).sum())
            self._gyr.add(gt, gx.astype(np.float32, copy=False))
        return self._advance(final=False)

    def finish(self) -> WindowSet:
        return self._advance(final=True)

    def _account_accel(self, t: np.ndarray, x: np.ndarray) -> None:
        if self._first_t is None:
            self._first_t = int(t[0])
        prev = self._last_t
        self._last_t = int(t[-1])
        self._n_acc += len(t)
        d = np.diff(t) if prev is None else np.diff(np.concatenate(([prev], t)))
        if len(d):
            self._dts.append(np.median(d).reshape(1))
            big = d > self.max_gap_ms
            self._gaps += int(big.sum())
            self._gap_ms += int(d[big].sum())
        self._saturated += int((np.abs(x) >= self._sat).any(axis=1).sum())

    def _advance(self, final: bool) -> WindowSet:
        if len(self._acc.t) == 0:
            return self._empty()
        if self._t0 is None:
            self._t0 = int(self._acc.t[0])
        limit = int(self._acc.t[-1])
        if self.has_gyro:
            if len(self._gyr.t) == 0:
                if not final:
                    return self._empty()
                limit = -1  # no gyro at all: nothing is valid
            else:
                limit = min(limit, int(self._gyr.t[-1]))
        last_k = int(np.floor((limit - self._t0) / self.dt_ms)) if limit >= self._t0 else -1
        if last_k < self._next_k:
            return self._empty()
        ks = np.arange(self._next_k, last_k + 1, dtype=np.int64)
        tg = self._t0 + np.round(ks * self.dt_ms).astype(np.int64)
        acc, valid = self._acc.sample(tg, self.max_gap_ms)
        if self.has_gyro:
            gyr, gvalid = self._gyr.sample(tg, self.max_gap_ms)
            valid &= gvalid
        else:
            gyr = np.zeros_like(acc)
        fused = np.concatenate((acc, gyr), axis=1)
        self._next_k = last_k + 1
        t_next = self._t0 + int(round(self._next_k * self.dt_ms))
        self._acc.drop_before(t_next)
        self._gyr.drop_before(t_next)
        self._grid_kept += int(valid.sum())
        return self._windows_from(ks, fused, valid)

    def _windows_from(self, ks: np.ndarray, fused: np.ndarray, valid: np.ndarray) -> WindowSet:
        starts: list[np.ndarray] = []
        wins: list[np.ndarray] = []
        # boundaries of runs of valid points
        edges = np.flatnonzero(np.diff(np.concatenate(([0], valid.astype(np.int8), [0]))))
        for a, b in zip(edges[::2], edges[1::2]):
            k_a = int(ks[a])
            if k_a != self._run_end_k:
                self._run = fused[a:b].copy()
                self._run_k0 = k_a
                self._segments += 1
            else:
                self._run = np.concatenate((self._run, fused[a:b]))
            self._run_end_k = int(ks[b - 1]) + 1
            w = _contiguous_windows(self._run, self.window, self.step)
            if len(w):
                k_starts = self._run_k0 + np.arange(len(w), dtype=np.int64) * self.step
                starts.append(self._t0 + np.round(k_starts * self.dt_ms).astype(np.int64))
                wins.append(w)
                consumed = len(w) * self.step
                self._run = self._run[consumed:]
                self._run_k0 += consumed
        if not starts:
            return self._empty()
        if len(wins) == 1:
            out = WindowSet(starts[0], wins[0])
        else:
            out = WindowSet(np.concatenate(starts), np.concatenate(wins))
        self._windows += len(out)
        return out

    def _empty(self) -> WindowSet:
        return WindowSet(np.empty(0, np.int64), np.empty((0, self.window, 6), np.float32))

    # -- figures -----------------------------------------------------------

    def quality(self) -> dict:
        """Data-quality figures of everything fed so far."""
        med_dt = float(np.median(np.concatenate(self._dts))) if self._dts else 0.0
        span_s = (self._last_t - self._first_t) / 1000.0 if self._first_t is not None else 0.0
        return {
            "samples_accel": self._n_acc,
            "samples_gyro": self._n_gyr,
            "gyro_present": 1.0 if (self.has_gyro and self._n_gyr) else 0.0,
            "native_rate_hz": round(1000.0 / med_dt, 3) if med_dt > 0 else 0.0,
            "duration_s": span_s,
            "gaps": self._gaps,
            "gap_s": self._gap_ms / 1000.0,
            "segments": self._segments,
            "coverage": (self._grid_kept / self.rate_hz) / span_s if span_s > 0 else 0.0,
            "saturated_share": self._saturated / self._n_acc if self._n_acc else 0.0,
            "gyro_saturated_share": self._gyro_saturated / self._n_gyr if self._n_gyr else 0.0,
            "out_of_order": self._disorder,
            "windows": self._windows,
        }


def recording_windows(
    recording: Recording,
    *,
    rate_hz: float,
    window: int,
    step: int,
    max_gap_s: float = 1.0,
) -> WindowSet:
    """All windows of a recording at once (for training and tests; the agent streams)."""
    sw = StreamWindower(
        rate_hz=rate_hz,
        window=window,
        step=step,
        max_gap_s=max_gap_s,
        has_gyro=recording.has_gyro,
        accel_unit=recording.accel_unit,
    )
    parts = [sw.feed(c) for c in recording.chunks()]
    parts.append(sw.finish())
    out = WindowSet.concat(parts, window)
    out.quality = sw.quality()
    return out


#: quality figures of a recording as a whole (a rate, shares, a flag): an export of several keeps the last one's
_QUALITY_LAST_WINS = frozenset(
    {"native_rate_hz", "coverage", "gyro_present", "saturated_share", "gyro_saturated_share"}
)


def merge_quality(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    """Fold one recording's :meth:`StreamWindower.quality` into an export's (several recordings, a zip):
    counts and durations add up; rates, shares and flags keep the last recording's value. Updates ``total``."""
    for k, v in part.items():
        total[k] = v if k in _QUALITY_LAST_WINS else total.get(k, 0.0) + v
    return total

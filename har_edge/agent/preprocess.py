"""Pure preprocessing shared by serving (the agent) and training (the trainer).

Raw sensor samples -> units -> fused, resampled 6-channel stream -> windows.

The stream is processed chunk by chunk (:class:`StreamWindower`), so a day of
samples is never held at once; :func:`recording_windows` runs it over a whole
recording for callers that want everything (the trainer, tests). Both paths are
the same code, so training and serving see identical windows.

Channel order and units of the windows: ``acc_x, acc_y, acc_z`` in m/s² with
gravity, ``gyro_x, gyro_y, gyro_z`` in deg/s (see :data:`har_edge.agent.manifest.CHANNELS`).

Clocks are not trusted (see :class:`_ClockGuard`): a sample time after the
plausibility horizon (the latest of now, the package's build time and the last
file's data, plus :data:`FUTURE_SLACK_S`) is dropped; a step between consecutive
samples forward beyond ``max_jump_s`` or backward beyond ``max_gap_s`` is a clock
jump. A short run after a jump that comes back (a corrupted timestamp) is
dropped; a long one starts a new segment, and after a backward jump a new
resampling grid. The grid is only laid over stretches the samples cover, so
memory and time follow the number of samples, never the time span.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from har_edge.agent.decode.types import Chunk, Recording
from har_edge.agent.errors import InputError, TooShort

log = logging.getLogger(__name__)

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
        return np.empty((0, window, *samples.shape[1:]), dtype=samples.dtype)
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


def apply_scaler(windows: np.ndarray, mean: object, scale: object) -> np.ndarray:
    """Standardise per channel: ``(raw - mean) / scale`` as float32."""
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(scale, dtype=np.float32)
    out: np.ndarray = np.subtract(np.asarray(windows, dtype=np.float32), m)  # one new array, divided in place
    np.divide(out, s, out=out)
    return out


@dataclass
class WindowSet:
    """Windows in raw SI units with the time (ms since the Unix epoch) of their first sample."""

    start_ms: np.ndarray  # int64 (k,)
    windows: np.ndarray  # float32 (k, window, 6)
    quality: dict[str, float] = field(default_factory=dict)

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

#: a time this far after the latest of now, the build time and the last file's data is implausible
FUTURE_SLACK_S = 366 * 86400.0
#: default bound of a forward step between consecutive samples before it counts as a clock jump
MAX_JUMP_S = 6 * 3600.0
#: samples held after a clock jump before the jump is believed (a run coming back sooner is dropped)
JUMP_HOLD_SAMPLES = 1024
#: grid points resampled at once (bounds the working arrays whatever the buffer holds)
GRID_BATCH = 1 << 17
#: samples a sensor buffer may hold while waiting for the other sensor before the grid moves on anyway
BUFFER_CAP = 1 << 20


def build_time_ms() -> int:
    """When this package was built or installed (the mtime of its files), in ms since the Unix epoch."""
    try:
        return int(Path(__file__).stat().st_mtime * 1000)
    except OSError:  # pragma: no cover - the module was imported from this file
        return 0


def plausible_until_ms(last_file_ms: int | None = None, *, slack_s: float = FUTURE_SLACK_S) -> int:
    """The latest believable sample time: the latest of now, the build time and ``last_file_ms``, plus slack.

    Edge boxes often have no RTC and run offline, so "now" alone can be weeks behind.
    """
    ref = max(int(time.time() * 1000), build_time_ms(), int(last_file_ms or 0))
    return ref + int(slack_s * 1000)


def _iso(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms"


def _sorted_unique(t: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Sort by time and drop repeated timestamps; return how many samples were out of order."""
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


# events of the clock guard: ("data", t, x) in file order, or ("jump", "forward"|"backward", None)
_Event = tuple[str, object, object]


class _ClockGuard:
    """Splits one sensor's samples (in file order) at clock jumps; drops implausible and stray times.

    A step ``d`` to the next sample is normal when ``-tol_ms <= d <= max_jump_ms``.
    After an abnormal step the samples are held: if, within ``hold`` samples, one
    comes back near the last accepted time, the held run was a corrupted stretch
    and is dropped; otherwise the jump is believed and a ``("jump", kind)`` event
    precedes the held samples. A forward step that is normal but longer than
    ``tol_ms`` (a gap) is held too, as a *leap*: if the stream comes back within
    ``tol_ms`` of the last accepted time, the leap was a spike (a wrong time a few
    seconds or hours ahead) and only it is dropped; otherwise the held samples are
    plain data after a gap (no jump event), also when the run stops for another
    reason. Times after ``horizon_ms`` are dropped as
    implausible. State carries across calls, so the split does not depend on how
    the stream is chunked. Work is linear in the samples.
    """

    def __init__(self, horizon_ms: int, max_jump_ms: int, tol_ms: int, hold: int = JUMP_HOLD_SAMPLES) -> None:
        self.horizon = horizon_ms
        self.max_jump = max_jump_ms
        self.tol = tol_ms
        self.hold = max(1, hold)
        self.last: int | None = None  # last accepted time
        self._held_t: list[np.ndarray] = []
        self._held_x: list[np.ndarray] = []
        self._held_n = 0
        self._held_last = 0
        self._held_leap = False  # the held run began with a normal forward step longer than tol (a gap?)
        self._in_future = False
        self._starting = True  # the first ``hold`` samples are gathered to find the starting clock
        self._start_t: list[np.ndarray] = []
        self._start_x: list[np.ndarray] = []
        self._start_n = 0
        self.jumps = 0
        self.stray = 0  # samples of runs that jumped away and came back (dropped)
        self.future = 0  # samples after the horizon (dropped)
        self.accepted = 0

    def _normal(self, d: np.ndarray) -> np.ndarray:
        return (d >= -self.tol) & (d <= self.max_jump)

    def push(self, t: np.ndarray, x: np.ndarray) -> list[_Event]:
        if len(t):
            bad = t > self.horizon
            if bad.any():
                entering = bad & ~np.concatenate(([self._in_future], bad[:-1]))
                self.jumps += int(entering.sum())
                self.future += int(bad.sum())
                self._in_future = bool(bad[-1])
                t, x = t[~bad], x[~bad]
            else:
                self._in_future = False
        if self._starting:
            if len(t):
                self._start_t.append(t)
                self._start_x.append(x)
                self._start_n += len(t)
            if self._start_n < self.hold:
                return []
            t, x = self._end_start()
        return self._main(t, x)

    def finish(self) -> list[_Event]:
        events: list[_Event] = []
        if self._starting:
            events = self._main(*self._end_start())
        return events + (self._believe() if self._held_n else [])

    def _end_start(self) -> tuple[np.ndarray, np.ndarray]:
        """The first ``hold`` samples decide the starting clock: samples before the first one near their
        median time are strays (a wrong time on the very first message)."""
        self._starting = False
        if not self._start_t:
            return np.empty(0, np.int64), np.empty((0, 3), np.float32)
        t, x = np.concatenate(self._start_t), np.concatenate(self._start_x)
        self._start_t, self._start_x = [], []
        if not len(t):
            return t, x
        first = t[: self.hold]  # the first ``hold`` samples whatever the chunking
        mid = int(np.sort(first)[len(first) // 2])
        k = int(np.argmax(np.abs(first - mid) <= self.max_jump))
        if k:
            self.jumps += 1
            self.stray += k
        return t[k:], x[k:]

    def _main(self, t: np.ndarray, x: np.ndarray) -> list[_Event]:
        events = self._scan(t, x)
        # runs of data with only dropped strays between them become one event (cheap when jumps are dense)
        out: list[_Event] = []
        run_t: list[np.ndarray] = []
        run_x: list[np.ndarray] = []
        run_max = 0
        for ev in events:
            if ev[0] == "data":
                pt, px = ev[1], ev[2]
                assert isinstance(pt, np.ndarray) and isinstance(px, np.ndarray)
                if run_t:  # as if fed separately: a later piece keeps only what is past the earlier ones
                    keep = pt > run_max
                    pt, px = pt[keep], px[keep]
                if len(pt):
                    run_t.append(pt)
                    run_x.append(px)
                    run_max = max(run_max, int(pt.max())) if len(run_t) > 1 else int(pt.max())
                continue
            if run_t:
                out.append(("data", np.concatenate(run_t), np.concatenate(run_x)))
                run_t, run_x = [], []
            out.append(ev)
        if run_t:
            out.append(("data", np.concatenate(run_t), np.concatenate(run_x)))
        return out

    def _scan(self, t: np.ndarray, x: np.ndarray) -> list[_Event]:
        events: list[_Event] = []
        i, n = 0, len(t)
        while i < n:
            if self._held_n == 0:
                j = self._first_abnormal(t, i, int(t[i]) if self.last is None else self.last)
                if j > i:
                    events.append(("data", t[i:j], x[i:j]))
                    self.accepted += j - i
                    self.last = int(t[j - 1])
                if j < n:
                    self._hold_first(t[j : j + 1], x[j : j + 1])
                    i = j + 1
                else:
                    i = n
                continue
            m = min(n - i, self.hold - self._held_n)
            k, back = self._held_stop(t, i, m)
            if k:
                self._hold(t[i : i + k], x[i : i + k])
            i += k
            if k == m:
                if self._held_n >= self.hold:
                    events.extend(self._believe())
                continue
            if self._held_leap and not back:  # data after a gap, then some other step: keep it
                events.extend(self._believe())
                continue  # t[i] is scanned again from the new last time
            # the run stopped: it came back (stray run) or jumped again (garbage); drop what was held
            self.jumps += 1
            self.stray += self._held_n
            self._clear()
            if not back:
                self._hold_first(t[i : i + 1], x[i : i + 1])
                i += 1
        return events

    def _first_abnormal(self, t: np.ndarray, i: int, prev: int) -> int:
        """Index of the first sample from i whose step from its predecessor is abnormal (len(t) if none)."""
        n, lo, hi = len(t), -self.tol, self.tol  # a longer forward step is a leap: held (see the class)
        for j in range(i, min(n, i + 8)):  # a few in Python first: cheap when jumps are dense
            v = int(t[j])
            if not lo <= v - prev <= hi:
                return j
            prev = v
        i = min(n, i + 8)
        size = 64
        while i < n:
            s = t[i : i + size]
            d = np.diff(s, prepend=prev)
            ab = (d < lo) | (d > hi)
            if ab.any():
                return i + int(np.argmax(ab))
            prev = int(s[-1])
            i += len(s)
            size = min(size * 4, 1 << 16)
        return n

    def _held_stop(self, t: np.ndarray, i: int, m: int) -> tuple[int, bool]:
        """Where a held run stops within t[i:i+m]: (offset, True) at a sample back near the last accepted
        time, (offset, False) at another jump, (m, False) if it goes on."""
        assert self.last is not None
        last, prev, lo, hi = self.last, self._held_last, -self.tol, self.max_jump
        back_hi = self.tol if self._held_leap else hi  # after a leap, "back" means back on the old timeline
        j = 0
        while j < min(m, 8):
            v = int(t[i + j])
            if lo <= v - last <= back_hi:
                return j, True
            if not lo <= v - prev <= hi:
                return j, False
            prev = v
            j += 1
        size = 64
        while j < m:
            s = t[i + j : i + min(m, j + size)]
            back = (s - last >= lo) & (s - last <= back_hi)
            stop = back | ~self._normal(np.diff(s, prepend=prev))
            if stop.any():
                k = int(np.argmax(stop))
                return j + k, bool(back[k])
            prev = int(s[-1])
            j += len(s)
            size = min(size * 4, 1 << 16)
        return m, False

    def _hold(self, t: np.ndarray, x: np.ndarray) -> None:
        if len(t):
            self._held_t.append(t)
            self._held_x.append(x)
            self._held_n += len(t)
            self._held_last = int(t[-1])

    def _hold_first(self, t: np.ndarray, x: np.ndarray) -> None:
        """Start holding at an abnormal step or a leap (``t`` is its one sample)."""
        d = int(t[0]) - self.last if self.last is not None else 0
        self._held_leap = self.tol < d <= self.max_jump
        self._hold(t, x)

    def _clear(self) -> None:
        self._held_t, self._held_x, self._held_n = [], [], 0

    def _believe(self) -> list[_Event]:
        t, x = np.concatenate(self._held_t), np.concatenate(self._held_x)
        kind = "backward" if self.last is not None and int(t[0]) < self.last - self.tol else "forward"
        leap, self._held_leap = self._held_leap, False
        self._clear()
        self.accepted += len(t)
        self.last = int(t[-1])
        if leap:  # a gap, not a clock jump: the gap itself splits the recording later
            return [("data", t, x)]
        self.jumps += 1
        return [("jump", kind, None), ("data", t, x)]


class _Sensor:
    """Raw samples of one sensor not yet consumed by the grid, in SI units, sorted by time.

    ``merge`` (the gyroscope) inserts samples that arrive behind the buffer's end
    by time; otherwise (the accelerometer) such samples are dropped.
    """

    def __init__(self, *, merge: bool = False) -> None:
        self.merge = merge
        self.t = np.empty(0, np.int64)
        self.x = np.empty((0, 3), np.float32)

    def add(self, t: np.ndarray, x: np.ndarray) -> None:
        if not len(t):
            return
        if len(self.t) and t[0] <= self.t[-1]:
            if self.merge:  # insert by time (both sorted); a time already held keeps its first sample
                pos = np.searchsorted(self.t, t, side="left")
                dup = (pos < len(self.t)) & (self.t[np.minimum(pos, len(self.t) - 1)] == t)
                t, x, pos = t[~dup], x[~dup], pos[~dup]
                self.t = np.insert(self.t, pos, t)
                self.x = np.insert(self.x, pos, x, axis=0)
                self._cap()
                return
            # a chunk overlapping the previous one: keep only what is new
            keep = t > self.t[-1]
            t, x = t[keep], x[keep]
        self.t = np.concatenate((self.t, t))
        self.x = np.concatenate((self.x, x))
        self._cap()

    def _cap(self) -> None:
        if len(self.t) > BUFFER_CAP:
            self.t, self.x = self.t[-BUFFER_CAP:], self.x[-BUFFER_CAP:]

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
        js = np.flatnonzero(np.diff(t) > max_gap_ms)
        if len(js):
            lo = np.searchsorted(tg, t[js], side="right")
            hi = np.searchsorted(tg, t[js + 1], side="left")
            mark = np.zeros(n + 1, np.int64)
            np.add.at(mark, lo, 1)
            np.add.at(mark, hi, -1)
            valid &= np.cumsum(mark[:n]) <= 0
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
            if stride <= 0:
                return None
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

    def reset(self) -> None:
        self.t = np.empty(0, np.int64)
        self.x = np.empty((0, 3), np.float32)


class StreamWindower:
    """Fuse accelerometer and gyroscope, resample to ``rate_hz`` and cut windows, chunk by chunk.

    The grid is ``t0 + k / rate_hz`` from the first accelerometer sample (and
    again from the first sample after a backward clock jump). A grid point is
    kept only where every sensor has samples around it no further apart than
    ``max_gap_s``; runs of kept points are the recording's segments, and a window
    never spans two segments. Without a gyroscope, the gyro channels are 0.

    ``name`` is used in error messages; ``last_file_ms`` (the latest data time of
    the previous file) helps judge which times are plausible (see
    :func:`plausible_until_ms`). A recording none of whose accelerometer times is
    plausible is refused with :class:`InputError` by :meth:`finish`.
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
        name: str = "the recording",
        last_file_ms: int | None = None,
        max_jump_s: float = MAX_JUMP_S,
        horizon_ms: int | None = None,
    ) -> None:
        if window <= 0 or step <= 0:
            raise ValueError("window and step must be positive")
        self.rate_hz = float(rate_hz)
        self.window, self.step = int(window), int(step)
        self.dt_ms = 1000.0 / self.rate_hz
        self.max_gap_ms = round(max_gap_s * 1000)
        self.has_gyro = has_gyro
        self.accel_unit = accel_unit
        self.name = name
        self.horizon_ms = horizon_ms if horizon_ms is not None else plausible_until_ms(last_file_ms)
        max_jump_ms = max(round(max_jump_s * 1000), self.max_gap_ms)
        self._guards = (
            _ClockGuard(self.horizon_ms, max_jump_ms, self.max_gap_ms),
            _ClockGuard(self.horizon_ms, max_jump_ms, self.max_gap_ms),
        )
        self._sat = np.float32(saturation_g * ACCEL_MS2_PER_G)
        self._gsat = np.float32(saturation_dps)  # Garmin gyroscopes clip at +-2000 deg/s
        self._gyro_saturated = 0
        self._acc, self._gyr = _Sensor(), _Sensor(merge=True)
        self._gyr_last: int | None = None
        self._t0: int | None = None
        self._next_k = 0
        self._run = np.empty((0, 6), np.float32)  # samples of the open segment not yet windowed away
        self._run_k0 = 0  # grid index of _run[0]
        self._run_end_k = -2  # grid index after the last sample appended to _run
        # quality counters
        self._n_acc = 0
        self._n_gyr = 0
        self._fed_acc = 0
        self._first_t: int | None = None
        self._last_t: int | None = None
        self._span_ms = 0  # duration of the segments closed by clock jumps
        self._dts: list[np.ndarray] = []
        self._gaps = 0
        self._gap_ms = 0
        self._saturated = 0
        self._disorder = 0
        self._segments = 0
        self._grid_kept = 0
        self._windows = 0
        self._finished = False

    # -- feeding -----------------------------------------------------------

    def feed(self, chunk: Chunk) -> WindowSet:
        parts: list[WindowSet] = []
        if self.has_gyro and chunk.gyro is not None and len(chunk.gyro):
            self._gyro_events(self._guards[1].push(chunk.gyro.t_ms, chunk.gyro.xyz))
        self._accel_events(self._guards[0].push(chunk.accel.t_ms, chunk.accel.xyz), parts)
        self._fed_acc += len(chunk.accel)
        parts.append(self._advance(final=False))
        return self._join(parts)

    def finish(self) -> WindowSet:
        parts: list[WindowSet] = []
        if self.has_gyro:
            self._gyro_events(self._guards[1].finish())
        self._accel_events(self._guards[0].finish(), parts)
        parts.append(self._advance(final=True))
        if not self._finished:
            self._finished = True
            self._report()
        return self._join(parts)

    def _report(self) -> None:
        g = self._guards[0]
        if self._fed_acc and not g.accepted:
            raise InputError(
                f"{self.name}: none of its {self._fed_acc} accelerometer times is plausible (all after "
                f"{_iso(self.horizon_ms)}, a year past the latest of now, this build and the last file): "
                "the device clock is wrong; set the watch's time and record again"
            )
        jumps = self.clock_jumps()
        if jumps:
            log.warning(
                "%s: %d clock jump%s in the timestamps (%d samples with implausible or stray times dropped): "
                "split into segments; check the device clock",
                self.name,
                jumps,
                "" if jumps == 1 else "s",
                sum(gd.stray + gd.future for gd in self._guards),
            )

    def clock_jumps(self) -> int:
        """Clock jumps seen in the sensor whose timestamps jumped most (the two usually jump together)."""
        return max(g.jumps for g in self._guards)

    def _gyro_events(self, events: list[_Event]) -> None:
        for kind, t, x in events:
            if kind != "data":
                continue
            assert isinstance(t, np.ndarray) and isinstance(x, np.ndarray)
            gt, gx, dis = _sorted_unique(t, x)
            self._disorder += dis
            self._n_gyr += len(gt)
            self._gyro_saturated += int((np.abs(gx) >= self._gsat).any(axis=1).sum())
            self._gyr.add(gt, gx.astype(np.float32, copy=False))
            self._gyr_last = int(t[-1])

    def _accel_events(self, events: list[_Event], parts: list[WindowSet]) -> None:
        if self.accel_unit is None:
            data = [x for kind, _t, x in events if kind == "data"]
            if data:
                try:
                    self.accel_unit = detect_accel_unit(np.concatenate(data))  # type: ignore[arg-type]
                except InputError as e:
                    raise type(e)(f"{self.name}: {e}") from None
        for kind, t, x in events:
            if kind == "jump":
                self._close_span()
                if t == "backward":
                    # a new clock: window what the old one still holds, then start a new grid
                    parts.append(self._advance(final=True, close=True))
                    self._acc.reset()
                    self._t0 = None
                    self._next_k = 0
                    self._run = np.empty((0, 6), np.float32)
                    self._run_end_k = -2
                continue
            assert isinstance(t, np.ndarray) and isinstance(x, np.ndarray)
            at, ax, dis = _sorted_unique(t, x)
            self._disorder += dis
            assert self.accel_unit is not None
            ax = accel_to_ms2(ax, self.accel_unit)
            self._account_accel(at, ax)
            self._acc.add(at, ax)

    def _close_span(self) -> None:
        if self._first_t is not None and self._last_t is not None:
            self._span_ms += self._last_t - self._first_t
        self._first_t = self._last_t = None

    def _account_accel(self, t: np.ndarray, x: np.ndarray) -> None:
        if self._first_t is None:
            self._first_t = int(t[0])
        prev = self._last_t
        self._last_t = max(int(t[-1]), prev) if prev is not None else int(t[-1])
        self._n_acc += len(t)
        d = np.diff(t) if prev is None else np.diff(np.concatenate(([prev], t)))
        if len(d):
            self._dts.append(np.median(d).reshape(1))
            big = d > self.max_gap_ms
            self._gaps += int(big.sum())
            self._gap_ms += int(d[big].sum())
        self._saturated += int((np.abs(x) >= self._sat).any(axis=1).sum())

    def _advance(self, final: bool, close: bool = False) -> WindowSet:
        """Resample and window up to what every sensor has delivered (``close``: all the accelerometer holds,
        before a backward clock jump starts a new grid; gyroscope samples are then kept for it)."""
        if len(self._acc.t) == 0:
            return self._empty()
        if self._t0 is None:
            self._t0 = int(self._acc.t[0])
        limit = int(self._acc.t[-1])
        crowded = len(self._acc.t) >= BUFFER_CAP // 2  # the gyroscope lags too far: move on without it
        if self.has_gyro and not crowded and not close:
            if self._gyr_last is None:
                if not final:
                    return self._empty()
                limit = -1  # no gyro at all: nothing is valid
            else:
                limit = min(limit, self._gyr_last)
        last_k = int(np.floor((limit - self._t0) / self.dt_ms)) if limit >= self._t0 else -1
        if last_k < self._next_k:
            return self._empty()
        parts = [self._resample(ks) for ks in self._grid(self._next_k, last_k)]
        self._next_k = last_k + 1
        t_next = self._t0 + round(self._next_k * self.dt_ms)
        self._acc.drop_before(t_next)
        if not close:
            self._gyr.drop_before(t_next)
        return self._join(parts)

    def _grid(self, k_first: int, k_last: int) -> Iterator[np.ndarray]:
        """Grid indexes k_first..k_last near stretches the accelerometer covers, GRID_BATCH at a time.

        Points inside gaps over max_gap are invalid anyway and are skipped (two
        invalid points are kept at each edge, so segments still end there).
        """
        t, t0, dt = self._acc.t, self._t0, self.dt_ms
        assert t0 is not None
        brk = np.flatnonzero(np.diff(t) > self.max_gap_ms)
        ta = t[np.concatenate(([0], brk + 1))]
        tb = t[np.concatenate((brk, [len(t) - 1]))]
        klo = np.floor((ta - t0) / dt).astype(np.int64) - 1
        khi = np.ceil((tb - t0) / dt).astype(np.int64) + 1
        klo = np.maximum(klo, k_first)
        khi = np.minimum(khi, k_last)
        if len(khi) > 1:  # intervals are sorted: clip each start past the previous end
            klo[1:] = np.maximum(klo[1:], np.maximum.accumulate(khi)[:-1] + 1)
        keep = khi >= klo
        klo, khi = klo[keep], khi[keep]
        if not len(klo):
            return
        lengths = khi - klo + 1
        ends = np.cumsum(lengths)
        starts = ends - lengths
        total = int(ends[-1])
        for s in range(0, total, GRID_BATCH):
            idx = np.arange(s, min(s + GRID_BATCH, total), dtype=np.int64)
            iv = np.searchsorted(ends, idx, side="right")
            yield klo[iv] + (idx - starts[iv])

    def _resample(self, ks: np.ndarray) -> WindowSet:
        assert self._t0 is not None
        tg = self._t0 + np.round(ks * self.dt_ms).astype(np.int64)
        acc, valid = self._acc.sample(tg, self.max_gap_ms)
        if self.has_gyro:
            gyr, gvalid = self._gyr.sample(tg, self.max_gap_ms)
            valid &= gvalid
        else:
            gyr = np.zeros_like(acc)
        fused = np.concatenate((acc, gyr), axis=1)
        self._grid_kept += int(valid.sum())
        return self._windows_from(ks, fused, valid)

    def _windows_from(self, ks: np.ndarray, fused: np.ndarray, valid: np.ndarray) -> WindowSet:
        assert self._t0 is not None
        starts: list[np.ndarray] = []
        wins: list[np.ndarray] = []
        # boundaries of runs of valid points
        edges = np.flatnonzero(np.diff(np.concatenate(([0], valid.astype(np.int8), [0]))))
        for a, b in zip(edges[::2], edges[1::2], strict=False):
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

    def _join(self, parts: list[WindowSet]) -> WindowSet:
        parts = [p for p in parts if len(p)]
        if not parts:
            return self._empty()
        if len(parts) == 1:
            return parts[0]
        return WindowSet(np.concatenate([p.start_ms for p in parts]), np.concatenate([p.windows for p in parts]))

    def _empty(self) -> WindowSet:
        return WindowSet(np.empty(0, np.int64), np.empty((0, self.window, 6), np.float32))

    # -- figures -----------------------------------------------------------

    def quality(self) -> dict[str, float]:
        """Data-quality figures of everything fed so far."""
        med_dt = float(np.median(np.concatenate(self._dts))) if self._dts else 0.0
        open_ms = self._last_t - self._first_t if self._first_t is not None and self._last_t is not None else 0
        span_s = (self._span_ms + open_ms) / 1000.0
        return {
            "samples_accel": self._n_acc,
            "samples_gyro": self._n_gyr,
            "gyro_present": 1.0 if (self.has_gyro and self._n_gyr) else 0.0,
            "native_rate_hz": round(1000.0 / med_dt, 3) if med_dt > 0 else 0.0,
            "duration_s": span_s,
            "gaps": self._gaps,
            "gap_s": self._gap_ms / 1000.0,
            "segments": self._segments,
            "coverage": min(1.0, (self._grid_kept / self.rate_hz) / span_s) if span_s > 0 else 0.0,
            "saturated_share": self._saturated / self._n_acc if self._n_acc else 0.0,
            "gyro_saturated_share": self._gyro_saturated / self._n_gyr if self._n_gyr else 0.0,
            "out_of_order": self._disorder,
            "clock_jumps": self.clock_jumps(),
            "clock_dropped": sum(g.stray + g.future for g in self._guards),
            "windows": self._windows,
        }

    def last_time_ms(self) -> int | None:
        """The latest accepted accelerometer time (for the next file's plausibility reference)."""
        return self._guards[0].last


def recording_windows(
    recording: Recording,
    *,
    rate_hz: float,
    window: int,
    step: int,
    max_gap_s: float = 1.0,
    last_file_ms: int | None = None,
) -> WindowSet:
    """All windows of a recording at once (for training and tests; the agent streams)."""
    sw = StreamWindower(
        rate_hz=rate_hz,
        window=window,
        step=step,
        max_gap_s=max_gap_s,
        has_gyro=recording.has_gyro,
        accel_unit=recording.accel_unit,
        name=recording.name,
        last_file_ms=last_file_ms,
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

"""Recordings unlike the training data, and continuous recordings as FIT exports (tests and bench).

Every shift returns ``(n, 6)`` float32 samples in SI units (acc m/s², gravity kept;
gyro deg/s) at ``rate_hz``; :func:`write_samples_fit` writes such samples as a real
FIT export through tests/fitgen.py.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

G = 9.80665
RATE = 50.0


def _fitgen():
    if "fitgen" in sys.modules:
        return sys.modules["fitgen"]
    path = Path(__file__).resolve().parent / "fitgen.py"
    spec = importlib.util.spec_from_file_location("har_edge_fitgen_shifts", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def write_samples_fit(path: Path, samples: np.ndarray, *, rate_hz: float = RATE, start: datetime | None = None) -> Path:
    """A FIT export holding exactly ``samples`` (SI units) at ``rate_hz`` (accelerometer written in mg)."""
    fitgen = _fitgen()
    x = np.asarray(samples, dtype=np.float64)

    def signal(t: np.ndarray, _rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        idx = np.clip(np.rint(t * rate_hz).astype(np.int64), 0, len(x) - 1)
        return x[idx, :3] / G * 1000.0, x[idx, 3:]

    kw = {"start": start} if start is not None else {}
    fitgen.write_imu_fit(path, rate_hz=rate_hz, seconds=len(x) / rate_hz, signal=signal, engine="fast", **kw)
    return Path(path)


# -- shifts --------------------------------------------------------------------------------------


def vibrating_mount(seconds: float, seed: int, rate_hz: float = RATE) -> np.ndarray:
    """An action camera on a fixed mount of a vehicle: constant gravity, strong 12-23 Hz vibration."""
    rng = np.random.default_rng([seed, 101])
    n = int(seconds * rate_hz)
    t = np.arange(n) / rate_hz
    up = rng.normal(size=3)
    up /= np.linalg.norm(up)
    acc = np.outer(np.ones(n), up * G)
    gyr = np.zeros((n, 3))
    for _ in range(3):
        f = rng.uniform(12, 23)
        acc += np.outer(np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3)), rng.normal(0, 2.5, 3))
        gyr += np.outer(np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3)), rng.normal(0, 15, 3))
    acc += rng.normal(0, 0.6, (n, 3))
    gyr += rng.normal(0, 3, (n, 3))
    return np.concatenate([acc, gyr], axis=1).astype(np.float32)


def lying_still(seconds: float, seed: int, rate_hz: float = RATE) -> np.ndarray:
    """A sensor lying still on a table: gravity on one axis, sensor noise only, a small gyro bias."""
    rng = np.random.default_rng([seed, 202])
    n = int(seconds * rate_hz)
    acc = np.outer(np.ones(n), np.array([0.05, -0.1, G])) + rng.normal(0, 0.012, (n, 3))
    gyr = rng.normal(0, 0.05, (n, 3)) + rng.normal(0, 0.2, 3)
    return np.concatenate([acc, gyr], axis=1).astype(np.float32)


def swap_axes(samples: np.ndarray) -> np.ndarray:
    """x and z exchanged on both sensors (a device mounted turned by 90°, or a wrong channel map)."""
    x = np.asarray(samples, dtype=np.float32).copy()
    x[:, [0, 2]] = x[:, [2, 0]]
    x[:, [3, 5]] = x[:, [5, 3]]
    return x


def gyro_rad_as_deg(samples: np.ndarray) -> np.ndarray:
    """A gyroscope in rad/s stored as deg/s: 57x too small (gravity detection corrects the accelerometer only)."""
    x = np.asarray(samples, dtype=np.float32).copy()
    x[:, 3:] *= np.float32(np.pi / 180)
    return x


def gyro_10x(samples: np.ndarray) -> np.ndarray:
    """A gyroscope reading ten times the true rate (a wrong range setting)."""
    x = np.asarray(samples, dtype=np.float32).copy()
    x[:, 3:] *= 10
    return x


#: shifts applied to an in-distribution recording
RECORDING_SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "axes_swapped": swap_axes,
    "gyro_rad_as_deg": gyro_rad_as_deg,
    "gyro_10x": gyro_10x,
}
#: shifts that are recordings of their own: (make(seconds, seed), seconds)
SOURCE_SHIFTS: dict[str, tuple[Callable[[float, int], np.ndarray], float]] = {
    "vibrating_mount": (vibrating_mount, 600.0),
    "lying_still_1h": (lying_still, 3600.0),
}


def start_of(i: int) -> datetime:
    return datetime(2026, 3, 1, 8, 0, tzinfo=UTC) + timedelta(hours=2 * i)

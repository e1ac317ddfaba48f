"""Seeded, physically plausible 6-channel IMU recordings for tests and demos.

Not a substitute for real data; it is shaped so that a model must learn the
cues real data has:

* the accelerometer reads +1 g along "up" at rest (gravity kept), and up in the
  device frame depends on the posture: upright for standing and the walking
  variants, tilted 30-55° for sitting, near horizontal for lying (on the back
  or a side); each subject wears the device a little rotated;
* gait at 1.5-3 Hz (downstairs fastest, upstairs slowest), a vertical bounce at
  the step frequency with a harmonic, sway at half of it, heel-strike impacts
  (strongest downstairs), a trunk pitch rate stronger on stairs, with step-to-
  step jitter of amplitude and frequency;
* body sway and breathing-scale motion at rest; sensor white noise and a gyro
  bias per subject.

Each subject gets one recording: every activity for ``seconds_per_activity`` in
a random order, joined by two-second unlabelled transitions (label -1).
"""

from __future__ import annotations

import numpy as np

from har_edge.agent.preprocess import ACCEL_MS2_PER_G
from har_edge.trainer.data import LabelledRecording

G = ACCEL_MS2_PER_G

#: step frequency range (Hz), vertical amplitude (m/s²), pitch-rate amplitude (deg/s), impact (m/s²)
_GAIT = {
    "walking": ((1.7, 2.1), 2.6, 25.0, 2.0),
    "walking_upstairs": ((1.5, 1.8), 2.0, 45.0, 1.2),
    "walking_downstairs": ((2.1, 2.8), 3.2, 35.0, 5.0),
}
#: tilt of "up" away from the device's +x axis (degrees) per posture
_POSTURE_TILT = {"standing": (0.0, 6.0), "sitting": (30.0, 55.0), "lying": (80.0, 100.0)}
_TRANSITION_S = 2.0


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A random rotation of at most ``max_deg`` about a random axis (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(0, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _up_vector(activity: str, rng: np.random.Generator) -> np.ndarray:
    posture = activity if activity in _POSTURE_TILT else "standing"
    lo, hi = _POSTURE_TILT[posture]
    tilt = np.deg2rad(rng.uniform(lo, hi))
    # lying: on the back (tilt towards +z) or on a side (towards ±y)
    azimuth = rng.choice([0.0, np.pi / 2, -np.pi / 2]) if posture == "lying" else rng.normal(0, 0.2)
    return np.array([np.cos(tilt), np.sin(tilt) * np.sin(azimuth), np.sin(tilt) * np.cos(azimuth)])


def _smooth_noise(rng: np.random.Generator, n: int, rate_hz: float, cutoff_hz: float) -> np.ndarray:
    """Unit-variance noise low-passed by a moving average of ~1/cutoff seconds."""
    width = max(1, int(rate_hz / cutoff_hz))
    x = np.convolve(rng.normal(size=n + width), np.ones(width) / np.sqrt(width), mode="valid")[:n]
    return x


def activity_signal(
    activity: str,
    seconds: float,
    rng: np.random.Generator,
    *,
    rate_hz: float = 50.0,
    mount: np.ndarray | None = None,
    gyro_bias: np.ndarray | None = None,
) -> np.ndarray:
    """``(n, 6)`` float32 samples of one activity: acc m/s² (gravity kept), gyro deg/s, device frame."""
    n = int(round(seconds * rate_hz))
    mount = np.eye(3) if mount is None else mount
    up = _up_vector(activity, rng)
    # body frame: up, forward (perpendicular, in the x-z plane when upright), lateral
    fwd = np.cross(up, [0.0, 1.0, 0.0])
    if np.linalg.norm(fwd) < 1e-6:
        fwd = np.cross(up, [0.0, 0.0, 1.0])
    fwd /= np.linalg.norm(fwd)
    lat = np.cross(up, fwd)
    acc = np.outer(np.ones(n), up * G)
    gyr = np.zeros((n, 3))
    if activity in _GAIT:
        (f_lo, f_hi), a_v, pitch, impact = _GAIT[activity]
        f0 = rng.uniform(f_lo, f_hi)
        freq = f0 * (1 + 0.03 * _smooth_noise(rng, n, rate_hz, 0.3))
        phase = 2 * np.pi * np.cumsum(freq) / rate_hz + rng.uniform(0, 2 * np.pi)
        amp = 1 + 0.15 * _smooth_noise(rng, n, rate_hz, 0.5)
        vert = a_v * amp * (np.sin(phase) + 0.35 * np.sin(2 * phase + 0.7))
        strike = impact * amp * np.maximum(np.sin(phase - 0.4), 0) ** 8
        vert += strike - strike.mean()  # the body does not accelerate on average: the mean stays 1 g
        forward = 0.45 * a_v * amp * np.sin(phase + np.pi / 2)
        side = 0.35 * a_v * amp * np.sin(phase / 2)
        acc += np.outer(vert, up) + np.outer(forward, fwd) + np.outer(side, lat)
        gyr += np.outer(pitch * amp * np.sin(phase + 0.3), lat)
        gyr += np.outer(0.6 * pitch * amp * np.sin(phase / 2 + 1.1), up)
        gyr += np.outer(0.4 * pitch * amp * np.sin(phase / 2), fwd)
    else:
        sway = 0.08 if activity == "standing" else 0.04
        acc += np.outer(sway * _smooth_noise(rng, n, rate_hz, 0.5), fwd)
        acc += np.outer(0.5 * sway * _smooth_noise(rng, n, rate_hz, 0.5), lat)
        gyr += np.outer(1.5 * sway * 10 * _smooth_noise(rng, n, rate_hz, 0.8), lat)
    acc = acc @ mount.T + rng.normal(0, 0.04, size=(n, 3))
    gyr = gyr @ mount.T + rng.normal(0, 0.4, size=(n, 3))
    if gyro_bias is not None:
        gyr += gyro_bias
    return np.concatenate([acc, gyr], axis=1).astype(np.float32)


def generate(
    labels: tuple[str, ...],
    *,
    subjects: int = 12,
    seconds_per_activity: float = 60.0,
    seed: int = 7,
    rate_hz: float = 50.0,
) -> list[LabelledRecording]:
    """One recording per subject (subject ids ``"1"..str(subjects)``), reproducible from ``seed``."""
    unknown = [a for a in labels if a not in _GAIT and a not in _POSTURE_TILT]
    if unknown:
        raise ValueError(
            f"the synthetic generator knows no activity {unknown}: use {sorted({**_GAIT, **_POSTURE_TILT})}"
        )
    out: list[LabelledRecording] = []
    for subject in range(1, subjects + 1):
        rng = np.random.default_rng([seed, subject])
        mount = _rotation(rng, 12.0)
        bias = rng.normal(0, 0.8, size=3)
        parts: list[np.ndarray] = []
        labs: list[np.ndarray] = []
        prev: np.ndarray | None = None
        for idx in rng.permutation(len(labels)):
            sig = activity_signal(labels[idx], seconds_per_activity, rng, rate_hz=rate_hz, mount=mount, gyro_bias=bias)
            if prev is not None:
                m = int(_TRANSITION_S * rate_hz)
                w = np.linspace(0, 1, m)[:, None]
                trans = (1 - w) * prev[-1] + w * sig[0] + rng.normal(0, 0.5, size=(m, 6))
                parts.append(trans.astype(np.float32))
                labs.append(np.full(m, -1, np.int16))
            parts.append(sig)
            labs.append(np.full(len(sig), idx, np.int16))
            prev = sig
        out.append(
            LabelledRecording(f"synthetic-s{subject:02d}", str(subject), np.concatenate(parts), np.concatenate(labs))
        )
    return out

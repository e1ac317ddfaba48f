"""Channel names and units of a model's input, and the conversion of the agent's stream into them.

The agent's fused stream is always ``acc_x, acc_y, acc_z`` in m/s² (gravity
kept) and ``gyro_x, gyro_y, gyro_z`` in deg/s (:data:`STREAM`). A model may
declare its input channels in any order, under the common spellings
(``acc_x``, ``Ax``, ``accel_x``, ``gyr_z``, ``Gz``...), each in one of the units
of its sensor (:data:`UNITS`). :class:`ChannelMap` turns stream windows into the
model's channels and units; an unknown name or unit is refused, named.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from har_edge.agent.errors import ManifestError

ACCEL_MS2_PER_G = 9.80665

#: the agent's stream: (canonical name, unit) in column order
STREAM = (
    ("acc_x", "m/s^2"),
    ("acc_y", "m/s^2"),
    ("acc_z", "m/s^2"),
    ("gyro_x", "deg/s"),
    ("gyro_y", "deg/s"),
    ("gyro_z", "deg/s"),
)

#: per sensor: spelling of a unit -> (canonical unit, factor from the stream's unit to it)
UNITS: dict[str, dict[str, tuple[str, float]]] = {
    "acc": {
        "m/s^2": ("m/s^2", 1.0),
        "m/s2": ("m/s^2", 1.0),
        "m/s²": ("m/s^2", 1.0),
        "mps2": ("m/s^2", 1.0),
        "g": ("g", 1.0 / ACCEL_MS2_PER_G),
        "mg": ("mg", 1000.0 / ACCEL_MS2_PER_G),
        "milli-g": ("mg", 1000.0 / ACCEL_MS2_PER_G),
        "millig": ("mg", 1000.0 / ACCEL_MS2_PER_G),
    },
    "gyro": {
        "deg/s": ("deg/s", 1.0),
        "dps": ("deg/s", 1.0),
        "°/s": ("deg/s", 1.0),
        "rad/s": ("rad/s", math.pi / 180.0),
    },
}

_SENSOR_WORDS = {
    "acc": ("acc", "accel", "acceleration", "accelerometer", "calibratedaccel", "a", "linacc"),
    "gyro": ("gyro", "gyr", "gyroscope", "calibratedgyro", "g", "angvel", "w"),
}


def canonical_name(name: str) -> str:
    """``acc_x`` .. ``gyro_z`` for a common spelling of a channel name; ManifestError otherwise."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    m = re.fullmatch(r"([a-z]+?)([xyz])", key)
    if m:
        word, axis = m.groups()
        for sensor, words in _SENSOR_WORDS.items():
            if word in words:
                return f"{sensor}_{axis}"
    raise ManifestError(
        f"channel name {name!r} is not one har-edge knows: name the channels acc_x, acc_y, acc_z, "
        "gyro_x, gyro_y, gyro_z (or Ax/accel_x/gyr_x... spellings)"
    )


def canonical_unit(name: str, unit: str) -> tuple[str, float]:
    """(canonical unit, factor from the stream's unit) for channel ``name``; ManifestError if unknown."""
    sensor = canonical_name(name).split("_")[0]
    got = UNITS[sensor].get(unit.strip()) or UNITS[sensor].get(unit.strip().lower())
    if got is None:
        known = sorted({u for u, _ in UNITS[sensor].values()})
        raise ManifestError(f"channel {name!r} has unit {unit!r}, which har-edge cannot feed: use one of {known}")
    return got


def sensor_of(name: str) -> str:
    return canonical_name(name).split("_")[0]


@dataclass(frozen=True)
class ChannelMap:
    """Stream windows ``(n, w, 6)`` -> model input ``(n, w, k)`` in the model's order and units."""

    index: tuple[int, ...]
    factor: tuple[float, ...]
    names: tuple[str, ...]

    @staticmethod
    def from_channels(channels: Sequence[tuple[str, str]]) -> ChannelMap:
        order = [c for c, _ in STREAM]
        index, factor, seen = [], [], set()
        for name, unit in channels:
            canon = canonical_name(name)
            if canon in seen:
                raise ManifestError(f"channel {name!r} names {canon} a second time: each channel once")
            seen.add(canon)
            index.append(order.index(canon))
            factor.append(canonical_unit(name, unit)[1])
        return ChannelMap(tuple(index), tuple(factor), tuple(n for n, _ in channels))

    @property
    def identity(self) -> bool:
        return self.index == tuple(range(6)) and all(f == 1.0 for f in self.factor)

    def to_model(self, stream: np.ndarray) -> np.ndarray:
        """Stream windows (SI order and units) as the model's raw input (its order, its units)."""
        stream = np.asarray(stream, dtype=np.float32)
        if self.identity:
            return stream
        out = stream[..., list(self.index)]
        np.multiply(out, np.asarray(self.factor, np.float32), out=out)
        return out

    def to_stream(self, model_raw: np.ndarray) -> np.ndarray:
        """The inverse for a full 6-channel map: model-unit windows back to the stream's order and units."""
        model_raw = np.asarray(model_raw, dtype=np.float32)
        out = np.zeros((*model_raw.shape[:-1], 6), np.float32)
        for j, (i, f) in enumerate(zip(self.index, self.factor, strict=True)):
            out[..., i] = model_raw[..., j] / np.float32(f)
        return out

"""Helpers for the trainer tests: small synthetic params, pandas-0.x-style pickles, git/dvc calls."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import yaml

# -- params ----------------------------------------------------------------------


def synthetic_params(root: Path, *, tracking_uri: str, experiment: str = "trainer-tests", **sections: Any) -> Path:
    """A params.yaml for a small synthetic run (8 people x 6 activities x 40 s, a few epochs)."""
    params: dict[str, Any] = {
        "data": {
            "source": "synthetic",
            "cache_dir": "cache",
            "synthetic": {"subjects": 8, "seconds_per_activity": 40, "seed": 3},
        },
        "split": {"test_subjects": [], "val_subjects": 2, "seed": 1},
        "train": {"epochs": 5, "patience": 5, "threads": 2, "filters": [16, 32, 48], "dense": 32},
        "export": {"name": "tcnn", "version": "1.0.0", "representative_windows": 64, "golden_per_class": 2},
        "gate": {"min_int8_accuracy": 0.6, "min_agreement": 0.9},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": experiment, "run_kind": "test"},
        "build_dir": "build",
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            params.setdefault(section, {}).update(values)
        else:
            params[section] = values
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


# -- pickles written the way pandas 0.x wrote them (protocol 2, GLOBAL opcodes) -------


class DataFrame:
    def __reduce__(self):
        import copyreg

        return (copyreg._reconstructor, (DataFrame, object, None), self.__dict__)


class BlockManager:
    def __init__(self, state: tuple) -> None:
        self.state = state

    def __reduce__(self):
        import copyreg

        return (copyreg._reconstructor, (BlockManager, object, None), self.state)


class Index:
    pass


class RangeIndex:
    pass


class _NewIndex:
    def __init__(self, cls: type, state: dict) -> None:
        self.cls, self.state = cls, state

    def __reduce__(self):
        return (_new_Index, (self.cls, self.state))


def _new_Index(cls: type, state: dict) -> Any:
    raise AssertionError("only pickled, never called")


_RENAMES = {
    b"DataFrame": b"pandas.core.frame",
    b"BlockManager": b"pandas.core.internals.managers",
    b"Index": b"pandas.core.indexes.base",
    b"RangeIndex": b"pandas.core.indexes.range",
    b"_new_Index": b"pandas.core.indexes.base",
}


def pandas014_frame_pickle(columns: dict[str, np.ndarray]) -> bytes:
    """A protocol-2 pickle of ``{1: [frame]}`` in pandas 0.14+'s DataFrame layout (as HAPT.pkl.gz)."""
    names = list(columns)
    n = len(next(iter(columns.values())))
    floats = [c for c in names if columns[c].dtype.kind == "f"]
    ints = [c for c in names if columns[c].dtype.kind == "i"]
    order = floats + ints
    items = _NewIndex(Index, {"data": np.array(order, dtype=object), "name": None})
    rows = _NewIndex(RangeIndex, {"name": None, "start": 0, "stop": n, "step": 1})
    blocks = [
        {"values": np.stack([columns[c] for c in floats]), "mgr_locs": slice(0, len(floats), 1)},
        {"values": np.stack([columns[c] for c in ints]), "mgr_locs": slice(len(floats), len(order), 1)},
    ]
    state = (
        [items, rows],
        [b["values"] for b in blocks],
        [items, items],
        {"0.14.1": {"axes": [items, rows], "blocks": blocks}},
    )
    frame = DataFrame()
    frame.__dict__ = {"_data": BlockManager(state), "_typ": "dataframe", "_metadata": [], "attrs": {}}
    data = pickle.dumps({1: [frame]}, protocol=2)
    here = __name__.encode()
    for name, module in _RENAMES.items():
        data = data.replace(b"c" + here + b"\n" + name + b"\n", b"c" + module + b"\n" + name + b"\n")
    assert here not in data, "every helper class must have been renamed to its pandas name"
    return data


# -- Garmin study tables (the layout agent.decode.tables reads) ----------------------


def write_study_pair(
    folder: Path, prefix: str, samples: np.ndarray, t0_ms: int, *, per_message: int = 25, rate_hz: float = 50.0
) -> tuple[str, str]:
    """``<prefix>-accelerometer_data.csv`` (milli-g) and ``<prefix>-gyroscope_data.csv`` (deg/s) of SI samples."""
    from datetime import datetime

    names = []
    for sensor, cols, values in (
        (
            "accelerometer",
            ("calibrated_accel_x", "calibrated_accel_y", "calibrated_accel_z"),
            samples[:, :3] / 9.80665 * 1000.0,
        ),
        ("gyroscope", ("calibrated_gyro_x", "calibrated_gyro_y", "calibrated_gyro_z"), samples[:, 3:]),
    ):
        lines = ["timestamp,timestamp_ms,sample_time_offset," + ",".join(cols)]
        for i in range(0, len(values), per_message):
            t_ms = t0_ms + int(round(i * 1000 / rate_hz))
            stamp = datetime.fromtimestamp(t_ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            part = values[i : i + per_message]
            offsets = [int(round(k * 1000 / rate_hz)) for k in range(len(part))]
            cells = ['"[' + ", ".join(f"{v:.4f}" for v in part[:, a]) + ']"' for a in range(3)]
            lines.append(f'{stamp},{t_ms % 1000},"[' + ", ".join(map(str, offsets)) + ']",' + ",".join(cells))
        name = f"{prefix}-{sensor}_data.csv"
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        names.append(name)
    return names[0], names[1]


# -- tools -----------------------------------------------------------------------


def run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed: {proc.stderr[-2000:]}"
    return proc


def git(repo: Path, *args: str) -> str:
    return run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], repo).stdout


def dvc(cwd: Path, *args: str) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd).stdout


def registry_repo(root: Path) -> tuple[Path, Path]:
    """The trainer's registry working repo ``root/registry`` (one empty commit) and its origin, the bare repo
    ``root/origin.git`` that devices read; ``har-train release`` sets up DVC in it."""
    origin = root / "origin.git"
    git(root, "init", "-q", "--bare", "-b", "main", str(origin))
    repo = root / "registry"
    git(root, "init", "-q", "-b", "main", str(repo))
    git(repo, "remote", "add", "origin", str(origin))
    git(repo, "commit", "-q", "--allow-empty", "-m", "model registry")
    return repo, origin

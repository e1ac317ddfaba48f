"""The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers), for ``threads = auto``.

``os.sched_getaffinity`` gives the CPUs the scheduler lets the process run on
(``taskset``, ``docker --cpuset-cpus``); a quota (cgroup v2 ``cpu.max``, v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``: ``docker --cpus=1.5``) caps how much
of them it gets, rounded up (1.5 CPUs is 2 threads, each running part of the time).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

#: where cgroup file systems are mounted (a parameter for the tests)
CGROUP_ROOT = Path("/sys/fs/cgroup")
AUTO = "auto"


def _affinity() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[tuple[str, Path]]:
    """(version, folder) of this process's cgroups that can hold a CPU quota, innermost first."""
    out: list[tuple[str, Path]] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # cgroup v2: one unified hierarchy
            base, version = root, "v2"
        elif "cpu" in controllers.split(","):
            base = next((root / n for n in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (root / n).is_dir()), root / "cpu")
            version = "v1"
        else:
            continue
        folder = base / rel
        while True:  # the process's own group, then its parents up to the root (a limit may sit higher up)
            out.append((version, folder))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The smallest CPU quota (in CPUs, e.g. 1.5) of this process's cgroups, or None when unlimited."""
    limits: list[float] = []
    for version, folder in _cgroup_dirs(root, proc_cgroup):
        if version == "v2":
            text = _read(folder / "cpu.max")  # "max 100000" or "150000 100000"
            if text:
                quota, _, period = text.partition(" ")
                if quota != "max" and period:
                    with contextlib.suppress(ValueError, ZeroDivisionError):
                        limits.append(int(quota) / int(period))
        else:
            quota_s, period_s = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            try:
                q, p = int(quota_s or "-1"), int(period_s or "0")
            except ValueError:
                continue
            if q > 0 and p > 0:
                limits.append(q / p)
    return min(limits) if limits else None


def available_cores() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup quota (rounded up), at least 1."""
    cores = _affinity()
    quota = cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota - 1e-9)))
    return cores


def resolve_threads(setting: int | str) -> int:
    """Interpreter threads for ``agent.threads``: ``auto`` is :func:`available_cores`, a number is itself."""
    if setting == AUTO:
        return available_cores()
    return max(1, int(setting))

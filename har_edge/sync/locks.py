"""An advisory lock file per data folder and concern, so two sync processes never interleave.

``sync run`` and a ``sync once`` started by hand would otherwise both search
for a run, both find none, and both create one. ``flock`` is released by the
kernel when a process dies (kill -9 included), so a crash never leaves it held.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from har_edge.common import locks
from har_edge.sync.errors import LockBusy


def _busy(path: Path, timeout_s: float) -> Exception:
    return LockBusy(
        f"{path} is held by another sync process (pid in the file) for over {timeout_s:.0f} s: "
        "wait for it, or stop the other `har-edge sync run`"
    )


@contextmanager
def file_lock(path: Path, timeout_s: float = 60.0, poll_s: float = 0.1) -> Iterator[None]:
    with locks.file_lock(path, timeout_s, _busy, poll_s):
        yield

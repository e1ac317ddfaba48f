"""An advisory lock file per data folder and concern, so two sync processes never interleave.

``sync run`` and a ``sync once`` started by hand would otherwise both search
for a run, both find none, and both create one. ``flock`` is released by the
kernel when a process dies (kill -9 included), so a crash never leaves it held.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from har_edge.sync.errors import LockBusy


@contextmanager
def file_lock(path: Path, timeout_s: float = 60.0, poll_s: float = 0.1) -> Iterator[None]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(
                        f"{path} is held by another sync process (pid in the file) for over {timeout_s:.0f} s: "
                        "wait for it, or stop the other `har-edge sync run`"
                    ) from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

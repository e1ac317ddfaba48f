"""An advisory lock file (``flock``), held while a block runs: released by the kernel when its process dies.

Sync takes one per data folder and concern (push, models, custody) so that two sync processes never
interleave; ``har-edge forget`` takes sync's push lock so that no push runs while it erases. A kill -9
never leaves a lock held.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(
    path: Path, timeout_s: float, busy: Callable[[Path, float], Exception], poll_s: float = 0.1
) -> Iterator[None]:
    """Hold the lock at ``path``; after ``timeout_s`` of waiting, raise ``busy(path, timeout_s)``.

    The holder's pid is written into the file, for the person who finds it held.
    """
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
                    raise busy(path, timeout_s) from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

"""What the outbox knows the server has: the condition under which a raw export may be deleted.

A processed file is acknowledged once ``files.finished_ms`` is set: sync sets it only after the server
answered for every metric point and the predictions artifact and the run was set FINISHED (or, after a
4xx for the file, when its remaining results were given up and listed in ``sync_refusals``). A
duplicate's results are those of the processed file with the same sha256. A failed file's reason is
recorded once its ``failed`` row exists (failed rows are not sent to the server).

Raw custody (``sync.raw_store``, :mod:`har_edge.sync.custody`): an archived file is in the study's store once
its ``raw_custody`` row is ``delivered`` to the configured store and still describes the file (same path
relative to ``archive/``, size and mtime): sync sets it only after the store's own checksums of the object
matched the ones computed from the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import exists, select

from har_edge.agent.outbox import Outbox, files
from har_edge.agent.outbox_schema import raw_custody

#: raw_custody states the backlog tells apart (sync.custody writes them, with "pending")
DELIVERED = "delivered"
UPLOADING = "uploading"


def results_acknowledged(outbox: Outbox, sha256: str) -> bool:
    """True when the server acknowledged all results of the export with this content."""
    q = select(
        exists().where(files.c.sha256 == sha256, files.c.status == "processed", files.c.finished_ms.is_not(None))
    )
    with outbox.engine.connect() as conn:
        return bool(conn.execute(q).scalar())


def failure_recorded(outbox: Outbox, name: str) -> bool:
    """True when the outbox holds a ``failed`` row for an export of this name (its kind and message)."""
    q = select(exists().where(files.c.name == name, files.c.status == "failed"))
    with outbox.engine.connect() as conn:
        return bool(conn.execute(q).scalar())


def custody_delivered(outbox: Outbox, archive_dir: Path, path: Path, store: str) -> bool:
    """True when the archived file at ``path`` is in ``store`` with a verified checksum (as it is now on disk)."""
    try:
        st = path.stat()
        rel = path.relative_to(archive_dir).as_posix()
    except (FileNotFoundError, ValueError):
        return False
    q = select(
        exists().where(
            raw_custody.c.path == rel,
            raw_custody.c.size == st.st_size,
            raw_custody.c.mtime_ns == st.st_mtime_ns,
            raw_custody.c.state == DELIVERED,
            raw_custody.c.store == store,
        )
    )
    with outbox.engine.connect() as conn:
        return bool(conn.execute(q).scalar())


@dataclass(frozen=True)
class CustodyBacklog:
    """Archived files not yet in the raw store: how many, their bytes, and how many of them are part-way."""

    files: int
    bytes: int
    uploading: int
    delivered: int


def archived_files(archive_dir: Path) -> list[tuple[str, os.stat_result]]:
    """Every file under ``archive/<day>/`` and ``archive/<day>/<participant>/`` as (path relative to archive/,
    stat), oldest day first."""
    out: list[tuple[str, os.stat_result]] = []
    try:
        with os.scandir(archive_dir) as it:
            days = [e for e in it if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return out
    for day in sorted(days, key=lambda e: e.name):
        _files_in(day.path, day.name, out, depth=1)
    return out


def _files_in(folder: str, rel: str, out: list[tuple[str, os.stat_result]], depth: int) -> None:
    """The visible files of ``folder`` (and, ``depth`` levels down, of its subfolders: participant folders)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for e in entries:
        if e.name.startswith("."):
            continue
        try:
            if e.is_file(follow_symlinks=False):
                out.append((f"{rel}/{e.name}", e.stat(follow_symlinks=False)))
            elif depth > 0 and e.is_dir(follow_symlinks=False):
                _files_in(e.path, f"{rel}/{e.name}", out, depth - 1)
        except FileNotFoundError:
            continue


def custody_backlog(outbox: Outbox, archive_dir: Path, store: str) -> CustodyBacklog:
    """What raw custody still has to deliver: a folder listing and one query (no file is read)."""
    present = archived_files(archive_dir)
    q = select(raw_custody.c.path, raw_custody.c.size, raw_custody.c.mtime_ns, raw_custody.c.state).where(
        raw_custody.c.store == store
    )
    with outbox.engine.connect() as conn:
        rows = {r.path: r for r in conn.execute(q)}
    n = size = uploading = delivered = 0
    for rel, st in present:
        r = rows.get(rel)
        fresh = r is not None and r.size == st.st_size and r.mtime_ns == st.st_mtime_ns
        if fresh and r is not None and r.state == DELIVERED:
            delivered += 1
            continue
        n += 1
        size += st.st_size
        uploading += int(fresh and r is not None and r.state == UPLOADING)
    return CustodyBacklog(n, size, uploading, delivered)

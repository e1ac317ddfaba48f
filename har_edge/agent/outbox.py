"""The SQLite outbox: every result the agent produced, kept until sync delivered it.

One file's rows (its record, windows and metrics) are written in one
transaction. Metric points keep the timestamp they were created with, so a
re-send is identical and MLflow stores it once. Delivery state lives beside the
data: ``metrics.delivered_ms``, ``files.run_id`` / ``files.finished_ms`` and
``deployments.delivered_ms`` are set only after the server acknowledged them.

SQLite is used through SQLAlchemy Core with WAL, a busy timeout, foreign keys
and ``BEGIN IMMEDIATE`` for every write transaction (the agent and the sync
daemon share the file).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import and_, bindparam, create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import Connection, CursorResult, Engine
from sqlalchemy.exc import DatabaseError, OperationalError

from har_edge.agent.errors import DiskFull, OutboxError
from har_edge.agent.outbox_migrations import SCHEMA_VERSION, migrate
from har_edge.agent.outbox_schema import (
    attempts,
    deployments,
    files,
    flagged_windows,
    inbox_seen,
    labels,
    metadata,
    metrics,
    retrain_requests,
    schema_version,
    sync_refusals,
    windows,
)
from har_edge.common.states import FileStatus

log = logging.getLogger(__name__)

#: What "pending" means, defined once: an item the server has not acknowledged yet. A processed file is
#: pending until its run is FINISHED (its points, predictions and the finish all acknowledged); a metric
#: point or a deployment record until it is marked delivered. Duplicates and failed files are never sent.
PENDING_FILE = and_(files.c.status == FileStatus.PROCESSED.value, files.c.finished_ms.is_(None))
PENDING_POINT = metrics.c.delivered_ms.is_(None)
PENDING_DEPLOYMENT = deployments.c.delivered_ms.is_(None)


@dataclass(frozen=True)
class Backlog:
    """Pending items (see ``PENDING_*``) and the time of the oldest one, for status, heartbeat and the CLI."""

    files: int
    windows: int
    points: int
    deployments: int
    oldest_ms: int | None


_T = TypeVar("_T")

__all__ = [
    "SCHEMA_VERSION",
    "FileRecord",
    "MetricPoint",
    "Outbox",
    "attempts",
    "deployments",
    "files",
    "flagged_windows",
    "inbox_seen",
    "labels",
    "metadata",
    "metrics",
    "now_ms",
    "retrain_requests",
    "schema_version",
    "sync_refusals",
    "windows",
]

#: where docs/reliability.md tells how to salvage a damaged outbox
SALVAGE_DOC = "docs/reliability.md (section 'Salvaging a damaged outbox')"


@dataclass(frozen=True)
class MetricPoint:
    key: str
    value: float
    timestamp_ms: int
    step: int = 0


@dataclass
class FileRecord:
    """Everything of one processed (or failed) file, written in one transaction."""

    sha256: str
    name: str
    size: int
    status: str
    received_ms: int
    processed_ms: int
    agent_version: str
    format: str | None = None
    decode_s: float | None = None
    preprocess_s: float | None = None
    inference_s: float | None = None
    store_s: float | None = None
    total_s: float | None = None
    model_name: str | None = None
    model_version: str | None = None
    model_sha256: str | None = None
    error_kind: str | None = None
    error_message: str | None = None
    error_stage: str | None = None
    monitor_status: str | None = None
    monitor_json: str | None = None
    utc_offset_s: int | None = None
    utc_offset_source: str | None = None
    watch_manufacturer: str | None = None
    watch_product: str | None = None
    watch_serial: str | None = None
    watch_firmware: str | None = None
    watch_pseudonym: str | None = None
    participant: str | None = None
    participant_source: str | None = None


def now_ms() -> int:
    return int(time.time() * 1000)


def _sqlite_engine(path: Path, busy_timeout_s: float) -> Engine:
    engine = create_engine(f"sqlite:///{path}", future=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:  # pragma: no cover - every test
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:  # pragma: no cover
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


#: built once: the agent asks before every file
_PROCESSED_FILE = select(files).where(
    files.c.sha256 == bindparam("sha256"), files.c.status == FileStatus.PROCESSED.value
)
_WINDOWS_SQL = "INSERT INTO windows (file_id, idx, start_ms, label, confidence, probs) VALUES (?, ?, ?, ?, ?, ?)"
_LABELS_SQL = "INSERT INTO labels (file_id, idx, label) VALUES (?, ?, ?)"
_METRICS_SQL = 'INSERT INTO metrics (file_id, "key", value, timestamp_ms, step) VALUES (?, ?, ?, ?, ?)'
_ROWS_PER_SLICE = 4096


def _window_rows(file_id: int, start_ms: np.ndarray, probs: np.ndarray) -> Iterator[tuple[Any, ...]]:
    """(file_id, idx, start_ms, label, confidence, probs blob) per window, converted a slice at a time."""
    for a in range(0, len(probs), _ROWS_PER_SLICE):
        part = probs[a : a + _ROWS_PER_SLICE]
        p = np.ascontiguousarray(part, dtype="<f4")
        blob = p.tobytes()
        width = p.shape[1] * 4
        starts = start_ms[a : a + _ROWS_PER_SLICE].tolist()
        labels = part.argmax(axis=1).tolist()
        conf = part.max(axis=1).tolist()
        for j in range(len(p)):
            yield file_id, a + j, starts[j], labels[j], conf[j], blob[j * width : (j + 1) * width]


def _metric_rows(file_id: int | None, points: Iterable[MetricPoint]) -> Iterator[tuple[Any, ...]]:
    for p in points:
        yield file_id, p.key, float(p.value), p.timestamp_ms, p.step


def _raw(conn: Connection) -> sqlite3.Connection:
    """The DBAPI connection under a SQLAlchemy one (for PRAGMAs and ``executemany`` from generators)."""
    raw = conn.connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    return raw


def _pk(result: CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def last_file_summary(row: Any) -> dict[str, Any] | None:
    """What ``status`` shows of the newest file (a ``files`` row; None: there is none)."""
    if row is None:
        return None
    return {
        "name": row.name,
        "status": row.status,
        "windows": row.windows,
        "processed_ms": row.processed_ms,
        "model_version": row.model_version,
        "error": row.error_message,
    }


class Outbox:
    """The outbox of one device. Safe to open from the agent and the sync daemon at once."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0, check: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = _sqlite_engine(self.path, busy_timeout_s)
        try:
            if check:
                self._guard(self._quick_check)  # opening itself can fail (a folder where the file should be)
            #: the schema version the file had when opened (0: a new file)
            self.opened_version = self._guard(lambda: migrate(self.engine, self.path))
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _guard(self, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except (OperationalError, DatabaseError, sqlite3.DatabaseError) as exc:
            err = self._translate(exc)
            if err is exc:
                raise
            raise err from exc

    def _translate(self, exc: Exception) -> Exception:
        """The outbox error an SQLite error stands for; constraint violations (bugs) are returned as they are."""
        orig = getattr(exc, "orig", None) or exc
        code = getattr(orig, "sqlite_errorcode", None)
        text_ = str(orig)
        if code == sqlite3.SQLITE_FULL or "database or disk is full" in text_:
            return DiskFull(
                f"outbox {self.path}: the disk is full ({orig}); nothing was stored: "
                "free space on that filesystem, the agent resumes by itself"
            )
        if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or "malformed" in text_ or "not a database" in text_:
            return OutboxError(
                f"outbox {self.path} is damaged ({orig}): stop the agent and sync, then salvage it as "
                f"{SALVAGE_DOC} describes"
            )
        if isinstance(orig, sqlite3.OperationalError):
            return OutboxError(f"outbox {self.path}: {orig}")
        return exc

    def _quick_check(self) -> None:
        """``PRAGMA quick_check`` (well under a second on a day's outbox); a damaged file is refused."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.engine.connect() as conn:
            raw = _raw(conn)
            rows = self._guard(lambda: raw.execute("PRAGMA quick_check").fetchall())
        found = [r[0] for r in rows]
        if found != ["ok"]:
            raise OutboxError(
                f"outbox {self.path} failed its integrity check ({'; '.join(found[:3])}): stop the agent and "
                f"sync, then salvage it as {SALVAGE_DOC} describes"
            )

    @contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[Connection]:
        """One ``BEGIN IMMEDIATE`` transaction. ``durable``: the commit is on disk when this returns
        (``synchronous = FULL`` for it), as it must be before a file is moved or deleted for good."""
        try:
            with self.engine.connect() as conn:
                raw = _raw(conn)
                if durable:
                    raw.execute("PRAGMA synchronous = FULL")
                try:
                    with conn.begin():
                        yield conn
                finally:
                    if durable:
                        raw.execute("PRAGMA synchronous = NORMAL")
        except (OperationalError, DatabaseError, sqlite3.DatabaseError) as exc:
            err = self._translate(exc)
            if err is exc:
                raise
            raise err from exc

    # -- writing (agent) ----------------------------------------------------

    def record_file(
        self,
        rec: FileRecord,
        *,
        label_names: Sequence[str] = (),
        start_ms: np.ndarray | None = None,
        probs: np.ndarray | None = None,
        points: Iterable[MetricPoint] = (),
        durable: bool = True,
        flagged_npz: bytes | None = None,
    ) -> int:
        """Store a file with its windows and metric points, all or nothing; return its id.

        ``durable`` (the default): the commit is on disk before this returns, because the caller
        then moves or deletes the file.

        Windows and points go through the DBAPI's ``executemany`` fed by generators
        of tuples, a slice at a time: a day of windows (43k rows) costs ~0.1 s and
        never exists as a list of Python dicts.
        """
        with self.transaction(durable=durable) as conn:
            file_id = int(_pk(conn.execute(insert(files).values(**rec.__dict__, windows=0))))
            cur = _raw(conn).cursor()
            try:
                if probs is not None and len(probs):
                    assert start_ms is not None, "windows need their start times"
                    n = len(probs)
                    cur.executemany(_WINDOWS_SQL, _window_rows(file_id, np.asarray(start_ms), probs))
                    conn.execute(
                        update(files)
                        .where(files.c.id == file_id)
                        .values(windows=n, first_window_ms=int(start_ms[0]), last_window_ms=int(start_ms[-1]))
                    )
                if label_names:
                    cur.executemany(_LABELS_SQL, ((file_id, i, s) for i, s in enumerate(label_names)))
                cur.executemany(_METRICS_SQL, _metric_rows(file_id, points))
            finally:
                cur.close()
            if flagged_npz is not None:
                conn.execute(insert(flagged_windows).values(file_id=file_id, npz=flagged_npz))
        return file_id

    def add_metrics(self, points: Iterable[MetricPoint], file_id: int | None = None) -> None:
        with self.transaction() as conn:
            cur = _raw(conn).cursor()
            try:
                cur.executemany(_METRICS_SQL, _metric_rows(file_id, points))
            finally:
                cur.close()

    def record_deployment(
        self,
        *,
        from_version: str | None,
        to_version: str | None,
        outcome: str,
        reason: str = "",
        time_ms: int | None = None,
    ) -> int:
        with self.transaction() as conn:
            return _pk(
                conn.execute(
                    insert(deployments).values(
                        time_ms=time_ms if time_ms is not None else now_ms(),
                        from_version=from_version,
                        to_version=to_version,
                        outcome=outcome,
                        reason=reason,
                    )
                )
            )

    # -- reading ------------------------------------------------------------

    def processed_file(self, sha256: str) -> Any:
        """The processed file with this content, or None."""
        with self.engine.connect() as conn:
            return conn.execute(_PROCESSED_FILE, {"sha256": sha256}).first()

    def file(self, file_id: int) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(select(files).where(files.c.id == file_id)).first()

    def file_windows(self, file_id: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(label names, start_ms (n,), probabilities (n, k)) of a file."""
        with self.engine.connect() as conn:
            names = [
                r.label for r in conn.execute(select(labels).where(labels.c.file_id == file_id).order_by(labels.c.idx))
            ]
            result = conn.execution_options(stream_results=True).execute(
                select(windows.c.start_ms, windows.c.probs).where(windows.c.file_id == file_id).order_by(windows.c.idx)
            )
            # a day is 43,200 rows: read a few thousand at a time into arrays, never a list of all the rows
            start_parts: list[np.ndarray] = []
            prob_parts: list[np.ndarray] = []
            for part in result.partitions(4096):
                start_parts.append(np.fromiter((r[0] for r in part), dtype=np.int64, count=len(part)))
                prob_parts.append(np.frombuffer(b"".join(r[1] for r in part), dtype="<f4"))
        if not start_parts:
            return names, np.empty(0, np.int64), np.empty((0, len(names)), np.float32)
        starts = np.concatenate(start_parts)
        return names, starts, np.concatenate(prob_parts).reshape(len(starts), -1)

    def file_metrics(self, file_id: int | None) -> list[MetricPoint]:
        cond = metrics.c.file_id.is_(None) if file_id is None else metrics.c.file_id == file_id
        with self.engine.connect() as conn:
            rows = conn.execute(select(metrics).where(cond).order_by(metrics.c.id)).all()
        return [MetricPoint(r.key, r.value, r.timestamp_ms, r.step) for r in rows]

    def backlog(self) -> Backlog:
        """What is pending: not yet acknowledged by the server (the one definition, see :class:`Backlog`)."""
        with self.engine.connect() as conn:
            n_files, n_windows, oldest_file = conn.execute(
                select(func.count(), func.coalesce(func.sum(files.c.windows), 0), func.min(files.c.processed_ms)).where(
                    PENDING_FILE
                )
            ).one()
            n_points = conn.execute(select(func.count()).where(PENDING_POINT)).scalar()
            oldest_device = conn.execute(
                select(func.min(metrics.c.timestamp_ms)).where(metrics.c.file_id.is_(None), PENDING_POINT)
            ).scalar()
            n_dep, oldest_dep = conn.execute(
                select(func.count(), func.min(deployments.c.time_ms)).where(PENDING_DEPLOYMENT)
            ).one()
        oldest = [t for t in (oldest_file, oldest_device, oldest_dep) if t is not None]
        return Backlog(
            files=int(n_files),
            windows=int(n_windows or 0),
            points=int(n_points or 0),
            deployments=int(n_dep),
            oldest_ms=min(oldest) if oldest else None,
        )

    def status_counts(self) -> dict[str, Any]:
        backlog = self.backlog()
        with self.engine.connect() as conn:
            by_status: dict[str, int] = dict(
                conn.execute(select(files.c.status, func.count()).group_by(files.c.status)).all()
            )
            last = conn.execute(select(files).order_by(files.c.id.desc()).limit(1)).first()
        return {
            "files": {k: int(v) for k, v in by_status.items()},
            "files_pending_delivery": backlog.files,
            "windows_pending_delivery": backlog.windows,
            "metric_points_pending": backlog.points,
            "deployments_pending": backlog.deployments,
            "oldest_pending_ms": backlog.oldest_ms,
            "last_file": last_file_summary(last),
        }

    def recent_files(self, n: int = 10, participant: str | None = None) -> list[dict[str, Any]]:
        """The last ``n`` files (of ``participant``, if given), newest first, as ``har-edge status`` shows them."""
        q = select(files).order_by(files.c.id.desc()).limit(n)
        if participant is not None:
            q = q.where(files.c.participant == participant)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        out = []
        for r in rows:
            monitor = None
            if r.monitor_status is not None:
                reasons: list[str] = []
                if r.monitor_json:
                    try:
                        reasons = list(json.loads(r.monitor_json).get("reasons", []))
                    except (ValueError, AttributeError):
                        reasons = ["(unreadable monitor report)"]
                monitor = {"status": r.monitor_status, "reasons": reasons}
            out.append(
                {
                    "name": r.name,
                    "sha256": r.sha256,
                    "status": FileStatus(r.status).shown,
                    "error_kind": r.error_kind,
                    "windows": r.windows,
                    "delivered": r.finished_ms is not None,
                    "monitor": monitor,
                }
            )
        return out

    def recent_monitor(self, n: int) -> list[Any]:
        """The last ``n`` processed files that have a monitor verdict (newest first)."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(files.c.id, files.c.name, files.c.sha256, files.c.monitor_status, files.c.monitor_json)
                    .where(files.c.status == FileStatus.PROCESSED.value, files.c.monitor_status.is_not(None))
                    .order_by(files.c.id.desc())
                    .limit(n)
                ).all()
            )

    def last_retrain_request(self) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(select(retrain_requests).order_by(retrain_requests.c.id.desc()).limit(1)).first()

    def record_retrain_request(self, files_json: str, time_ms: int | None = None) -> int:
        with self.transaction() as conn:
            key = conn.execute(
                insert(retrain_requests).values(
                    time_ms=time_ms if time_ms is not None else now_ms(), files_json=files_json
                )
            ).inserted_primary_key
            return int(key[0]) if key is not None else 0

    def pending_retrain_requests(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(retrain_requests)
                    .where(retrain_requests.c.delivered_ms.is_(None))
                    .order_by(retrain_requests.c.id)
                ).all()
            )

    def mark_retrain_request(self, request_id: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                update(retrain_requests).where(retrain_requests.c.id == request_id).values(delivered_ms=now_ms())
            )

    def flagged_npz(self, file_id: int) -> bytes | None:
        with self.engine.connect() as conn:
            blob = conn.execute(select(flagged_windows.c.npz).where(flagged_windows.c.file_id == file_id)).scalar()
        return bytes(blob) if blob is not None else None

    def size_bytes(self) -> int:
        """Bytes the outbox holds: used pages (space freed by delivered rows counts as free) plus the WAL."""
        with self.engine.connect() as conn:
            pages = int(conn.exec_driver_sql("PRAGMA page_count").scalar() or 0) - int(
                conn.exec_driver_sql("PRAGMA freelist_count").scalar() or 0
            )
            used = pages * int(conn.exec_driver_sql("PRAGMA page_size").scalar() or 0)
        wal = Path(str(self.path) + "-wal")
        return used + (wal.stat().st_size if wal.exists() else 0)

    def set_file_times(self, file_id: int, *, store_s: float, total_s: float) -> None:
        """Record how long storing took (known only once the file's transaction committed)."""
        with self.transaction() as conn:
            conn.execute(update(files).where(files.c.id == file_id).values(store_s=store_s, total_s=total_s))

    def delete_file_rows(self, file_id: int) -> None:
        """Drop a file and everything of it (used to reclaim delivered data)."""
        with self.transaction() as conn:
            conn.execute(delete(files).where(files.c.id == file_id))

    # -- files in flight (agent) --------------------------------------------

    def start_attempt(self, name: str, size: int, mtime_ns: int) -> int:
        """Record that processing of a claimed file begins; return the attempt's id."""
        t = now_ms()
        with self.transaction() as conn:
            return _pk(
                conn.execute(
                    insert(attempts).values(
                        name=name, size=size, mtime_ns=mtime_ns, started_ms=t, stage="claimed", progress=0, updated_ms=t
                    )
                )
            )

    def update_attempt(self, attempt_id: int, stage: str, progress: int) -> None:
        with self.transaction() as conn:
            conn.execute(
                update(attempts)
                .where(attempts.c.id == attempt_id)
                .values(stage=stage, progress=progress, updated_ms=now_ms())
            )

    def attempts_of(self, name: str, size: int, mtime_ns: int) -> list[Any]:
        """Earlier attempts at this file, oldest first."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(attempts)
                    .where(attempts.c.name == name, attempts.c.size == size, attempts.c.mtime_ns == mtime_ns)
                    .order_by(attempts.c.id)
                ).all()
            )

    def clear_attempts(self, name: str) -> None:
        """Forget the attempts at a file that left work/."""
        with self.transaction() as conn:
            conn.execute(delete(attempts).where(attempts.c.name == name))

    def prune_attempts(self, keep: Iterable[str]) -> int:
        """Forget attempts at files no longer in work/ (removed by hand); returns how many rows went."""
        keep = list(keep)
        with self.transaction() as conn:
            return int(conn.execute(delete(attempts).where(attempts.c.name.not_in(keep))).rowcount or 0)

    def first_seen_ms(self, name: str, size: int, mtime_ns: int, now: int | None = None) -> int:
        """When this inbox file was first seen settled but incomplete, unchanged since (recorded now if new)."""
        now = now if now is not None else now_ms()
        with self.engine.connect() as conn:
            row = conn.execute(select(inbox_seen).where(inbox_seen.c.name == name)).first()
        # a time in the future: the clock was set back since (a board without a battery clock); start again
        if row is not None and (row.size, row.mtime_ns) == (size, mtime_ns) and row.first_seen_ms <= now:
            return int(row.first_seen_ms)
        with self.transaction() as conn:
            conn.execute(delete(inbox_seen).where(inbox_seen.c.name == name))
            conn.execute(insert(inbox_seen).values(name=name, size=size, mtime_ns=mtime_ns, first_seen_ms=now))
        return now

    def seen_names(self) -> set[str]:
        with self.engine.connect() as conn:
            return set(conn.execute(select(inbox_seen.c.name)).scalars())

    def forget_seen(self, names: Iterable[str]) -> None:
        names = list(names)
        if not names:
            return
        with self.transaction() as conn:
            conn.execute(delete(inbox_seen).where(inbox_seen.c.name.in_(names)))

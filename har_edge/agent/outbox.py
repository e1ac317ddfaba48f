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
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

from har_edge.agent.errors import OutboxError, SchemaVersionError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

metadata = MetaData()

schema_version = Table("schema_version", metadata, Column("version", Integer, nullable=False))

files = Table(
    "files",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("name", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    # processed | failed | duplicate
    Column("status", String(16), nullable=False),
    Column("format", String(32)),
    Column("received_ms", BigInteger, nullable=False),
    Column("processed_ms", BigInteger, nullable=False),
    Column("decode_s", Float),
    Column("preprocess_s", Float),
    Column("inference_s", Float),
    Column("store_s", Float),
    Column("total_s", Float),
    Column("windows", Integer, nullable=False, default=0),
    Column("first_window_ms", BigInteger),
    Column("last_window_ms", BigInteger),
    Column("model_name", Text),
    Column("model_version", Text),
    Column("model_sha256", String(64)),
    Column("agent_version", Text, nullable=False),
    Column("error_kind", String(32)),
    Column("error_message", Text),
    Column("duplicate_of", Integer, ForeignKey("files.id")),
    # monitor verdict (ok | warn | alert | too_short | no_reference) and its report (JSON)
    Column("monitor_status", Text),
    Column("monitor_json", Text),
    # delivery (written by sync)
    Column("run_id", String(64)),
    Column("artifact_delivered_ms", BigInteger),
    Column("finished_ms", BigInteger),
)
Index("files_sha_processed", files.c.sha256, unique=True, sqlite_where=text("status = 'processed'"))
Index("files_undelivered", files.c.finished_ms, files.c.status)

windows = Table(
    "windows",
    metadata,
    Column("file_id", Integer, ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("start_ms", BigInteger, nullable=False),
    Column("label", Integer, nullable=False),
    Column("confidence", Float, nullable=False),
    Column("probs", LargeBinary, nullable=False),  # float32 little-endian, one per label
)

labels = Table(
    "labels",
    metadata,
    Column("file_id", Integer, ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("label", Text, nullable=False),
)

metrics = Table(
    "metrics",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("file_id", Integer, ForeignKey("files.id", ondelete="CASCADE")),  # NULL: device-level
    Column("key", Text, nullable=False),
    Column("value", Float, nullable=False),
    Column("timestamp_ms", BigInteger, nullable=False),
    Column("step", BigInteger, nullable=False, default=0),
    Column("delivered_ms", BigInteger),
)
Index("metrics_pending", metrics.c.delivered_ms, metrics.c.file_id)

deployments = Table(
    "deployments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("time_ms", BigInteger, nullable=False),
    Column("from_version", Text),
    Column("to_version", Text),
    # activated | refused | rolled_back | load_failed | pinned
    Column("outcome", String(32), nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("delivered_ms", BigInteger),
)

#: scaled windows of a file kept for a retraining request (npz bytes: ``idx``, ``windows``)
flagged_windows = Table(
    "flagged_windows",
    metadata,
    Column("file_id", Integer, ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    Column("npz", LargeBinary, nullable=False),
)

#: device-level retraining requests raised by the monitor trigger (K of the last N files alerted)
retrain_requests = Table(
    "retrain_requests",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("time_ms", BigInteger, nullable=False),
    Column("files_json", Text, nullable=False),  # [{file_id, name, sha256, status, reasons}]
    Column("delivered_ms", BigInteger),
)


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
    monitor_status: str | None = None
    monitor_json: str | None = None


def now_ms() -> int:
    return int(time.time() * 1000)


def _sqlite_engine(path: Path, busy_timeout_s: float) -> Engine:
    engine = create_engine(f"sqlite:///{path}", future=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # pragma: no cover - exercised by every test
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # pragma: no cover
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


#: built once: the agent asks before every file
_PROCESSED_FILE = select(files).where(files.c.sha256 == bindparam("sha256"), files.c.status == "processed")
_WINDOWS_SQL = "INSERT INTO windows (file_id, idx, start_ms, label, confidence, probs) VALUES (?, ?, ?, ?, ?, ?)"
_LABELS_SQL = "INSERT INTO labels (file_id, idx, label) VALUES (?, ?, ?)"
_METRICS_SQL = 'INSERT INTO metrics (file_id, "key", value, timestamp_ms, step) VALUES (?, ?, ?, ?, ?)'
_ROWS_PER_SLICE = 4096


def _window_rows(file_id: int, start_ms: np.ndarray, probs: np.ndarray) -> Iterator[tuple]:
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


def _metric_rows(file_id: int | None, points: Iterable[MetricPoint]) -> Iterator[tuple]:
    for p in points:
        yield file_id, p.key, float(p.value), p.timestamp_ms, p.step


class Outbox:
    """The outbox of one device. Safe to open from the agent and the sync daemon at once."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = _sqlite_engine(self.path, busy_timeout_s)
        self._init_schema()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except OperationalError as exc:
            raise OutboxError(f"outbox {self.path}: {exc.orig}") from exc
        except sqlite3.OperationalError as exc:  # from the DBAPI cursors of the bulk inserts
            raise OutboxError(f"outbox {self.path}: {exc}") from exc

    def _init_schema(self) -> None:
        with self.transaction() as conn:
            has_table = conn.execute(
                text("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'")
            ).first()
            if has_table:
                found = conn.execute(select(schema_version.c.version)).scalar()
                if found != SCHEMA_VERSION:
                    raise SchemaVersionError(
                        f"outbox {self.path} has schema version {found}, this har-edge uses {SCHEMA_VERSION}: "
                        "run the har-edge version that wrote it to deliver its backlog, or move the file away"
                    )
                return
            metadata.create_all(conn)
            conn.execute(insert(schema_version).values(version=SCHEMA_VERSION))

    # -- writing (agent) ----------------------------------------------------

    def record_file(
        self,
        rec: FileRecord,
        *,
        label_names: Sequence[str] = (),
        start_ms: np.ndarray | None = None,
        probs: np.ndarray | None = None,
        points: Iterable[MetricPoint] = (),
        flagged_npz: bytes | None = None,
    ) -> int:
        """Store a file with its windows and metric points, all or nothing; return its id.

        Windows and points go through the DBAPI's ``executemany`` fed by generators
        of tuples, a slice at a time: a day of windows (43k rows) costs ~0.1 s and
        never exists as a list of Python dicts.
        """
        with self.transaction() as conn:
            file_id = conn.execute(insert(files).values(**rec.__dict__, windows=0)).inserted_primary_key[0]
            cur = conn.connection.driver_connection.cursor()
            try:
                if probs is not None and len(probs):
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
            cur = conn.connection.driver_connection.cursor()
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
            return conn.execute(
                insert(deployments).values(
                    time_ms=time_ms if time_ms is not None else now_ms(),
                    from_version=from_version,
                    to_version=to_version,
                    outcome=outcome,
                    reason=reason,
                )
            ).inserted_primary_key[0]

    # -- reading ------------------------------------------------------------

    def processed_file(self, sha256: str):
        """The processed file with this content, or None."""
        with self.engine.connect() as conn:
            return conn.execute(_PROCESSED_FILE, {"sha256": sha256}).first()

    def file(self, file_id: int):
        with self.engine.connect() as conn:
            return conn.execute(select(files).where(files.c.id == file_id)).first()

    def file_windows(self, file_id: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(label names, start_ms (n,), probabilities (n, k)) of a file."""
        with self.engine.connect() as conn:
            names = [
                r.label for r in conn.execute(select(labels).where(labels.c.file_id == file_id).order_by(labels.c.idx))
            ]
            rows = conn.execute(
                select(windows.c.start_ms, windows.c.probs).where(windows.c.file_id == file_id).order_by(windows.c.idx)
            ).all()
        starts = np.array([r.start_ms for r in rows], dtype=np.int64)
        probs = (
            np.frombuffer(b"".join(r.probs for r in rows), dtype="<f4").reshape(len(rows), -1)
            if rows
            else np.empty((0, len(names)), np.float32)
        )
        return names, starts, probs

    def file_metrics(self, file_id: int | None) -> list[MetricPoint]:
        cond = metrics.c.file_id.is_(None) if file_id is None else metrics.c.file_id == file_id
        with self.engine.connect() as conn:
            rows = conn.execute(select(metrics).where(cond).order_by(metrics.c.id)).all()
        return [MetricPoint(r.key, r.value, r.timestamp_ms, r.step) for r in rows]

    def status_counts(self) -> dict:
        with self.engine.connect() as conn:
            by_status = dict(conn.execute(select(files.c.status, func.count()).group_by(files.c.status)).all())
            pending_windows = conn.execute(
                select(func.coalesce(func.sum(files.c.windows), 0)).where(
                    files.c.status == "processed", files.c.artifact_delivered_ms.is_(None)
                )
            ).scalar()
            pending_points = conn.execute(select(func.count()).where(metrics.c.delivered_ms.is_(None))).scalar()
            oldest = conn.execute(
                select(func.min(metrics.c.timestamp_ms)).where(metrics.c.delivered_ms.is_(None))
            ).scalar()
            last = conn.execute(select(files).order_by(files.c.id.desc()).limit(1)).first()
        return {
            "files": {k: int(v) for k, v in by_status.items()},
            "windows_pending_delivery": int(pending_windows or 0),
            "metric_points_pending": int(pending_points or 0),
            "oldest_pending_ms": oldest,
            "last_file": None
            if last is None
            else {
                "name": last.name,
                "status": last.status,
                "windows": last.windows,
                "processed_ms": last.processed_ms,
                "model_version": last.model_version,
                "error": last.error_message,
            },
        }

    def recent_files(self, n: int = 10) -> list[dict[str, Any]]:
        """The last ``n`` files, newest first, in the form ``har-edge status`` shows (the names are final)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(files).order_by(files.c.id.desc()).limit(n)).all()
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
                    "status": "quarantined" if r.status == "failed" else r.status,
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
                    .where(files.c.status == "processed", files.c.monitor_status.is_not(None))
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
            pages = (
                conn.exec_driver_sql("PRAGMA page_count").scalar()
                - conn.exec_driver_sql("PRAGMA freelist_count").scalar()
            )
            used = pages * conn.exec_driver_sql("PRAGMA page_size").scalar()
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

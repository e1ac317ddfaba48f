"""Ordered outbox migrations, run when an outbox is opened.

A fresh file gets the newest schema at once (``metadata.create_all``) and version
:data:`SCHEMA_VERSION`. An older file is brought up one version at a time, each step
in its own ``BEGIN IMMEDIATE`` transaction that re-reads the version first (the agent
and the sync daemon may open the file at the same moment) and records the new one in
``schema_version``. Migrations only add (tables, nullable columns, indexes), so no
backlog has to be drained before an upgrade. A file newer than this code is refused.

To add version N: append ``Migration(N, "what", fn)`` to :data:`MIGRATIONS`, where
``fn(conn)`` changes a version N-1 file into version N, and change the tables in
:mod:`har_edge.agent.outbox_schema` to match; ``tests/test_outbox_migrations.py``
checks that a migrated file has the same columns and indexes as a fresh one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, insert, select, text, update
from sqlalchemy.engine import Connection

from har_edge.agent.errors import SchemaVersionError
from har_edge.agent.outbox_schema import (
    attempts,
    files,
    flagged_windows,
    forget_requests,
    inbox_seen,
    metadata,
    raw_custody,
    retrain_requests,
    schema_version,
    sync_failures,
    sync_passes,
    sync_refusals,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int  # the version this step produces
    name: str
    apply: Callable[[Connection], None]


def _columns(conn: Connection, table: str) -> set[str]:
    return {r[1] for r in conn.exec_driver_sql(f'PRAGMA table_info("{table}")')}


def _add_columns(conn: Connection, table: str, columns: dict[str, str]) -> None:
    have = _columns(conn, table)
    for name, decl in columns.items():
        if name not in have:
            conn.exec_driver_sql(f'ALTER TABLE "{table}" ADD COLUMN "{name}" {decl}')


def _v2(conn: Connection) -> None:
    # sync created sync_refusals itself before v2: kept as it is where it exists
    sync_refusals.create(conn, checkfirst=True)
    attempts.create(conn, checkfirst=True)
    for ix in attempts.indexes:
        ix.create(conn, checkfirst=True)
    inbox_seen.create(conn, checkfirst=True)
    sync_passes.create(conn, checkfirst=True)
    sync_failures.create(conn, checkfirst=True)
    flagged_windows.create(conn, checkfirst=True)
    retrain_requests.create(conn, checkfirst=True)
    _add_columns(conn, "files", {"error_stage": "VARCHAR(16)", "monitor_status": "VARCHAR(16)", "monitor_json": "TEXT"})


def _v3(conn: Connection) -> None:
    _add_columns(
        conn,
        "files",
        {
            "utc_offset_s": "INTEGER",
            "utc_offset_source": "VARCHAR(40)",
            "summary_json": "TEXT",
            "pages_ms": "BIGINT",
            "daily_ms": "BIGINT",
        },
    )


def _v4(conn: Connection) -> None:
    raw_custody.create(conn, checkfirst=True)
    for ix in raw_custody.indexes:
        ix.create(conn, checkfirst=True)


def _v5(conn: Connection) -> None:
    _add_columns(
        conn,
        "files",
        {
            "watch_manufacturer": "TEXT",
            "watch_product": "TEXT",
            "watch_serial": "TEXT",
            "watch_firmware": "TEXT",
            "watch_pseudonym": "VARCHAR(32)",
            "participant": "TEXT",
            "participant_source": "VARCHAR(16)",
        },
    )
    for ix in files.indexes:
        if ix.name == "files_participant":
            ix.create(conn, checkfirst=True)
    forget_requests.create(conn, checkfirst=True)


MIGRATIONS: list[Migration] = [
    Migration(
        2,
        "sync_refusals, attempts, inbox_seen, sync_passes, sync_failures, flagged_windows, retrain_requests; "
        "files.error_stage, monitor_status, monitor_json",
        _v2,
    ),
    Migration(3, "files.utc_offset_s, utc_offset_source, summary_json, pages_ms, daily_ms", _v3),
    Migration(4, "raw_custody (raw exports delivered to sync.raw_store)", _v4),
    Migration(
        5,
        "files.watch_manufacturer, watch_product, watch_serial, watch_firmware, watch_pseudonym, participant, "
        "participant_source (index files_participant); forget_requests",
        _v5,
    ),
]

#: the version this code writes
SCHEMA_VERSION = MIGRATIONS[-1].version if MIGRATIONS else 1


def _version(conn: Connection) -> int | None:
    """The file's schema version; None for a file without the table (a new outbox)."""
    has_table = conn.execute(text("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'")).first()
    if not has_table:
        return None
    found = conn.execute(select(schema_version.c.version)).scalar()
    return int(found) if found is not None else None


def _refuse_newer(path: Path, found: int) -> None:
    if found > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"outbox {path} has schema version {found}, newer than version {SCHEMA_VERSION} of this har-edge: "
            "upgrade har-edge (or run the version that wrote it), or move the file away"
        )


def migrate(engine: Engine, path: Path) -> int:
    """Bring the outbox at ``engine`` to :data:`SCHEMA_VERSION`; return the version it had (0: new file).

    ``engine`` must open every transaction with ``BEGIN IMMEDIATE``.
    """
    with engine.begin() as conn:
        found = _version(conn)
        if found is None:
            metadata.create_all(conn)
            conn.execute(insert(schema_version).values(version=SCHEMA_VERSION))
            return 0
        _refuse_newer(path, found)
    start = found
    for m in MIGRATIONS:
        if m.version <= start:
            continue
        with engine.begin() as conn:
            now = _version(conn) or 0
            _refuse_newer(path, now)
            if now >= m.version:  # another process did this step meanwhile
                continue
            if now != m.version - 1:
                raise SchemaVersionError(
                    f"outbox {path} has schema version {now}; no migration leads from it to {m.version}: "
                    "move the file away"
                )
            m.apply(conn)
            conn.execute(update(schema_version).values(version=m.version))
        log.info("outbox %s migrated to schema version %d (%s)", path, m.version, m.name)
    return start

"""How the sync daemon's passes went, kept in the outbox so the agent's /metrics can export it.

Two small tables of the outbox's schema (v2, :mod:`har_edge.agent.outbox_schema`):
``sync_passes`` holds one row per task (push, pull, health) with the time of its
last success and last failure, ``sync_failures`` a count per task and error kind. The sync daemon writes them
(:func:`record_pass`, one tiny transaction per pass); the agent's metrics
collector reads them (:func:`read_passes`) and tolerates their absence.
The agent defines them so that neither side imports the other's code.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from sqlalchemy import text

from har_edge.agent.outbox import Outbox, now_ms


@dataclass(frozen=True)
class PassRow:
    task: str
    last_success_ms: int | None
    last_failure_ms: int | None
    last_error: str | None


def record_pass(
    outbox: Outbox, task: str, *, error_kind: str | None, error: str = "", at_ms: int | None = None
) -> None:
    """Store the outcome of one pass of ``task``: a success when ``error_kind`` is None."""
    at = at_ms if at_ms is not None else now_ms()
    with outbox.transaction() as conn:
        if error_kind is None:
            conn.execute(
                text(
                    "INSERT INTO sync_passes (task, last_success_ms) VALUES (:t, :at) "
                    "ON CONFLICT (task) DO UPDATE SET last_success_ms = excluded.last_success_ms"
                ),
                {"t": task, "at": at},
            )
            return
        conn.execute(
            text(
                "INSERT INTO sync_passes (task, last_failure_ms, last_error) VALUES (:t, :at, :e) "
                "ON CONFLICT (task) DO UPDATE SET last_failure_ms = excluded.last_failure_ms, "
                "last_error = excluded.last_error"
            ),
            {"t": task, "at": at, "e": error[:2000]},
        )
        conn.execute(
            text(
                "INSERT INTO sync_failures (task, kind, count) VALUES (:t, :k, 1) "
                "ON CONFLICT (task, kind) DO UPDATE SET count = count + 1"
            ),
            {"t": task, "k": error_kind},
        )


def read_passes(conn: sqlite3.Connection) -> tuple[list[PassRow], list[tuple[str, str, int]]]:
    """(one row per task, [(task, kind, count)]) from a DBAPI connection; empty when sync never wrote them."""
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    passes: list[PassRow] = []
    failures: list[tuple[str, str, int]] = []
    if "sync_passes" in names:
        passes = [
            PassRow(*r)
            for r in conn.execute(
                "SELECT task, last_success_ms, last_failure_ms, last_error FROM sync_passes ORDER BY task"
            )
        ]
    if "sync_failures" in names:
        failures = [
            (str(t), str(k), int(n))
            for t, k, n in conn.execute("SELECT task, kind, count FROM sync_failures ORDER BY task, kind")
        ]
    return passes, failures

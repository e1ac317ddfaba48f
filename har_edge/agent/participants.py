"""Per-participant views of the outbox: the ``har-edge participants`` list and ``status --participant``.

Participant ids and watch pseudonyms only: the raw serial is never shown here.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, func, select

from har_edge.agent.outbox import PENDING_FILE, PENDING_POINT, Outbox, files, last_file_summary, metrics
from har_edge.common.states import FileStatus


def list_participants(outbox: Outbox) -> list[dict[str, Any]]:
    """Every participant with files: counts by status, windows, watches, last seen and delivery state."""
    processed = files.c.status == FileStatus.PROCESSED.value
    q = (
        select(
            files.c.participant,
            func.count().label("files"),
            func.sum(case((processed, 1), else_=0)).label("processed"),
            func.sum(case((files.c.status == FileStatus.FAILED.value, 1), else_=0)).label("failed"),
            func.sum(case((files.c.status == FileStatus.DUPLICATE.value, 1), else_=0)).label("duplicate"),
            func.coalesce(func.sum(files.c.windows), 0).label("windows"),
            func.max(files.c.received_ms).label("last_seen_ms"),
            func.max(func.coalesce(files.c.last_window_ms, 0)).label("last_window_ms"),
            func.sum(case((PENDING_FILE, 1), else_=0)).label("pending"),
            func.sum(case((files.c.finished_ms.is_not(None), 1), else_=0)).label("delivered"),
            func.count(func.distinct(files.c.watch_pseudonym)).label("watches"),
            func.min(files.c.participant_source).label("source"),
        )
        .where(files.c.participant.is_not(None))
        .group_by(files.c.participant)
        .order_by(files.c.participant)
    )
    with outbox.engine.connect() as conn:
        rows = conn.execute(q).all()
        unattributed = int(conn.execute(select(func.count()).where(files.c.participant.is_(None))).scalar() or 0)
    out = []
    for r in rows:
        pending, delivered = int(r.pending or 0), int(r.delivered or 0)
        out.append(
            {
                "participant": r.participant,
                "source": r.source,
                "files": int(r.files),
                "processed": int(r.processed or 0),
                "failed": int(r.failed or 0),
                "duplicate": int(r.duplicate or 0),
                "windows": int(r.windows or 0),
                "watches": int(r.watches or 0),
                "last_seen_ms": r.last_seen_ms,
                "last_data_ms": r.last_window_ms or None,
                "delivered_files": delivered,
                "pending_files": pending,
                "delivery": "pending" if pending else ("delivered" if delivered else "nothing to send"),
            }
        )
    if unattributed:
        out.append({"participant": None, "files": unattributed, "note": "files without a known watch or folder"})
    return out


def participant_status(outbox: Outbox, participant: str, recent: int) -> dict[str, Any]:
    """The parts of ``har-edge status`` about one participant's files (same keys, their values only)."""
    mine = files.c.participant == participant
    with outbox.engine.connect() as conn:
        by_status: dict[str, int] = dict(
            conn.execute(select(files.c.status, func.count()).where(mine).group_by(files.c.status)).all()
        )
        n_files, n_windows = conn.execute(
            select(func.count(), func.coalesce(func.sum(files.c.windows), 0)).where(mine, PENDING_FILE)
        ).one()
        n_points = conn.execute(
            select(func.count())
            .select_from(metrics.join(files, metrics.c.file_id == files.c.id))
            .where(mine, PENDING_POINT)
        ).scalar()
        last = conn.execute(select(files).where(mine).order_by(files.c.id.desc()).limit(1)).first()
    return {
        "participant": participant,
        "files": {k: int(v) for k, v in by_status.items()},
        "files_pending_delivery": int(n_files),
        "windows_pending_delivery": int(n_windows or 0),
        "metric_points_pending": int(n_points or 0),
        "last_file": last_file_summary(last),
        "recent_files": outbox.recent_files(recent, participant=participant),
    }

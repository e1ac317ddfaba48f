"""Delivery state in the outbox: what is still to send, and marking what the server acknowledged.

The agent owns the outbox schema (``har_edge.agent.outbox``); sync writes only the
delivery columns (``files.run_id``, ``files.artifact_delivered_ms``,
``files.finished_ms``, ``metrics.delivered_ms``, ``deployments.delivered_ms``)
plus ``sync_refusals`` (defined with the other tables in
``har_edge.agent.outbox_schema``): items the server answered with a permanent error
(a 4xx). Such an item is marked delivered (so it stops
blocking the backlog) *and* listed there with the server's answer, so nothing
disappears silently.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import Row, and_, delete, func, insert, select, update

from har_edge.agent.outbox import (
    PENDING_DEPLOYMENT,
    PENDING_FILE,
    PENDING_POINT,
    Backlog,
    Outbox,
    deployments,
    files,
    labels,
    metrics,
    now_ms,
    windows,
)
from har_edge.agent.outbox import sync_refusals as refusals

__all__ = ["Delivery", "PendingPoint", "refusals"]


@dataclass(frozen=True)
class PendingPoint:
    id: int
    key: str
    value: float
    timestamp_ms: int
    step: int


class Delivery:
    """The sync side of one outbox."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox  # the outbox owns every table, sync_refusals included (schema v2)

    # -- reading ----------------------------------------------------------------

    def pending_files(self, limit: int | None = None) -> Sequence[Row[*tuple[Any, ...]]]:
        """Processed files whose run is not finished yet, oldest first."""
        q = select(files).where(PENDING_FILE).order_by(files.c.id)
        if limit is not None:
            q = q.limit(limit)
        with self.outbox.engine.connect() as conn:
            return conn.execute(q).all()

    def pending_points(self, file_id: int | None, limit: int, after_id: int | None = None) -> list[PendingPoint]:
        """Undelivered points, oldest first; ``after_id``: only those after it (the next chunk while one is sent)."""
        cond = metrics.c.file_id.is_(None) if file_id is None else metrics.c.file_id == file_id
        q = (
            select(metrics.c.id, metrics.c.key, metrics.c.value, metrics.c.timestamp_ms, metrics.c.step)
            .where(cond, PENDING_POINT)
            .order_by(metrics.c.id)
            .limit(limit)
        )
        if after_id is not None:
            q = q.where(metrics.c.id > after_id)
        with self.outbox.engine.connect() as conn:
            return [PendingPoint(*r) for r in conn.execute(q).all()]

    def pending_deployments(self) -> Sequence[Row[*tuple[Any, ...]]]:
        with self.outbox.engine.connect() as conn:
            return conn.execute(select(deployments).where(PENDING_DEPLOYMENT).order_by(deployments.c.id)).all()

    def iter_windows(
        self, file_id: int, rows: int = 4096
    ) -> Generator[tuple[NDArray[np.int64], NDArray[np.float32]], None, None]:
        """A file's (start_ms, probabilities) in runs of ``rows`` windows, read as they are consumed.

        Each run is its own short read (the outbox begins every transaction IMMEDIATE): between two runs the
        outbox is free for writers, the agent's and this pass's marks, however slowly the runs are consumed."""
        after = -1
        while True:
            q = (
                select(windows.c.idx, windows.c.start_ms, windows.c.probs)
                .where(windows.c.file_id == file_id, windows.c.idx > after)
                .order_by(windows.c.idx)
                .limit(rows)
            )
            with self.outbox.engine.connect() as conn:
                part = conn.execute(q).all()
            if not part:
                return
            after = part[-1][0]
            starts = np.fromiter((r[1] for r in part), dtype=np.int64, count=len(part))
            probs = np.frombuffer(b"".join(r[2] for r in part), dtype="<f4").reshape(len(part), -1)
            yield starts, probs.astype(np.float32)
            if len(part) < rows:
                return

    def file_labels(self, file_id: int) -> list[str]:
        with self.outbox.engine.connect() as conn:
            rows = conn.execute(select(labels).where(labels.c.file_id == file_id).order_by(labels.c.idx))
            return [r.label for r in rows]

    def refused(self, kind: str, file_id: int | None) -> bool:
        with self.outbox.engine.connect() as conn:
            return (
                conn.execute(
                    select(func.count()).where(refusals.c.kind == kind, refusals.c.file_id == file_id)
                ).scalar_one()
                > 0
            )

    def refusal_rows(self) -> Sequence[Row[*tuple[Any, ...]]]:
        with self.outbox.engine.connect() as conn:
            return conn.execute(select(refusals).order_by(refusals.c.id)).all()

    def backlog(self) -> dict[str, int | None]:
        """Pending files, points and deployments and the time of the oldest (ms), as the outbox defines them."""
        b: Backlog = self.outbox.backlog()
        return {"files": b.files, "points": b.points, "deployments": b.deployments, "oldest_ms": b.oldest_ms}

    def last_device_point_ms(self, key: str) -> int | None:
        with self.outbox.engine.connect() as conn:
            return conn.execute(
                select(func.max(metrics.c.timestamp_ms)).where(metrics.c.file_id.is_(None), metrics.c.key == key)
            ).scalar()

    # -- marking ----------------------------------------------------------------

    def set_run_id(self, file_id: int, run_id: str) -> None:
        with self.outbox.transaction() as conn:
            conn.execute(update(files).where(files.c.id == file_id).values(run_id=run_id))

    def mark_points(self, ids: Sequence[int], at_ms: int | None = None) -> None:
        if not ids:
            return
        at_ms = at_ms if at_ms is not None else now_ms()
        with self.outbox.transaction() as conn:
            for i in range(0, len(ids), 900):
                conn.execute(update(metrics).where(metrics.c.id.in_(ids[i : i + 900])).values(delivered_ms=at_ms))

    def mark_artifact(self, file_id: int) -> None:
        with self.outbox.transaction() as conn:
            conn.execute(update(files).where(files.c.id == file_id).values(artifact_delivered_ms=now_ms()))

    def mark_finished(self, file_id: int) -> None:
        with self.outbox.transaction() as conn:
            conn.execute(update(files).where(files.c.id == file_id).values(finished_ms=now_ms()))

    def mark_deployment(self, deployment_id: int) -> None:
        with self.outbox.transaction() as conn:
            conn.execute(update(deployments).where(deployments.c.id == deployment_id).values(delivered_ms=now_ms()))

    def record_refusal(self, kind: str, file_id: int | None, obj: str, error: str) -> None:
        with self.outbox.transaction() as conn:
            conn.execute(
                insert(refusals).values(time_ms=now_ms(), kind=kind, file_id=file_id, object=obj, error=error[:4000])
            )

    def refuse_file(self, file_id: int, error: str) -> None:
        """Give up on a whole file (its run is gone or refuses everything): mark all of it, record why."""
        at = now_ms()
        with self.outbox.transaction() as conn:
            conn.execute(
                update(metrics)
                .where(metrics.c.file_id == file_id, metrics.c.delivered_ms.is_(None))
                .values(delivered_ms=at)
            )
            conn.execute(
                update(files)
                .where(files.c.id == file_id)
                .values(
                    artifact_delivered_ms=func.coalesce(files.c.artifact_delivered_ms, at),
                    finished_ms=at,
                )
            )
            conn.execute(
                insert(refusals).values(
                    time_ms=at, kind="file", file_id=file_id, object=f"file {file_id}", error=error[:4000]
                )
            )

    def reclaim(self, delivered_before_ms: int) -> tuple[int, int]:
        """Delete what is on the server since before the given time: per-window rows of finished files (their
        CSV is the run's artifact) and delivered device-level points. Returns (windows, points) deleted."""
        with self.outbox.transaction() as conn:
            done = select(files.c.id).where(
                and_(files.c.finished_ms.is_not(None), files.c.finished_ms < delivered_before_ms)
            )
            n_windows = conn.execute(delete(windows).where(windows.c.file_id.in_(done))).rowcount or 0
            n_points = (
                conn.execute(
                    delete(metrics).where(metrics.c.file_id.is_(None), metrics.c.delivered_ms < delivered_before_ms)
                ).rowcount
                or 0
            )
        return n_windows, n_points

"""The health gate: does a newly activated model behave on this device's real files?

Judged from what the agent stored in the outbox, against thresholds in
``har_edge.sync.health_*``:

- the agent recorded ``load_failed`` for it (it could not load the folder);
- of the first ``health_files`` files processed under it, more than
  ``health_max_failed_share`` failed (failures that cannot be the model's
  fault, ``health_ignored_error_kinds``, do not count and are not judged; an
  ``internal`` failure, a bug in har-edge, counts only when it happened in
  inference, ``files.error_stage``);
- their mean confidence fell below ``health_min_confidence_ratio`` times the
  previous model's over its last ``health_files`` files -- only when both
  models have the same label set (confidence over 6 classes says nothing about
  confidence over 11), and skipped when the previous model left no files;
- otherwise the failure share and input saturation decide: more than
  ``health_max_input_outside_share`` of the scaled input values beyond the int8
  input range (mean over the files, worst channel) fails the model.

The verdict's reason names the criteria that applied; it goes into the
deployment record.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, func, or_, select

from har_edge.agent.outbox import Outbox, deployments, files, metrics
from har_edge.agent.settings import SyncSettings
from har_edge.common.states import DeploymentOutcome, FileStatus
from har_edge.sync.state import Probation

CONFIDENCE_KEY = "mean_confidence"
OUTSIDE_PREFIX = "quality_input_outside_share_"


@dataclass(frozen=True)
class Verdict:
    state: str  # pending | healthy | failed
    reason: str


def _mean_confidence(conn: Connection, file_ids: list[int]) -> float | None:
    if not file_ids:
        return None
    mean = conn.execute(
        select(func.avg(metrics.c.value)).where(metrics.c.file_id.in_(file_ids), metrics.c.key == CONFIDENCE_KEY)
    ).scalar()
    return None if mean is None else float(mean)


def _input_outside(conn: Connection, file_ids: list[int]) -> float | None:
    """Mean over the files of the worst channel's share of inputs beyond the int8 range."""
    if not file_ids:
        return None
    rows = conn.execute(
        select(metrics.c.file_id, func.max(metrics.c.value))
        .where(metrics.c.file_id.in_(file_ids), metrics.c.key.like(OUTSIDE_PREFIX + "%"))
        .group_by(metrics.c.file_id)
    ).all()
    return sum(float(r[1]) for r in rows) / len(rows) if rows else None


def judge(
    outbox: Outbox,
    p: Probation,
    s: SyncSettings,
    *,
    labels: tuple[list[str] | None, list[str] | None] = (None, None),
) -> Verdict:
    """``labels``: (new model's, previous model's) label lists; confidence is compared only when they agree."""
    n = s.health_files
    with outbox.engine.connect() as conn:
        failed_load = conn.execute(
            select(deployments)
            .where(
                deployments.c.outcome == DeploymentOutcome.LOAD_FAILED.value,
                deployments.c.to_version == p.folder,
                deployments.c.time_ms >= p.since_ms,
            )
            .order_by(deployments.c.id)
        ).first()
        if failed_load is not None:
            return Verdict("failed", f"the agent could not load {p.folder}: {failed_load.reason}")
        rows = conn.execute(
            select(files.c.id, files.c.status, files.c.error_kind)
            .where(
                files.c.model_sha256 == p.sha256,
                files.c.processed_ms >= p.since_ms,
                or_(
                    files.c.status == FileStatus.PROCESSED.value,
                    (files.c.status == FileStatus.FAILED.value)
                    & files.c.error_kind.not_in(s.health_ignored_error_kinds)
                    & or_(files.c.error_kind != "internal", files.c.error_stage == "inference"),
                ),
            )
            .order_by(files.c.id)
            .limit(n)
        ).all()
        if len(rows) < n:
            return Verdict("pending", f"{len(rows)} of {n} files processed under {p.version} so far")
        failed = sum(1 for r in rows if r.status == FileStatus.FAILED)
        if failed / n > s.health_max_failed_share:
            kinds = sorted({r.error_kind for r in rows if r.status == FileStatus.FAILED})
            return Verdict(
                "failed",
                f"{failed} of the first {n} files under {p.version} failed ({', '.join(kinds)}), "
                f"more than sync.health_max_failed_share={s.health_max_failed_share:g}",
            )
        processed = [r.id for r in rows if r.status == FileStatus.PROCESSED]
        outside = _input_outside(conn, processed)
        limit = s.health_max_input_outside_share
        if outside is not None and outside > limit:
            return Verdict(
                "failed",
                f"{outside:.1%} of the scaled inputs under {p.version} lie beyond its int8 input range "
                f"(more than sync.health_max_input_outside_share={limit:g}): wrong units or scaler? "
                "criteria: failure share, saturation",
            )
        new_labels, prev_labels = labels
        same_labels = new_labels is not None and prev_labels is not None and list(new_labels) == list(prev_labels)
        if not same_labels:
            why = "label sets differ" if new_labels is not None and prev_labels is not None else "label sets unknown"
            sat = f", inputs beyond int8 range {outside:.2%}" if outside is not None else ""
            return Verdict(
                "healthy",
                f"{n} files processed, {failed} failed{sat}; criteria: failure share, saturation "
                f"(confidence not compared: {why})",
            )
        new_conf = _mean_confidence(conn, processed)
        prev_ids = []
        if p.previous_sha256:
            prev_ids = list(
                conn.execute(
                    select(files.c.id)
                    .where(
                        files.c.model_sha256 == p.previous_sha256,
                        files.c.status == FileStatus.PROCESSED.value,
                        files.c.processed_ms < p.since_ms,
                    )
                    .order_by(files.c.id.desc())
                    .limit(n)
                ).scalars()
            )
        prev_conf = _mean_confidence(conn, prev_ids)
    if new_conf is not None and prev_conf:
        ratio = new_conf / prev_conf
        if ratio < s.health_min_confidence_ratio:
            return Verdict(
                "failed",
                f"mean confidence under {p.version} is {new_conf:.3f}, {ratio:.0%} of {prev_conf:.3f} under "
                f"{p.previous_version} (below sync.health_min_confidence_ratio={s.health_min_confidence_ratio:g}); "
                "criteria: failure share, saturation, confidence (same label set)",
            )
        return Verdict(
            "healthy",
            f"{n} files, mean confidence {new_conf:.3f} vs {prev_conf:.3f} before; "
            "criteria: failure share, saturation, confidence (same label set)",
        )
    note = "" if prev_conf else "; no earlier files to compare confidence with"
    return Verdict("healthy", f"{n} files processed, {failed} failed{note}; criteria: failure share, saturation")

"""Erasing one participant from the device: outbox rows, raw exports, and (through a hook) their MLflow runs.

``forget(settings, outbox, participant)`` (``har-edge forget``) runs under sync's push lock, so no
push pass is under way while it erases, and in this order:

1. a ``forget_requests`` row (participant, time T) is written: from then on sync never pushes a
   file of that participant received before T (:func:`withheld`), and the agent erases such a file
   as soon as it has finished it (:func:`honour`): a file in flight is finished, then forgotten;
2. in one ``BEGIN IMMEDIATE`` transaction, every row of their files received before T: files,
   windows, labels, metric points, kept windows, sync refusals, and their entries in retraining
   requests;
3. their raw exports: ``archive/<date>/<participant>/``, ``quarantine/<participant>/`` (with reasons),
   ``inbox/<participant>/``, and exports stored flat (from before participant folders) found by
   name and sha256;
4. their MLflow runs and their raw exports in custody (``sync.raw_store``), when a ``server`` hook is given
   (``har_edge.sync.forget``);
5. it waits (``wait_s``) for files claimed before T to leave ``work/``, erases what they left,
   and deletes the request row: nothing names the participant any more. If one is still in flight
   (the agent is stopped with a file in work/), the request stays open and the agent finishes it.

Every step is idempotent: forgetting twice, or a participant that never was, removes nothing more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, exists, func, insert, select, update
from sqlalchemy.exc import OperationalError

from har_edge.agent.errors import HarEdgeError
from har_edge.agent.identity import valid_participant_id
from har_edge.agent.outbox import (
    Outbox,
    attempts,
    files,
    flagged_windows,
    labels,
    metrics,
    now_ms,
    retrain_requests,
    sync_refusals,
    windows,
)
from har_edge.agent.outbox_schema import forget_requests
from har_edge.agent.retention import REASON_SUFFIX
from har_edge.agent.settings import Settings
from har_edge.agent.watcher import SYNC_PUSH_LOCK, held_elsewhere
from har_edge.common.hashing import export_sha256
from har_edge.common.locks import file_lock

log = logging.getLogger(__name__)

#: erases off the device: (participant, sha256 of each export erased) -> what was done, for the report
ServerEraser = Callable[[str, list[str]], dict[str, Any]]


class ForgetError(HarEdgeError):
    kind = "forget"


@dataclass
class ForgetReport:
    """What was removed where (counts and paths relative to the data dir)."""

    participant: str
    requested_ms: int = 0
    outbox: dict[str, int] = field(default_factory=dict)
    archive: list[str] = field(default_factory=list)
    quarantine: list[str] = field(default_factory=list)
    inbox: list[str] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)
    #: files of anyone in work/ when asked that had not left it when forget returned
    in_flight: int = 0
    #: the request row stays until the agent has finished those files
    request_open: bool = False
    #: files that were in flight when asked, finished by the agent, then erased here
    finished_in_flight: int = 0

    def add(self, counts: dict[str, int]) -> None:
        for k, v in counts.items():
            self.outbox[k] = self.outbox.get(k, 0) + v

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        o = self.outbox
        out = [
            f"participant {self.participant}:",
            f"  outbox:     {o.get('files', 0)} files, {o.get('windows', 0)} windows, "
            f"{o.get('metric_points', 0)} metric points, {o.get('kept_windows', 0)} kept-window sets, "
            f"{o.get('refusals', 0)} sync refusals, {o.get('retrain_entries', 0)} retraining-request entries",
            f"  archive/:   {len(self.archive)} files",
            f"  quarantine/: {len(self.quarantine)} files (with their reasons)",
            f"  inbox/:     {len(self.inbox)} files waiting in the participant's folder",
        ]
        s = self.server
        if s.get("error"):
            out.append(f"  server:     FAILED: {s['error']}")
        elif s.get("skipped"):
            out.append(f"  server:     {s['skipped']}")
        elif s:
            out.append(
                f"  server:     {s.get('runs_deleted', 0)} MLflow runs deleted at {s.get('target', '?')}"
                + (" and purged" if s.get("purged") else " (soft delete: run `mlflow gc` on the server to purge)")
            )
        raw = s.get("raw_store") or {}
        if raw.get("store"):
            out.append(f"  raw store:  {raw.get('exports_erased', 0)} raw exports erased from {raw['store']}")
        if s.get("raw_exports_sha256"):
            out.append(
                "  raw store:  not reached; its objects are named by these sha256: "
                + ", ".join(s["raw_exports_sha256"])
            )
        if self.request_open:
            out.append(
                f"  {self.in_flight} file(s) were still in work/: the agent erases them when it has finished them "
                "(sync never pushes them); run forget again later to confirm"
            )
        return out


# -- locking ---------------------------------------------------------------------------------------


def push_lock(data_dir: Path, timeout_s: float) -> contextlib.AbstractContextManager[None]:
    """Hold sync's push lock (the one ``har-edge sync`` takes for a push pass): no push runs meanwhile."""

    def busy(path: Path, waited_s: float) -> Exception:
        return ForgetError(
            f"{path} is held by a sync push for over {waited_s:.0f} s: try again, or stop "
            "`har-edge sync run` while forgetting"
        )

    return file_lock(Path(data_dir) / SYNC_PUSH_LOCK, timeout_s, busy)


# -- requests ---------------------------------------------------------------------------------------


def open_request(outbox: Outbox, participant: str, now: int | None = None) -> int:
    """Record that the participant is to be forgotten (durably); returns the request time T."""
    t = now if now is not None else now_ms()
    with outbox.transaction(durable=True) as conn:
        conn.execute(insert(forget_requests).values(participant=participant, requested_ms=t))
    return t


def open_requests(outbox: Outbox) -> list[Any]:
    with outbox.engine.connect() as conn:
        return list(conn.execute(select(forget_requests).order_by(forget_requests.c.id)).all())


#: a file row covered by an open request: its participant's, received before the request
_COVERED = exists().where(
    forget_requests.c.participant == files.c.participant, forget_requests.c.requested_ms >= files.c.received_ms
)


def withheld(outbox: Outbox, file_id: int) -> bool:
    """True when the file is to be forgotten (an open request covers it): sync must not push it."""
    with outbox.engine.connect() as conn:
        return bool(conn.execute(select(exists().where(files.c.id == file_id, _COVERED))).scalar())


def _in_flight(outbox: Outbox, before_ms: int) -> int:
    """Files in work/ claimed before ``before_ms`` (their attempt is deleted once they left work/)."""
    with outbox.engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(attempts.c.started_ms <= before_ms)).scalar() or 0)


# -- the outbox ---------------------------------------------------------------------------------------


def erase_rows(outbox: Outbox, participant: str, upto_ms: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Delete every row of the participant's files received up to ``upto_ms``, in one transaction.

    Returns the counts and the (sha256, name) of the files, to find their exports."""
    cond = and_(files.c.participant == participant, files.c.received_ms <= upto_ms)
    with outbox.engine.connect() as conn:  # the cheap question first: most calls (the agent's) find nothing
        if not conn.execute(select(exists().where(cond))).scalar():
            return {}, []
    with outbox.transaction(durable=True) as conn:
        # freed pages are overwritten with zeros: the deleted rows do not linger in the file's free space
        conn.exec_driver_sql("PRAGMA secure_delete = ON")
        rows = conn.execute(select(files.c.id, files.c.sha256, files.c.name).where(cond)).all()
        ids = [r.id for r in rows]
        if not ids:
            return {}, []

        def erase(table: Any) -> int:
            """Delete the files' rows of ``table``; how many there were."""
            return int(conn.execute(delete(table).where(table.c.file_id.in_(ids))).rowcount or 0)

        # windows, labels, metrics and kept windows go with their file (ON DELETE CASCADE); deleted explicitly
        # (and counted so) as well, so an outbox opened without foreign keys loses nothing of the erasure
        counts = {
            "files": len(ids),
            "windows": erase(windows),
            "labels": erase(labels),
            "metric_points": erase(metrics),
            "kept_windows": erase(flagged_windows),
            "refusals": erase(sync_refusals),
            "retrain_entries": _scrub_retrain_requests(conn, set(ids)),
        }
        conn.execute(update(files).where(files.c.duplicate_of.in_(ids)).values(duplicate_of=None))
        conn.execute(delete(files).where(files.c.id.in_(ids)))
        # the device's daily pages counted these files: sync draws them again from what is left
        conn.execute(update(files).where(files.c.daily_ms.is_not(None)).values(daily_ms=None))
    _checkpoint(outbox)
    return counts, [(r.sha256, r.name) for r in rows]


def _checkpoint(outbox: Outbox) -> None:
    """Copy the WAL into the file and truncate it, so the deleted rows' old pages leave the WAL too (best effort:
    a reader still open keeps the WAL until the next checkpoint)."""
    try:
        with outbox.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    except OperationalError as exc:  # busy: the next checkpoint (SQLite's own, every 1000 pages) does it
        log.debug("outbox checkpoint after an erasure deferred: %s", exc)


def _scrub_retrain_requests(conn: Any, ids: set[int]) -> int:
    """Drop the erased files from the lists of retraining requests; returns how many entries went."""
    removed = 0
    for req in conn.execute(select(retrain_requests.c.id, retrain_requests.c.files_json)).all():
        try:
            listed = json.loads(req.files_json)
        except ValueError:
            continue
        kept = [f for f in listed if not (isinstance(f, dict) and f.get("file_id") in ids)]
        if len(kept) != len(listed):
            removed += len(listed) - len(kept)
            conn.execute(
                update(retrain_requests).where(retrain_requests.c.id == req.id).values(files_json=json.dumps(kept))
            )
    return removed


# -- the data dir ---------------------------------------------------------------------------------------


def _remove_tree(folder: Path, data_dir: Path, into: list[str]) -> None:
    if not folder.is_dir():
        return
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.endswith(REASON_SUFFIX):
            into.append(str(p.relative_to(data_dir)))
    shutil.rmtree(folder, ignore_errors=True)


def _named_like(candidate: str, name: str) -> bool:
    """``name``, or the ``<stem>.<n><suffix>`` the watcher makes of it when the name was taken."""
    if candidate == name:
        return True
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    head = f"{stem}."
    tail = f".{suffix}" if suffix else ""
    middle = candidate[len(head) : len(candidate) - len(tail)] if tail else candidate[len(head) :]
    return candidate.startswith(head) and candidate.endswith(tail) and middle.isdigit()


def _flat_matches(folder: Path, exports: list[tuple[str, str]]) -> list[list[Path]]:
    """Exports stored flat in ``folder`` (no participant folder) that are the participant's: name, then sha256."""
    from har_edge.agent.decode import pair_key

    try:
        present = [p for p in folder.iterdir() if p.is_file() and not p.name.endswith(REASON_SUFFIX)]
    except FileNotFoundError:
        return []
    found: list[list[Path]] = []
    for sha, name in exports:
        for cand in present:
            if not _named_like(cand.name, name):
                continue
            group = [cand]
            key = pair_key(cand) if cand.suffix.lower() in (".csv", ".xlsx") else None
            if key is not None:  # a table pair: its partner has the same prefix, in the same folder
                group += [q for q in present if q != cand and (k := pair_key(q)) is not None and k[0] == key[0]]
            for members in ([cand], group) if len(group) > 1 else ([cand],):
                try:
                    if export_sha256(members) == sha:
                        found.append(members)
                        break
                except OSError:
                    continue
    return found


def erase_exports(
    settings: Settings, participant: str, exports: list[tuple[str, str]], report: ForgetReport, *, inbox: bool
) -> None:
    """Remove the participant's raw exports from archive/, quarantine/ (reasons too) and, if ``inbox``, inbox/."""
    data = settings.data_dir
    for day in sorted(settings.archive_dir.glob("*/")):
        _remove_tree(day / participant, data, report.archive)
    _remove_tree(settings.quarantine / participant, data, report.quarantine)
    if inbox:
        _remove_tree(settings.inbox / participant, data, report.inbox)
    with contextlib.suppress(OSError):
        (settings.work / participant).rmdir()  # emptied once the agent moved its files on (a file in flight stays)
    if not exports:
        return
    flat = [(d, report.archive) for d in sorted(settings.archive_dir.glob("*/"))] + [
        (settings.quarantine, report.quarantine)
    ]
    for folder, into in flat:
        for group in _flat_matches(folder, exports):
            for p in group:
                into.append(str(p.relative_to(data)))
                p.unlink(missing_ok=True)
                Path(str(p) + REASON_SUFFIX).unlink(missing_ok=True)


def _erase_now(settings: Settings, outbox: Outbox, participant: str, upto_ms: int, report: ForgetReport) -> None:
    counts, exports = erase_rows(outbox, participant, upto_ms)
    report.add(counts)
    erase_exports(settings, participant, exports, report, inbox=False)


# -- the agent's side -------------------------------------------------------------------------------


def honour(settings: Settings, outbox: Outbox) -> int:
    """Erase what open requests cover (files finished since they were asked); close requests with nothing left
    in flight. Returns the number of files erased. Cheap when there is no request (one query)."""
    erased = 0
    reqs = open_requests(outbox)
    if not reqs or held_elsewhere(Path(settings.data_dir) / SYNC_PUSH_LOCK):
        # the lock held: `forget` itself is at work (it erases what finishes while it waits, and reports it),
        # or a sync pass is (which skips covered files): the next pass honours the request
        return 0
    for req in reqs:
        report = ForgetReport(req.participant)
        _erase_now(settings, outbox, req.participant, req.requested_ms, report)
        erased += report.outbox.get("files", 0)
        if report.outbox.get("files"):
            log.info("erased %d file(s) finished after an erasure request", report.outbox["files"])
        if _in_flight(outbox, req.requested_ms) == 0:
            _erase_now(settings, outbox, req.participant, req.requested_ms, report)
            with outbox.transaction(durable=True) as conn:
                conn.execute(delete(forget_requests).where(forget_requests.c.id == req.id))
    return erased


# -- the command -------------------------------------------------------------------------------------


def forget(
    settings: Settings,
    outbox: Outbox,
    participant: str,
    *,
    server: ServerEraser | None = None,
    wait_s: float = 120.0,
    lock_timeout_s: float = 180.0,
) -> ForgetReport:
    """Erase a participant everywhere (see the module docstring); returns what was removed where."""
    if not valid_participant_id(participant):
        raise ForgetError(
            f"{participant!r} is not a participant id (1-64 letters, digits, '.', '_' or '-'): "
            "give the id `har-edge participants` lists"
        )
    report = ForgetReport(participant)
    with push_lock(settings.data_dir, lock_timeout_s):
        t = open_request(outbox, participant)
        report.requested_ms = t
        counts, exports = erase_rows(outbox, participant, t)
        report.add(counts)
        erase_exports(settings, participant, exports, report, inbox=True)
        if server is not None:
            try:
                report.server = server(participant, [sha for sha, _ in exports])
            except HarEdgeError as exc:  # the device is erased all the same; the runs wait for another try
                log.error("deleting the participant's MLflow runs failed: %s", exc)
                # the rows are gone now, so a second run would not know the exports' names: they are reported
                report.server = {
                    "error": f"{exc}: run forget again once the server answers (it deletes the runs by tag); "
                    "delete the raw exports listed here from sync.raw_store by hand if one is configured",
                    "raw_exports_sha256": [sha for sha, _ in exports],
                }
        deadline = time.monotonic() + wait_s
        while _in_flight(outbox, t) and time.monotonic() < deadline:
            time.sleep(0.2)
        before = report.outbox.get("files", 0)
        _erase_now(settings, outbox, participant, t, report)  # what finished meanwhile
        report.finished_in_flight = report.outbox.get("files", 0) - before
        report.in_flight = _in_flight(outbox, t)
        if report.in_flight == 0:
            with outbox.transaction(durable=True) as conn:
                conn.execute(
                    delete(forget_requests).where(
                        forget_requests.c.participant == participant, forget_requests.c.requested_ms <= t
                    )
                )
        else:
            report.request_open = True
    log.info(
        "erasure request done: %d files, %d archived and %d quarantined exports removed",
        report.outbox.get("files", 0),
        len(report.archive),
        len(report.quarantine),
    )
    return report

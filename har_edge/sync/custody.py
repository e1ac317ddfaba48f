"""Raw custody: every raw export kept in ``archive/`` goes to the study's store, checksummed and resumable.

One pass (:meth:`Custody.run`), at most ``sync.raw_store_pass_s`` long, oldest file first:

1. list ``archive/<day>/``; a file not yet in the outbox's ``raw_custody`` table (or changed since: size or
   mtime) is hashed (sha256) and recorded ``pending``;
2. a file whose content is already in the store, verified (an earlier device, a crash after the upload
   completed), is marked ``delivered`` without sending anything;
3. otherwise it is sent (:mod:`har_edge.sync.rawstore`, :mod:`har_edge.sync.rawstore_s3`); the upload state
   (S3 multipart upload id and acknowledged parts, or the bytes copied) is written to its row after each part,
   so a killed sync resumes where it stopped; the row becomes ``delivered`` only after the store's checksums of
   the complete object matched the file's.

Retention (:mod:`har_edge.agent.retention`) deletes an archived export only once every file of it is
``delivered`` to the configured store. A store that cannot be reached ends the pass (the daemon backs
off); a checksum mismatch drops that upload, counts against the row and is retried on the next pass.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, insert, select, update

from har_edge.agent.acknowledged import DELIVERED, UPLOADING, CustodyBacklog, archived_files, custody_backlog
from har_edge.agent.forget import open_requests
from har_edge.agent.outbox import Outbox, now_ms
from har_edge.agent.outbox_schema import raw_custody
from har_edge.agent.settings import Settings
from har_edge.common.hashing import sha256_file
from har_edge.sync.errors import CustodyMismatch, ServerAccessDenied, ServerUnreachable, SyncError
from har_edge.sync.locks import file_lock
from har_edge.sync.rawstore import Expired, Item, RawStore, object_key, open_store

log = logging.getLogger(__name__)

LOCK_NAME = ".sync-custody.lock"
PENDING = "pending"


@dataclass
class CustodyReport:
    hashed: int = 0
    delivered: int = 0  # rows that became delivered in this pass
    already_there: int = 0  # of those, content the store held already (nothing sent)
    bytes_sent: int = 0
    parts_sent: int = 0
    deferred: bool = False  # the pass's time ran out (or it was stopped) with files left
    failed: list[str] = field(default_factory=list)  # "<file>: <why>" for mismatches and refused items
    first_error: Exception | None = None  # the first of those (its kind is what sync_failures counts)
    backlog: CustodyBacklog | None = None

    @property
    def delivered_anything(self) -> bool:
        return bool(self.delivered or self.parts_sent)

    def summary(self) -> str:
        parts = [
            f"{self.delivered} file(s) delivered ({self.already_there} already in the store)",
            f"{self.bytes_sent / 1e6:.1f} MB in {self.parts_sent} part(s)",
        ]
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        if self.backlog is not None:
            parts.append(f"{self.backlog.files} file(s), {self.backlog.bytes / 1e6:.1f} MB still to deliver")
        return ", ".join(parts)


class Custody:
    """Delivers one data dir's archive to ``sync.raw_store``. One pass at a time (a lock file enforces it)."""

    def __init__(self, settings: Settings, outbox: Outbox, *, store: RawStore | None = None) -> None:
        self.settings = settings
        self.outbox = outbox
        found = store or open_store(settings)
        if found is None:
            raise ValueError("raw custody needs sync.raw_store")
        self.store: RawStore = found
        self.archive = settings.archive_dir

    def backlog(self) -> CustodyBacklog:
        return custody_backlog(self.outbox, self.archive, self.store.url)

    def run(self, stop: threading.Event | None = None, *, budget_s: float | None = None) -> CustodyReport:
        """One pass; raises ServerUnreachable / ServerAccessDenied when the store cannot be used at all."""
        report = CustodyReport()
        deadline = time.monotonic() + (self.settings.sync.raw_store_pass_s if budget_s is None else budget_s)

        def expired() -> bool:
            return (stop is not None and stop.is_set()) or time.monotonic() >= deadline

        if open_requests(self.outbox):  # an erasure under way: nothing of that participant may leave now
            log.info("raw custody: an erasure request is open (har-edge forget); this pass uploads nothing")
            report.deferred = True
            report.backlog = self.backlog()
            return report
        with file_lock(Path(self.settings.data_dir) / LOCK_NAME, 5.0):
            rows = self._rows()
            files = archived_files(self.archive)
            present = {rel for rel, _ in files}
            self._forget_vanished(rows, present)
            for rel, st in files:
                r = rows.get(rel)
                fresh = r is not None and r["size"] == st.st_size and r["mtime_ns"] == st.st_mtime_ns
                if fresh and r is not None and r["state"] == DELIVERED and r["store"] == self.store.url:
                    continue
                if expired():
                    report.deferred = True
                    break
                path = self.archive / rel
                try:
                    if not fresh:
                        r = self._found(rel, path, st.st_size, st.st_mtime_ns, r)
                        report.hashed += 1
                    assert r is not None
                    item = self._item(path, r)
                    if not self._deliver(item, r, expired, report):
                        report.deferred = True
                        break
                except (ServerUnreachable, ServerAccessDenied) as exc:
                    self._note(rel, str(exc))
                    raise
                except CustodyMismatch as exc:
                    log.warning("raw custody: %s", exc)
                    self._note(rel, str(exc), reset=True)
                    report.failed.append(f"{rel}: {exc}")
                    report.first_error = report.first_error or exc
                except FileNotFoundError:
                    continue  # retention or a person removed it meanwhile: forgotten on the next pass
                except (OSError, SyncError) as exc:
                    log.warning("raw custody: %s could not be delivered: %s", rel, exc)
                    self._note(rel, str(exc))
                    report.failed.append(f"{rel}: {exc}")
                    report.first_error = report.first_error or exc
            report.backlog = self.backlog()
        if report.delivered_anything or report.failed:
            log.info("raw custody to %s: %s", self.store.display, report.summary())
        return report

    # -- one file ----------------------------------------------------------------------------------

    def _deliver(self, item: Item, row: dict[str, Any], expired: Expired, report: CustodyReport) -> bool:
        """Deliver one file; False when the pass expired first (its progress is stored)."""
        moved = row["store"] != self.store.url or row["object_key"] != item.key
        if moved and row["upload_id"]:
            self.store.discard(item)  # a part-way upload to another store or key (settings changed)
        if moved:
            item.upload_id, item.part_size, item.parts, item.bytes_done = None, None, [], 0
            self._save(item)
        checksum = None
        if not item.upload_id and not item.bytes_done:
            checksum = self.store.present(item)
            if checksum is not None:
                report.already_there += 1
        if checksum is None:
            try:
                checksum = self.store.upload(item, expired, self._save)
            finally:
                report.bytes_sent += item.sent
                report.parts_sent += item.parts_sent
        if checksum is None:
            return False
        with self.outbox.transaction() as conn:
            conn.execute(
                update(raw_custody)
                .where(raw_custody.c.path == item.rel)
                .values(
                    state=DELIVERED,
                    delivered_ms=now_ms(),
                    checksum=checksum[:2000],
                    upload_id=None,
                    parts_json=None,
                    bytes_done=item.size,
                    last_error=None,
                )
            )
        report.delivered += 1
        log.info("raw custody: %s delivered to %s (%s)", item.rel, self.store.display, checksum)
        return True

    def _item(self, path: Path, r: dict[str, Any]) -> Item:
        parts = json.loads(r["parts_json"]) if r["parts_json"] else []
        return Item(
            path=path,
            rel=r["path"],
            size=int(r["size"]),
            sha256=str(r["sha256"]),
            device=self.settings.device,
            key=object_key(str(r["sha256"])),
            upload_id=r["upload_id"],
            part_size=r["part_size"],
            parts=parts,
            bytes_done=int(r["bytes_done"] or 0),
        )

    # -- the outbox --------------------------------------------------------------------------------

    def _rows(self) -> dict[str, dict[str, Any]]:
        with self.outbox.engine.connect() as conn:
            return {r.path: dict(r._mapping) for r in conn.execute(select(raw_custody))}

    def _found(self, rel: str, path: Path, size: int, mtime_ns: int, old: dict[str, Any] | None) -> dict[str, Any]:
        """Hash a new (or changed) file and record it pending."""
        if old is not None and old["upload_id"]:
            self.store.discard(self._item(path, old))
        sha = sha256_file(path)
        values = {
            "path": rel,
            "size": size,
            "mtime_ns": mtime_ns,
            "sha256": sha,
            "found_ms": now_ms(),
            "state": PENDING,
            "store": self.store.url,
            "object_key": object_key(sha),
            "upload_id": None,
            "part_size": None,
            "parts_json": None,
            "bytes_done": 0,
            "delivered_ms": None,
            "checksum": None,
            "attempts": old["attempts"] if old else 0,  # a file hashed again keeps its count
            "last_error": old["last_error"] if old else None,
        }
        with self.outbox.transaction() as conn:
            conn.execute(delete(raw_custody).where(raw_custody.c.path == rel))
            conn.execute(insert(raw_custody).values(**values))
        return values

    def _save(self, item: Item) -> None:
        """The upload state after a part: what a killed sync resumes from."""
        with self.outbox.transaction() as conn:
            conn.execute(
                update(raw_custody)
                .where(raw_custody.c.path == item.rel)
                .values(
                    state=UPLOADING if item.upload_id or item.bytes_done else PENDING,
                    store=self.store.url,
                    object_key=item.key,
                    upload_id=item.upload_id,
                    part_size=item.part_size,
                    parts_json=json.dumps(item.parts) if item.parts else None,
                    bytes_done=item.bytes_done,
                )
            )

    def _note(self, rel: str, error: str, *, reset: bool = False) -> None:
        values: dict[str, Any] = {"attempts": raw_custody.c.attempts + 1, "last_error": error[:2000]}
        if reset:
            values.update(state=PENDING, upload_id=None, part_size=None, parts_json=None, bytes_done=0)
            # a changed file is hashed again: its size and mtime no longer match a stale row
            values.update(mtime_ns=-1)
        with self.outbox.transaction() as conn:
            conn.execute(update(raw_custody).where(raw_custody.c.path == rel).values(**values))

    def _forget_vanished(self, rows: dict[str, dict[str, Any]], present: set[str]) -> None:
        """Rows of files no longer in archive/: a delivered one stays as the record; others are dropped."""
        gone = [rel for rel, r in rows.items() if rel not in present and r["state"] != DELIVERED]
        for rel in gone:
            r = rows.pop(rel)
            log.warning("raw custody: %s left archive/ before it reached %s", rel, self.store.display)
            if r["upload_id"]:
                self.store.discard(self._item(self.archive / rel, r))
            with self.outbox.transaction() as conn:
                conn.execute(delete(raw_custody).where(raw_custody.c.path == rel))

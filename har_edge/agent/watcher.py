"""The drop folder: which files are complete, claiming them, and where they go afterwards.

A file is taken once its size and mtime stayed the same for ``settle_s`` and its
own structure says it is whole (FIT header, size and CRC; zip end record). A file
too short to identify (under :data:`MIN_IDENTIFY_BYTES`, an empty one included) is
never whole: a copy that opened the file and paused is not taken as empty. A file
that stays incomplete for much longer than that (``stale_s``) is taken anyway, so a
truncated export ends in quarantine with its reason instead of waiting forever; when
it was first seen so is kept in the outbox (``inbox_seen``), so a restart does not
reset that timer.
Study tables travel in pairs (``…accelerometer…`` + ``…gyroscope…`` with one
prefix, in one folder) and are claimed together.

One level of subfolders is watched too: ``inbox/<participant>/<file>`` (the folder-per-participant
layout, :mod:`har_edge.agent.identity`). Such a file keeps its folder through ``work/<participant>/``,
``archive/<date>/<participant>/`` and ``quarantine/<participant>/`` (and ``replay`` puts it back there),
so erasing that participant (:mod:`har_edge.agent.forget`) removes folders; files dropped into the inbox
itself stay flat, and erasure finds them by name and sha256.

Claiming is an atomic rename into ``work/``; after processing the file moves to
``archive/<date>/`` (or is deleted) or to ``quarantine/`` with ``<name>.reason.json``.
Files left in ``work/`` by a crash are recovered at start. Every rename is made
durable with an fsync of the directories involved.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from har_edge.agent import __version__
from har_edge.agent.decode import check_complete, pair_key
from har_edge.agent.errors import HarEdgeError
from har_edge.agent.identity import valid_participant_id
from har_edge.agent.modelstore import fsync_dir

if TYPE_CHECKING:
    from har_edge.agent.decode.fit import Verified

log = logging.getLogger(__name__)

#: fewer bytes than this cannot say what a file is (a FIT header is 12 bytes): such a file is never complete
MIN_IDENTIFY_BYTES = 12

#: sync's lock while it pushes, and the folder of its temporary files (``har_edge.sync.push``)
SYNC_PUSH_LOCK = ".sync-push.lock"
SYNC_TMP = ".sync-tmp"

IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".swp", ".reason.json")


def ignored(path: Path) -> bool:
    n = path.name
    return n.startswith(".") or n.startswith("~$") or n.lower().endswith(IGNORED_SUFFIXES)


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    stable_since: float
    #: wall time (ms) the file was first seen settled but incomplete, unchanged since (from the outbox)
    incomplete_since_ms: int | None = None


class SeenStore(Protocol):
    """Where first-seen times of incomplete inbox files outlive the process (the outbox)."""

    def first_seen_ms(self, name: str, size: int, mtime_ns: int, now: int | None = None) -> int: ...

    def seen_names(self) -> set[str]: ...

    def forget_seen(self, names: Iterable[str]) -> None: ...


def file_complete(path: Path) -> Verified | bool:
    """The watcher's completeness rule: long enough to identify, and whole by its format's own check.

    For a whole FIT file the result is the proof of its check (a truthy ``Verified``), for decoding to reuse.
    """
    try:
        if path.stat().st_size < MIN_IDENTIFY_BYTES:
            return False
    except FileNotFoundError:
        return False
    return check_complete(path)


def _move(src: Path, dest: Path) -> None:
    """Rename (or copy across filesystems) and make it durable: fsync of both directories."""
    shutil.move(str(src), dest)
    fsync_dir(dest.parent)
    if src.parent != dest.parent:
        fsync_dir(src.parent)


def _unique(dest: Path) -> Path:
    if not dest.exists():
        return dest
    stem, suffix = dest.stem, dest.suffix
    for i in range(1, 100000):
        cand = dest.with_name(f"{stem}.{i}{suffix}")
        if not cand.exists():
            return cand
    raise FileExistsError(dest)


def _subfolders(root: Path) -> list[Path]:
    """The participant folders directly under ``root`` (hidden ones and names no participant can have: skipped)."""
    try:
        return [d for d in root.iterdir() if d.is_dir() and not d.is_symlink() and valid_participant_id(d.name)]
    except FileNotFoundError:
        return []


def files_in(root: Path) -> list[Path]:
    """Files directly in ``root`` and in its participant folders (one level), none of them ignored."""
    out: list[Path] = []
    for d in [root, *_subfolders(root)]:
        try:
            out.extend(p for p in d.iterdir() if p.is_file() and not ignored(p))
        except FileNotFoundError:
            continue
    return out


def _pair_groups(paths: list[Path]) -> tuple[list[Path], dict[tuple[Path, str], list[Path]]]:
    """(singles, {(folder, prefix): table members}) of files, tables paired within their folder."""
    singles: list[Path] = []
    pairs: dict[tuple[Path, str], list[Path]] = {}
    for p in paths:
        key = pair_key(p) if p.suffix.lower() in (".csv", ".xlsx") else None
        if key is None:
            singles.append(p)
        else:
            pairs.setdefault((p.parent, key[0].lower()), []).append(p)
    return singles, pairs


class DropFolder:
    def __init__(
        self, data_dir: Path, *, settle_s: float = 2.0, archive: bool = True, seen: SeenStore | None = None
    ) -> None:
        self.data_dir = data_dir
        self.inbox = data_dir / "inbox"
        self.work = data_dir / "work"
        self.archive = data_dir / "archive"
        self.quarantine = data_dir / "quarantine"
        for d in (self.inbox, self.work, self.archive, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        self.settle_s = settle_s
        self.stale_s = max(60.0, 10 * settle_s)
        self.pair_wait_s = max(10.0, 3 * settle_s)
        self.keep_archive = archive
        self._seen: dict[Path, _Seen] = {}
        #: proofs of the FIT checks done by ready(), by inbox path, for decoding to skip a second CRC pass
        self._verified: dict[Path, Verified] = {}
        self.seen_store = seen
        self._stored_seen: set[str] = seen.seen_names() if seen is not None else set()

    # -- participant folders ---------------------------------------------------

    def participant_folder(self, path: Path) -> str | None:
        """The participant folder a file in inbox/, work/, archive/<date>/ or quarantine/ is in (None: none)."""
        parent = path.parent
        if parent.parent in (self.inbox, self.work, self.quarantine) or parent.parent.parent == self.archive:
            return parent.name
        return None

    def _rel(self, path: Path, root: Path) -> Path:
        """``name`` or ``<participant>/name`` of a file under ``root``."""
        return Path(path.parent.name, path.name) if path.parent.parent == root else Path(path.name)

    def _key(self, path: Path) -> str:
        """A file's name in ``inbox_seen``: ``name``, or ``<participant>/name`` in a participant folder."""
        if path.parent.parent in (self.inbox, self.work):
            return f"{path.parent.name}/{path.name}"
        return path.name

    # -- readiness -----------------------------------------------------------

    def _stable_for(self, path: Path, now: float) -> float | None:
        """Seconds the file kept its size and mtime (None if it vanished)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            self._seen.pop(path, None)
            return None
        seen = self._seen.get(path)
        if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
            self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, now)
            return 0.0
        return now - seen.stable_since

    def ready(self, now: float | None = None) -> list[list[Path]]:
        """Groups of inbox files ready to be claimed, oldest first."""
        now = time.monotonic() if now is None else now
        entries = files_in(self.inbox)
        for gone in set(self._seen) - set(entries):
            self._seen.pop(gone, None)
        for gone in set(self._verified) - set(entries):
            self._verified.pop(gone, None)
        self._prune_stored({self._key(p) for p in entries})
        settled: dict[Path, float] = {}
        for p in entries:
            age = self._stable_for(p, now)
            if age is None or age < self.settle_s:
                continue
            complete = file_complete(p)
            if not complete:
                self._verified.pop(p, None)  # an earlier proof no longer says anything
                if self._incomplete_for(p, age) < self.stale_s:
                    continue
            elif complete is not True:
                self._verified[p] = complete
            settled[p] = age
        singles, tables = _pair_groups(list(settled))
        groups: list[list[Path]] = [[p] for p in singles]
        pairs: dict[tuple[Path, str], dict[str, Path]] = {}
        for where, members_ in tables.items():
            for p in members_:
                key = pair_key(p)
                assert key is not None
                pairs.setdefault(where, {})[key[1]] = p
        for members in pairs.values():
            if len(members) == 2:
                groups.append([members["accelerometer"], members["gyroscope"]])
            else:
                (p,) = members.values()
                if settled[p] >= self.pair_wait_s:
                    groups.append([p])  # partner never came: process alone (or quarantine, for gyro)
        groups.sort(key=lambda g: min(self._mtime(p) for p in g))
        return groups

    def _incomplete_for(self, path: Path, age: float) -> float:
        """Seconds a settled file has been incomplete: this process's view, or the outbox's if longer."""
        seen = self._seen[path]
        if self.seen_store is None:
            return age
        if seen.incomplete_since_ms is None:
            seen.incomplete_since_ms = self.seen_store.first_seen_ms(self._key(path), seen.size, seen.mtime_ns)
            self._stored_seen.add(self._key(path))
        return max(age, (time.time() * 1000 - seen.incomplete_since_ms) / 1000)

    def _prune_stored(self, inbox_names: set[str]) -> None:
        """Forget stored first-seen times of files no longer in the inbox nor in work/."""
        if self.seen_store is None or not (self._stored_seen - inbox_names):
            return
        in_work = {self._key(p) for p in files_in(self.work)}
        gone = self._stored_seen - inbox_names - in_work
        if gone:
            self.seen_store.forget_seen(gone)
            self._stored_seen -= gone

    def next_check_in(self, now: float) -> float | None:
        """Seconds until the soonest file being watched may have settled (None: nothing waits to settle)."""
        waits = [s.stable_since + self.settle_s - now for s in self._seen.values()]
        waits = [w for w in waits if w > 0]
        return min(waits) if waits else None

    @staticmethod
    def _mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def verified(self, group: list[Path]) -> list[Verified]:
        """The proofs ready() got for these inbox files (to hand to decoding with the claimed group)."""
        return [v for p in group if (v := self._verified.get(p)) is not None]

    # -- moving --------------------------------------------------------------

    def claim(self, group: list[Path]) -> list[Path] | None:
        """Move a group into work/ by atomic rename; None if another process took it."""
        claimed: list[Path] = []
        for p in group:
            rel = self._rel(p, self.inbox)
            dest = _unique(self.work / rel)
            if dest.parent != self.work and not dest.parent.is_dir():
                dest.parent.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.work)
            try:
                os.rename(p, dest)
            except FileNotFoundError:
                for c, src in zip(claimed, group, strict=False):  # put the partner back
                    os.rename(c, src)
                return None
            self._seen.pop(p, None)
            self._verified.pop(p, None)
            claimed.append(dest)
        for d in {c.parent for c in claimed} | {p.parent for p in group}:
            fsync_dir(d)
        return claimed

    def unclaim(self, group: list[Path]) -> list[Path]:
        """Put files from work/ back into the inbox (found incomplete at recovery: they wait there)."""
        out = []
        for p in group:
            dest = _unique(self.inbox / self._rel(p, self.work))
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(p, dest)
            out.append(dest)
        for d in {q.parent for q in out} | {p.parent for p in group}:
            fsync_dir(d)
        return out

    def clean_leftovers(self) -> int:
        """Remove what an interrupted run left: export scratch folders, and sync's temporary folders when no
        sync push is running (its lock is free). Returns how many were removed."""
        victims = list((self.work / ".scratch").glob("export-*"))
        sync_tmp = self.data_dir / SYNC_TMP
        if sync_tmp.is_dir() and not held_elsewhere(self.data_dir / SYNC_PUSH_LOCK):
            victims += list(sync_tmp.glob("tmp*"))
        for v in victims:
            if v.is_dir() and not v.is_symlink():
                shutil.rmtree(v, ignore_errors=True)
            else:
                v.unlink(missing_ok=True)
        if victims:
            log.info("removed %d scratch folder(s) left by an interrupted run", len(victims))
        return len(victims)

    def leftovers(self) -> list[list[Path]]:
        """Groups left in work/ by an interrupted run, to be processed again."""
        found, groups = _pair_groups(sorted(files_in(self.work)))
        singles: list[list[Path]] = [[p] for p in found]
        for members in groups.values():
            members.sort(key=lambda q: 0 if "accelerometer" in q.name.lower() else 1)
            singles.append(members)
        return singles

    def done(self, group: list[Path]) -> None:
        """Archive (or delete) a processed group: ``archive/<date>/[<participant>/]<name>``."""
        day = time.strftime("%Y-%m-%d", time.gmtime())
        for p in group:
            if self.keep_archive:
                folder = self.participant_folder(p)
                dest_dir = self.archive / day / folder if folder else self.archive / day
                if not dest_dir.is_dir():
                    dest_dir.mkdir(parents=True, exist_ok=True)
                    fsync_dir(dest_dir.parent)
                    fsync_dir(self.archive)
                _move(p, _unique(dest_dir / p.name))
            else:
                p.unlink(missing_ok=True)
                fsync_dir(p.parent)

    def to_quarantine(self, group: list[Path], error: HarEdgeError | Exception) -> list[Path]:
        """Quarantine a group with reasons: ``quarantine/[<participant>/]<name>`` and ``<name>.reason.json``."""
        out = []
        kind = getattr(error, "kind", type(error).__name__)
        for p in group:
            folder = self.participant_folder(p)
            qdir = self.quarantine / folder if folder else self.quarantine
            if not qdir.is_dir():
                qdir.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.quarantine)
            dest = _unique(qdir / p.name)
            reason = {
                "file": p.name,
                "kind": kind,
                "message": str(error),
                "agent_version": __version__,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "group": [q.name for q in group],
                # where replay puts it back: the inbox itself ("") or a participant folder
                "inbox_folder": self.participant_folder(p) or "",
            }
            for extra in ("stage", "traceback"):
                if getattr(error, extra, None):
                    reason[extra] = getattr(error, extra)
            # the reason first (a full disk fails here, with the file still in work/), then the move
            tmp = dest.with_name(dest.name + ".reason.json.tmp")
            tmp.write_text(json.dumps(reason, indent=2) + "\n", encoding="utf-8")
            _move(p, dest)
            os.replace(tmp, dest.with_name(dest.name + ".reason.json"))
            fsync_dir(qdir)
            out.append(dest)
        return out

    def replay(self, names: list[str] | None = None) -> list[Path]:
        """Move quarantined files (all, or those named) back into the inbox."""
        moved = []
        for p in sorted(files_in(self.quarantine)):
            if names and p.name not in names:
                continue
            reason_file = Path(str(p) + ".reason.json")
            folder = ""
            with contextlib.suppress(OSError, ValueError, AttributeError):
                folder = str(json.loads(reason_file.read_text(encoding="utf-8")).get("inbox_folder") or "")
            back = self.inbox / folder if folder and valid_participant_id(folder) else self.inbox
            back.mkdir(parents=True, exist_ok=True)
            dest = _unique(back / p.name)
            os.rename(p, dest)
            reason_file.unlink(missing_ok=True)
            moved.append(dest)
        return moved


def held_elsewhere(lock: Path) -> bool:
    """True when another process (or another open file of this one) holds this flock (sync's push lock)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)

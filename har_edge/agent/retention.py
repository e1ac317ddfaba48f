"""Retention: the data dir stays inside its disk budget.

- ``archive/``: a processed export is deleted once it is older than ``agent.archive_max_age_days``
  or, oldest first, while ``archive/`` is over ``agent.archive_max_mb`` — but only once the server
  acknowledged its results (:func:`har_edge.agent.acknowledged.results_acknowledged`) and, when raw
  custody is configured (``sync.raw_store``), every file of it is in the store with a verified checksum
  (:func:`har_edge.agent.acknowledged.custody_delivered`); any other export is kept whatever the budget says.
- ``quarantine/``: a file (and its ``.reason.json``) is deleted by ``agent.quarantine_max_age_days``
  and ``agent.quarantine_max_mb`` the same way, once its reason JSON exists and the outbox holds its
  ``failed`` row.
- ``agent.min_free_mb``: while the file system of the data dir has less free space, ingestion
  pauses (files wait in the inbox); delivered archived exports are deleted first, oldest first, to
  get back above the floor (unless both archive limits are 0: then the archive is kept forever).

Age is the time since the file was moved into ``archive/`` or ``quarantine/`` (its inode change
time: a move keeps the export's own mtime). The agent calls :func:`ingestion_paused` before each
pass; pruning runs at most every ``agent.retention_interval_s``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from har_edge.agent.acknowledged import custody_delivered, failure_recorded, results_acknowledged
from har_edge.agent.outbox import Outbox
from har_edge.agent.settings import Settings

log = logging.getLogger(__name__)

REASON_SUFFIX = ".reason.json"
DAY_S = 86_400.0


@dataclass
class Unit:
    """Files deleted together: an archived export (a table pair is two files) or a quarantined file + reason."""

    paths: list[Path]
    size: int
    changed: float  # when it was moved here (seconds since the epoch)


@dataclass
class PruneReport:
    deleted: dict[str, int] = field(default_factory=lambda: {"archive": 0, "quarantine": 0})
    freed_bytes: dict[str, int] = field(default_factory=lambda: {"archive": 0, "quarantine": 0})
    #: over age or budget but kept: results not acknowledged / reason not recorded yet
    kept: dict[str, int] = field(default_factory=lambda: {"archive": 0, "quarantine": 0})


def tree_bytes(root: Path) -> int:
    """Bytes of the files under ``root`` (symbolic links are not followed; a missing folder is 0)."""
    total = 0
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(Path(e.path))
                        else:
                            total += e.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total


def data_dir_usage(settings: Settings) -> dict[str, int]:
    """Bytes per part of the data dir (inbox, work, archive, quarantine, outbox, models, logs), total, free."""
    out = {
        "inbox": tree_bytes(settings.inbox),
        "work": tree_bytes(settings.work),
        "archive": tree_bytes(settings.archive_dir),
        "quarantine": tree_bytes(settings.quarantine),
        "outbox": sum(_size(Path(str(settings.outbox_path) + s)) for s in ("", "-wal", "-shm")),
        "models": tree_bytes(settings.models_dir),
        "logs": tree_bytes(settings.logs_dir),
    }
    out["total"] = tree_bytes(settings.data_dir)
    out["free"] = free_bytes(settings.data_dir)
    return out


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def free_bytes(path: Path) -> int:
    """Free bytes for this user on the file system holding ``path`` (its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _sha256(paths: list[Path]) -> str:
    """The export's identity as the pipeline computes it (one file; a pair: sha256 of the sorted hashes)."""
    hashes = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        hashes.append(h.hexdigest())
    return hashes[0] if len(hashes) == 1 else hashlib.sha256("".join(sorted(hashes)).encode()).hexdigest()


class Retention:
    """Prunes one data dir against its outbox; keeps a small cache of hashes of files it could not delete yet."""

    def __init__(self, settings: Settings, outbox: Outbox) -> None:
        self.settings = settings
        self.outbox = outbox
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._last_prune: float | None = None
        self._paused = False

    # -- what is there -----------------------------------------------------------------------------

    def archive_units(self) -> list[Unit]:
        from har_edge.agent.decode import pair_key

        units: list[Unit] = []
        root = self.settings.archive_dir
        days = sorted(p for p in _listdir(root) if p.is_dir())
        # a day's own files, and those of its participant folders (archive/<date>/<participant>/)
        folders = [f for day in days for f in (day, *sorted(q for q in _listdir(day) if q.is_dir()))]
        for day in folders:
            pairs: dict[str, list[Path]] = {}
            for p in sorted(_listdir(day)):
                if not p.is_file():
                    continue
                key = pair_key(p) if p.suffix.lower() in (".csv", ".xlsx") else None
                if key is None:
                    units.append(_unit([p]))
                else:
                    pairs.setdefault(key[0].lower(), []).append(p)
            for members in pairs.values():
                # a pair archived together is one export; anything else: each file is its own
                if len(members) == 2:
                    units.append(_unit(members))
                else:
                    units.extend(_unit([m]) for m in members)
        return [u for u in units if u.paths]

    def quarantine_units(self) -> list[Unit]:
        units = []
        root = self.settings.quarantine
        found = [*_listdir(root), *(q for d in _listdir(root) if d.is_dir() for q in _listdir(d))]
        for p in sorted(found):
            if not p.is_file() or p.name.endswith(REASON_SUFFIX) or p.name.endswith(REASON_SUFFIX + ".tmp"):
                continue
            reason = p.with_name(p.name + REASON_SUFFIX)
            unit = _unit([p, reason] if reason.exists() else [p])
            if unit.paths:
                units.append(unit)
        return units

    # -- may it go -------------------------------------------------------------------------------

    def _archive_deletable(self, unit: Unit) -> bool:
        try:
            keys = [(str(p), *_stat_key(p)) for p in unit.paths]
        except FileNotFoundError:
            return False
        key = (";".join(k[0] for k in keys), sum(k[1] for k in keys), max(k[2] for k in keys))
        sha = self._hashes.get(key)
        if sha is None:
            sha = _sha256(unit.paths)
        acknowledged = results_acknowledged(self.outbox, sha) or (
            # two single exports that happen to look like a pair
            len(unit.paths) == 2 and any(results_acknowledged(self.outbox, _sha256([p])) for p in unit.paths)
        )
        if acknowledged and self._in_custody(unit):
            self._hashes.pop(key, None)
            return True
        self._hashes[key] = sha
        return False

    def _in_custody(self, unit: Unit) -> bool:
        """True when raw custody is off, or every file of the unit is in ``sync.raw_store``, verified."""
        store = self.settings.sync.raw_store
        if store is None:
            return True
        return all(custody_delivered(self.outbox, self.settings.archive_dir, p, store) for p in unit.paths)

    def _quarantine_deletable(self, unit: Unit) -> bool:
        if len(unit.paths) < 2:
            return False  # no reason JSON: not logged, keep
        try:
            reason = json.loads(unit.paths[1].read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        group = reason.get("group") or [reason.get("file") or unit.paths[0].name]
        return failure_recorded(self.outbox, str(group[0]))

    # -- pruning ----------------------------------------------------------------------------------

    def prune(self, now: float | None = None) -> PruneReport:
        """Delete what the budgets say may go (oldest first); return what was deleted and kept."""
        now = time.time() if now is None else now
        a = self.settings.agent
        rep = PruneReport()
        # under the floor, acknowledged archives go first; not when the archive is to be kept forever (both 0)
        keep_all = a.archive_max_mb == 0 and a.archive_max_age_days == 0
        deficit = 0 if keep_all else max(0, int(a.min_free_mb * 1e6) - free_bytes(self.settings.data_dir))
        self._prune_part(
            "archive", self.archive_units(), a.archive_max_age_days, a.archive_max_mb, deficit, now,
            self._archive_deletable, rep,
        )  # fmt: skip
        self._prune_part(
            "quarantine", self.quarantine_units(), a.quarantine_max_age_days, a.quarantine_max_mb, 0, now,
            self._quarantine_deletable, rep,
        )  # fmt: skip
        days = [d for d in _listdir(self.settings.archive_dir) if d.is_dir()]
        for d in [*(s for day in days for s in _listdir(day)), *_listdir(self.settings.quarantine), *days]:
            if d.is_dir():
                with contextlib.suppress(OSError):
                    d.rmdir()  # an emptied participant or day folder (a non-empty one stays)
        for part in ("archive", "quarantine"):
            if rep.deleted[part]:
                log.info(
                    "retention: deleted %d file(s) (%.1f MB) from %s/",
                    rep.deleted[part],
                    rep.freed_bytes[part] / 1e6,
                    part,
                )
            if rep.kept[part]:
                log.info(
                    "retention: kept %d file(s) in %s/ over their budget: %s", rep.kept[part], part,
                    _archive_wait(self.settings) if part == "archive" else "no recorded reason",
                )  # fmt: skip
        self._last_prune = now
        return rep

    def _prune_part(
        self,
        part: str,
        units: list[Unit],
        max_age_days: float,
        max_mb: float,
        extra_bytes: int,
        now: float,
        deletable: Callable[[Unit], bool],
        rep: PruneReport,
    ) -> None:
        units.sort(key=lambda u: u.changed)
        total = sum(u.size for u in units)
        budget = int(max_mb * 1e6) if max_mb > 0 else None
        to_free = extra_bytes
        for u in units:
            too_old = max_age_days > 0 and now - u.changed > max_age_days * DAY_S
            too_big = budget is not None and total > budget
            if not (too_old or too_big or to_free > 0):
                break  # the rest is younger and the part is within its budget
            if not deletable(u):
                rep.kept[part] += 1
                continue
            for p in u.paths:
                p.unlink(missing_ok=True)
            total -= u.size
            to_free -= u.size
            rep.deleted[part] += len([p for p in u.paths if not p.name.endswith(REASON_SUFFIX)])
            rep.freed_bytes[part] += u.size

    # -- the agent's gate -------------------------------------------------------------------------

    def step(self, now: float | None = None) -> bool:
        """Prune when due (or when free space just fell under the floor); True while ingestion must pause."""
        now = time.time() if now is None else now
        floor = int(self.settings.agent.min_free_mb * 1e6)
        low = free_bytes(self.settings.data_dir) < floor
        due = self._last_prune is None or now - self._last_prune >= self.settings.agent.retention_interval_s
        if due or (low and not self._paused):
            self.prune(now)
            low = free_bytes(self.settings.data_dir) < floor
        if low and not self._paused:
            log.warning(
                "only %.0f MB free on the file system of %s, under agent.min_free_mb = %.0f: ingestion paused, files "
                "wait in the inbox until space is freed (delivered archives are deleted as sync delivers; "
                "see `har-edge status` for what holds space)",
                free_bytes(self.settings.data_dir) / 1e6,
                self.settings.data_dir,
                self.settings.agent.min_free_mb,
            )
        elif not low and self._paused:
            log.info("free space back over agent.min_free_mb: ingestion resumed")
        self._paused = low
        return low


def _archive_wait(settings: Settings) -> str:
    if settings.sync.raw_store is None:
        return "results not delivered yet"
    return "results not delivered, or the raw export not verified in sync.raw_store, yet"


def _listdir(d: Path) -> list[Path]:
    try:
        return list(d.iterdir())
    except FileNotFoundError:
        return []


def _stat_key(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def _unit(paths: list[Path]) -> Unit:
    size, changed, present = 0, 0.0, []
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        size += st.st_size
        changed = max(changed, st.st_ctime)
        present.append(p)
    return Unit(present, size, changed)


#: one Retention per (data dir, outbox) of this process, so the agent's one-line call keeps its state
_KEEPERS: dict[tuple[str, int], Retention] = {}


def ingestion_paused(settings: Settings, outbox: Outbox, now: float | None = None) -> bool:
    """Prune the data dir when due; True while free space is under ``agent.min_free_mb`` (the agent waits)."""
    key = (str(Path(settings.data_dir).resolve()), id(outbox))
    keeper = _KEEPERS.get(key)
    if keeper is None or keeper.outbox is not outbox or keeper.settings is not settings:
        keeper = _KEEPERS[key] = Retention(settings, outbox)
    return keeper.step(now)

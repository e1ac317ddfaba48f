"""The drop folder: which files are complete, claiming them, and where they go afterwards.

A file is taken once its size and mtime stayed the same for ``settle_s`` and its
own structure says it is whole (FIT header, size and CRC; zip end record). A
file that stays incomplete for much longer than that is taken anyway, so a
truncated export ends in quarantine with its reason instead of waiting forever.
Study tables travel in pairs (``…accelerometer…`` + ``…gyroscope…`` with one
prefix) and are claimed together.

Claiming is an atomic rename into ``work/``; after processing the file moves to
``archive/<date>/`` (or is deleted) or to ``quarantine/`` with ``<name>.reason.json``.
Files left in ``work/`` by a crash are recovered at start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from har_edge.agent import __version__
from har_edge.agent.decode import check_complete, pair_key
from har_edge.agent.errors import HarEdgeError

if TYPE_CHECKING:
    from har_edge.agent.decode.fit import Verified

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".swp", ".reason.json")


def ignored(path: Path) -> bool:
    n = path.name
    return n.startswith(".") or n.startswith("~$") or n.lower().endswith(IGNORED_SUFFIXES)


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    stable_since: float


def _unique(dest: Path) -> Path:
    if not dest.exists():
        return dest
    stem, suffix = dest.stem, dest.suffix
    for i in range(1, 100000):
        cand = dest.with_name(f"{stem}.{i}{suffix}")
        if not cand.exists():
            return cand
    raise FileExistsError(dest)


class DropFolder:
    def __init__(self, data_dir: Path, *, settle_s: float = 2.0, archive: bool = True) -> None:
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
        try:
            entries = [p for p in self.inbox.iterdir() if p.is_file() and not ignored(p)]
        except FileNotFoundError:
            return []
        for gone in set(self._seen) - set(entries):
            self._seen.pop(gone, None)
        for gone in set(self._verified) - set(entries):
            self._verified.pop(gone, None)
        settled: dict[Path, float] = {}
        for p in entries:
            age = self._stable_for(p, now)
            if age is None or age < self.settle_s:
                continue
            if age < self.stale_s:
                complete = check_complete(p)
                if not complete:
                    self._verified.pop(p, None)  # an earlier proof no longer says anything
                    continue
                if complete is not True:
                    self._verified[p] = complete
            settled[p] = age
        groups: list[list[Path]] = []
        pairs: dict[str, dict[str, Path]] = {}
        for p in settled:
            key = pair_key(p) if p.suffix.lower() in (".csv", ".xlsx") else None
            if key is None:
                groups.append([p])
            else:
                pairs.setdefault(key[0].lower(), {})[key[1]] = p
        for members in pairs.values():
            if len(members) == 2:
                groups.append([members["accelerometer"], members["gyroscope"]])
            else:
                (p,) = members.values()
                if settled[p] >= self.pair_wait_s:
                    groups.append([p])  # partner never came: process alone (or quarantine, for gyro)
        groups.sort(key=lambda g: min(self._mtime(p) for p in g))
        return groups

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
            dest = _unique(self.work / p.name)
            try:
                os.rename(p, dest)
            except FileNotFoundError:
                for c in claimed:  # put the partner back
                    os.rename(c, self.inbox / c.name)
                return None
            self._seen.pop(p, None)
            self._verified.pop(p, None)
            claimed.append(dest)
        return claimed

    def leftovers(self) -> list[list[Path]]:
        """Groups left in work/ by an interrupted run, to be processed again."""
        files = sorted(p for p in self.work.iterdir() if p.is_file() and not ignored(p))
        groups: dict[str, list[Path]] = {}
        singles: list[list[Path]] = []
        for p in files:
            key = pair_key(p) if p.suffix.lower() in (".csv", ".xlsx") else None
            if key is None:
                singles.append([p])
            else:
                groups.setdefault(key[0].lower(), []).append(p)
        for members in groups.values():
            members.sort(key=lambda q: 0 if "accelerometer" in q.name.lower() else 1)
            singles.append(members)
        return singles

    def done(self, group: list[Path]) -> None:
        day = time.strftime("%Y-%m-%d", time.gmtime())
        for p in group:
            if self.keep_archive:
                dest_dir = self.archive / day
                dest_dir.mkdir(parents=True, exist_ok=True)
                shutil.move(str(p), _unique(dest_dir / p.name))
            else:
                p.unlink(missing_ok=True)

    def to_quarantine(self, group: list[Path], error: HarEdgeError | Exception) -> list[Path]:
        out = []
        kind = getattr(error, "kind", type(error).__name__)
        for p in group:
            dest = _unique(self.quarantine / p.name)
            shutil.move(str(p), dest)
            reason = {
                "file": p.name,
                "kind": kind,
                "message": str(error),
                "agent_version": __version__,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "group": [q.name for q in group],
            }
            tmp = dest.with_name(dest.name + ".reason.json.tmp")
            tmp.write_text(json.dumps(reason, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, dest.with_name(dest.name + ".reason.json"))
            out.append(dest)
        return out

    def replay(self, names: list[str] | None = None) -> list[Path]:
        """Move quarantined files (all, or those named) back into the inbox."""
        moved = []
        for p in sorted(self.quarantine.iterdir()):
            if not p.is_file() or ignored(p) or (names and p.name not in names):
                continue
            dest = _unique(self.inbox / p.name)
            os.rename(p, dest)
            Path(str(p) + ".reason.json").unlink(missing_ok=True)
            moved.append(dest)
        return moved

"""Processing attempts of claimed files, kept in the outbox so a crash loop ends in quarantine.

Each attempt records the stage it reached and its progress (stage entries: one per
chunk decoded, chunk windowed and batch inferred). Progress is written the first
time each stage is reached and then every :data:`EVERY` entries, so where an attempt
died is recorded the same way each time: a deterministic crash (a bug, an OOM kill at
one spot) leaves attempts that died at the same stage and progress, while kills of a
good file land at different points. Only the trailing run of attempts that died at
the same point counts, and attempts that died before decoding began (while hashing)
do not count at all: those steps cannot loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from har_edge.agent.errors import OutboxError
from har_edge.agent.outbox import Outbox

log = logging.getLogger(__name__)

#: progress is written every this many stage entries (besides the first entry of each stage)
EVERY = 8


@dataclass(frozen=True)
class Stuck:
    """How many times in a row processing died at one point."""

    times: int
    stage: str
    progress: int


def _key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return path.name, st.st_size, st.st_mtime_ns


class Attempts:
    """Tracks the attempt in progress of one outbox's agent."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._id: int | None = None
        self._stages: set[str] = set()
        self._group_key: tuple[str, int, int] | None = None

    def stuck(self, group: list[Path]) -> Stuck | None:
        """The trailing run of earlier attempts at this group that died at the same point (None: no attempt)."""
        rows = [r for r in self.outbox.attempts_of(*_key(group[0])) if r.stage != "claimed"]
        if not rows:
            return None
        last = rows[-1]
        n = 0
        for r in reversed(rows):
            if (r.stage, r.progress) != (last.stage, last.progress):
                break
            n += 1
        return Stuck(n, last.stage, int(last.progress))

    def begin(self, group: list[Path]) -> None:
        """A new attempt at this group; a retry of the group in progress (after a full disk) goes on with it."""
        key = _key(group[0])
        if self._id is not None and self._group_key == key:
            return
        self._stages = set()
        self._id = self.outbox.start_attempt(*key)
        self._group_key = key

    def on_stage(self, stage: str, progress: int) -> None:
        if self._id is None:
            return
        if stage in self._stages and progress % EVERY:
            return
        self._stages.add(stage)
        self.outbox.update_attempt(self._id, stage, progress)

    def end(self, group: list[Path]) -> None:
        """The group left work/: forget its attempts."""
        self._id = None
        try:
            for p in group:
                self.outbox.clear_attempts(p.name)
        except OutboxError as exc:  # harmless leftovers: keyed by name, size and mtime of a file now gone
            log.warning("could not forget the attempts at %s: %s", group[0].name, exc)

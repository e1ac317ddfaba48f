"""The agent loop: recover, then watch the inbox and process what is complete, one export at a time.

One file's failure stays that file's: an unexpected exception quarantines it (kind
``internal``) and the loop goes on; a file found in work/ whose processing died
``agent.max_attempts`` times at the same point is quarantined instead of retried. A
full disk pauses ingestion: the file waits in work/ and is tried again every
``agent.disk_full_retry_s`` until space returns.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from har_edge.agent.attempts import Attempts
from har_edge.agent.errors import DiskFull, HarEdgeError, InputError, InternalError
from har_edge.agent.forget import honour
from har_edge.agent.identity import Identities
from har_edge.agent.modelstore import ActiveModel
from har_edge.agent.outbox import Outbox, now_ms
from har_edge.agent.pipeline import Outcome, Processor
from har_edge.agent.retention import ingestion_paused
from har_edge.agent.settings import Settings
from har_edge.agent.watcher import DropFolder, file_complete
from har_edge.common.states import DeploymentOutcome, FileStatus

if TYPE_CHECKING:
    from har_edge.agent.decode.fit import Verified

log = logging.getLogger(__name__)


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, DiskFull) or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))


class Agent:
    """Owns the drop folder, the outbox and the active model. ``step(now)`` does one pass."""

    def __init__(self, settings: Settings, outbox: Outbox | None = None) -> None:
        self.settings = settings
        a = settings.agent
        self.outbox = outbox or Outbox(settings.outbox_path)
        self.folder = DropFolder(settings.data_dir, settle_s=a.settle_s, archive=a.archive, seen=self.outbox)
        self.models = ActiveModel(
            settings.models_dir,
            explicit=a.model_dir,
            threads=a.threads,
            batch=a.batch,
            on_load_failure=self._model_failed,
        )
        self.attempts = Attempts(self.outbox)
        self.identities = Identities(settings)
        self.identities.check()  # a missing secret file or a bad mapping: refused at start
        self.processor = Processor(
            a,
            self.outbox,
            settings.work / ".scratch",
            on_stage=self.attempts.on_stage,
            monitor=settings.monitor,
            share_flagged_windows=settings.sync.share_flagged_windows,
            identities=self.identities,
        )
        self._paused = False
        #: the group waiting for disk space, the outcome already stored for it (None: not stored yet),
        #: and when it is tried next (monotonic)
        self._waiting: tuple[list[Path], Outcome | None] | None = None
        self._retry_at = 0.0

    def _model_failed(self, pointer: str | None, exc: Exception) -> None:
        current = self.models.model.manifest.version if self.models.model else None
        self.outbox.record_deployment(
            from_version=current, to_version=pointer, outcome=DeploymentOutcome.LOAD_FAILED, reason=str(exc)
        )

    # -- start ----------------------------------------------------------------------

    def recover(self) -> list[Outcome]:
        """Clean scratch leftovers, then finish exports a previous run claimed but did not complete."""
        self.folder.clean_leftovers()
        leftovers = self.folder.leftovers()
        self.outbox.prune_attempts(p.name for g in leftovers for p in g)
        out = []
        for group in leftovers:
            names = ", ".join(p.name for p in group)
            if not all(file_complete(p) for p in group):
                log.warning("%s in work/ is incomplete: back to the inbox, to wait for the rest", names)
                self.folder.unclaim(group)
                continue
            stuck = self.attempts.stuck(group)
            if stuck is not None and stuck.times >= self.settings.agent.max_attempts:
                out.append(self._give_up(group, stuck.times, stuck.stage, stuck.progress))
                continue
            log.info("recovering %s left in work/ by an interrupted run", names)
            done = self._handle_or_wait(group, recovered=True)
            if done is not None:
                out.append(done)
        return out

    def _give_up(self, group: list[Path], times: int, stage: str, progress: int) -> Outcome:
        name = group[0].name
        err = InternalError(
            f"{name}: processing died {times} times in a row in {stage} at the same point (progress {progress}), "
            f"agent.max_attempts = {self.settings.agent.max_attempts}: quarantined so the agent does not crash "
            "in a loop; please report it with this file",
            stage=stage,
        )
        log.error("%s", err)
        model = self.models.refresh()
        outcome = self.processor.record_failure(
            group, model, err, name=name, folder=self.folder.participant_folder(group[0])
        )
        self._finish(group, outcome)
        return outcome

    # -- one file ---------------------------------------------------------------------

    def handle(
        self,
        claimed: list[Path],
        progress: Callable[[int], None] | None = None,
        verified: Iterable[Verified] = (),
        *,
        recovered: bool = False,
    ) -> Outcome:
        """Process a claimed group and move it to the archive or quarantine.

        ``recovered``: the group was found in work/ at start; if an interrupted run already stored it,
        only its move is finished. Otherwise content processed before is recorded as a duplicate.

        ``verified``: the watcher's proofs of the group's FIT checks (decoding skips a second CRC pass).

        Outbox trouble (a full disk included) propagates with the group still in work/."""
        model = self.models.refresh()
        received = now_ms()
        # recorded before hashing: an erasure asked for from now on sees this file in flight (agent.forget)
        self.attempts.begin(claimed)
        ident = self.processor.identify(claimed)  # the one dedup query
        prior = ident.prior
        # a file recovered after a crash may already be stored: finish its move only
        if recovered and prior is not None and prior.name == claimed[0].name and self._from_work(claimed):
            self._finish(claimed, None)
            log.info("%s was stored before the interruption; archived", claimed[0].name)
            return Outcome(FileStatus.PROCESSED, prior.id, prior.name, windows=prior.windows)
        outcome = self.processor.process(
            claimed,
            model,
            received_ms=received,
            name=claimed[0].name,
            progress=progress,
            identity=ident,
            verified=verified,
            folder=self.folder.participant_folder(claimed[0]),
        )
        self._finish(claimed, outcome)
        return outcome

    def _finish(self, group: list[Path], outcome: Outcome | None) -> None:
        """Move a stored group out of work/ (its outbox commit is durable by now) and forget its attempts;
        then honour erasure requests asked for while it was in flight (finished, then forgotten)."""
        self._waiting = (group, outcome)  # until the move is done: a full disk can stop it
        if outcome is not None and outcome.status == FileStatus.FAILED:
            self.folder.to_quarantine(group, outcome.error or InputError("failed"))
        else:
            self.folder.done(group)
        self._waiting = None
        self.attempts.end(group)
        honour(self.settings, self.outbox)

    def _handle_or_wait(
        self,
        group: list[Path],
        now: float | None = None,
        verified: Iterable[Verified] = (),
        *,
        recovered: bool = False,
    ) -> Outcome | None:
        """:meth:`handle`, except that a full disk pauses the agent instead of raising."""
        try:
            return self.handle(group, verified=verified, recovered=recovered)
        except (DiskFull, OSError) as exc:
            if not _disk_full(exc):
                raise
            self._pause_for_disk(group, exc, now)
            return None

    def _pause_for_disk(self, group: list[Path], exc: BaseException, now: float | None) -> None:
        stored = self._waiting[1] if self._waiting and self._waiting[0] == group else None
        self._waiting = (group, stored)
        self._retry_at = (time.monotonic() if now is None else now) + self.settings.agent.disk_full_retry_s
        log.warning(
            "disk full while handling %s (%s): ingestion paused, the file waits in work/ and is tried again "
            "every %.0f s until space is freed",
            group[0].name,
            exc,
            self.settings.agent.disk_full_retry_s,
        )

    def _retry_waiting(self, now: float) -> Outcome | bool | None:
        """Try the group waiting for disk space again; False while it still waits."""
        assert self._waiting is not None
        if now < self._retry_at:
            return False
        group, stored = self._waiting
        try:
            if stored is not None:
                self._finish(group, stored)
                outcome: Outcome | None = stored
            else:
                outcome = self.handle(group)
        except (DiskFull, OSError) as exc:
            if not _disk_full(exc):
                raise
            self._pause_for_disk(group, exc, now)
            return False
        log.info("disk space is back: %s handled, ingestion resumed", group[0].name)
        return outcome

    def _from_work(self, paths: list[Path]) -> bool:
        return all(p.parent == self.folder.work for p in paths)

    # -- the loop ---------------------------------------------------------------------

    def over_budget(self) -> bool:
        size_mb = self.outbox.size_bytes() / 1e6
        over = size_mb > self.settings.agent.outbox_max_mb
        if over and not self._paused:
            log.warning(
                "outbox is %.0f MB, over its budget of %.0f MB: ingestion paused, files wait in the inbox "
                "until sync delivers and reclaims space (or raise agent.outbox_max_mb)",
                size_mb,
                self.settings.agent.outbox_max_mb,
            )
        elif not over and self._paused:
            log.info("outbox back under budget: ingestion resumed")
        self._paused = over
        return over

    @property
    def waiting_for_disk(self) -> bool:
        return self._waiting is not None

    def step(self, now: float | None = None, stop: threading.Event | None = None) -> list[Outcome]:
        """One pass over the inbox; returns what was done. Stops between files when ``stop`` is set."""
        now_m = time.monotonic() if now is None else now
        outcomes: list[Outcome] = []
        if self._waiting is not None:
            got = self._retry_waiting(now_m)
            if got is False:
                return []
            if isinstance(got, Outcome):
                outcomes.append(got)
        honour(self.settings, self.outbox)  # erasures asked for since the last pass (one query when none)
        if ingestion_paused(self.settings, self.outbox) or self.over_budget():
            return outcomes
        for group in self.folder.ready(now):
            if stop is not None and stop.is_set():
                break
            verified = self.folder.verified(group)
            claimed = self.folder.claim(group)
            if claimed is None:
                continue
            done = self._handle_or_wait(claimed, now_m, verified)
            if done is None:  # the disk is full: wait
                break
            outcomes.append(done)
            if self.over_budget():
                break
        return outcomes

    def run(self, stop: threading.Event) -> None:
        """Watch the inbox until ``stop`` is set; the export in progress is finished first."""
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        wake = threading.Event()

        class _Wake(FileSystemEventHandler):
            # a close-write (inotify) wakes the loop at once; the file is still taken only once it kept its
            # size and mtime for settle_s and its format's own check says it is whole
            def on_any_event(self, event: FileSystemEvent) -> None:
                wake.set()

        from har_edge.agent.http import start_agent_endpoints

        http = start_agent_endpoints(self)  # /metrics, /healthz, /readyz on http.address (None: off)
        self.models.refresh()
        self.recover()
        observer: Any = Observer()
        # recursive: files dropped into participant folders (inbox/<participant>/) wake the loop too
        observer.schedule(_Wake(), str(self.folder.inbox), recursive=True)
        observer.start()
        log.info("watching %s", self.folder.inbox)
        interval = self.settings.agent.scan_interval_s
        try:
            while not stop.is_set():
                try:
                    self.step(time.monotonic(), stop)
                except HarEdgeError as exc:
                    # outbox trouble (locked, damaged): the file stays where it is and is retried next pass
                    log.error("%s; retrying after %.0f s", exc, interval * 5)
                    stop.wait(interval * 5)
                except Exception:
                    log.exception("unexpected error outside a file; retrying after %.0f s", interval * 5)
                    stop.wait(interval * 5)
                soon = self.folder.next_check_in(time.monotonic())
                wake.wait(interval if soon is None else min(interval, soon + 0.01))
                wake.clear()
        finally:
            observer.stop()
            observer.join(timeout=5)
            if http is not None:
                http.stop()
            log.info("agent stopped")

"""The agent loop: recover, then watch the inbox and process what is complete, one export at a time."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from har_edge.agent.errors import InputError
from har_edge.agent.modelstore import ActiveModel
from har_edge.agent.outbox import Outbox
from har_edge.agent.pipeline import Outcome, Processor, export_sha256
from har_edge.agent.retention import ingestion_paused
from har_edge.agent.settings import Settings
from har_edge.agent.watcher import DropFolder

log = logging.getLogger(__name__)


class Agent:
    """Owns the drop folder, the outbox and the active model. ``step(now)`` does one pass."""

    def __init__(self, settings: Settings, outbox: Outbox | None = None) -> None:
        self.settings = settings
        a = settings.agent
        self.outbox = outbox or Outbox(settings.outbox_path)
        self.folder = DropFolder(settings.data_dir, settle_s=a.settle_s, archive=a.archive)
        self.models = ActiveModel(
            settings.models_dir,
            explicit=a.model_dir,
            threads=a.threads,
            batch=a.batch,
            on_load_failure=self._model_failed,
        )
        self.processor = Processor(a, self.outbox, settings.work / ".scratch")
        self._paused = False

    def _model_failed(self, pointer: str | None, exc: Exception) -> None:
        current = self.models.model.manifest.version if self.models.model else None
        self.outbox.record_deployment(from_version=current, to_version=pointer, outcome="load_failed", reason=str(exc))

    def recover(self) -> list[Outcome]:
        """Finish exports a previous run claimed but did not complete."""
        out = []
        for group in self.folder.leftovers():
            log.info("recovering %s left in work/ by an interrupted run", ", ".join(p.name for p in group))
            out.append(self.handle(group))
        return out

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

    def handle(self, claimed: list[Path], progress=None) -> Outcome:
        """Process a claimed group and move it to the archive or quarantine."""
        model = self.models.refresh()
        # a file recovered after a crash may already be stored: finish its move only
        sha = export_sha256(claimed)
        prior = self.outbox.processed_file(sha)
        if prior is not None and prior.name == claimed[0].name and self._from_work(claimed):
            self.folder.done(claimed)
            log.info("%s was stored before the interruption; archived", claimed[0].name)
            return Outcome("processed", prior.id, prior.name, windows=prior.windows)
        outcome = self.processor.process(claimed, model, name=claimed[0].name, progress=progress, sha256=sha)
        if outcome.status == "failed":
            self.folder.to_quarantine(claimed, outcome.error or InputError("failed"))
        else:
            self.folder.done(claimed)
        return outcome

    def _from_work(self, paths: list[Path]) -> bool:
        return all(p.parent == self.folder.work for p in paths)

    def step(self, now: float | None = None, stop: threading.Event | None = None) -> list[Outcome]:
        """One pass over the inbox; returns what was done. Stops between files when ``stop`` is set."""
        if ingestion_paused(self.settings, self.outbox) or self.over_budget():
            return []
        outcomes = []
        for group in self.folder.ready(now):
            if stop is not None and stop.is_set():
                break
            claimed = self.folder.claim(group)
            if claimed is None:
                continue
            outcomes.append(self.handle(claimed))
            if self.over_budget():
                break
        return outcomes

    def run(self, stop: threading.Event) -> None:
        """Watch the inbox until ``stop`` is set; the export in progress is finished first."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        wake = threading.Event()

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event):
                wake.set()

        self.models.refresh()
        self.recover()
        observer = Observer()
        observer.schedule(_Wake(), str(self.folder.inbox), recursive=False)
        observer.start()
        log.info("watching %s", self.folder.inbox)
        try:
            while not stop.is_set():
                try:
                    self.step(time.monotonic(), stop)
                except InputError:  # pragma: no cover - handled inside step
                    raise
                except Exception:
                    # never die on one file: it stays where it is and is retried next pass
                    log.exception("unexpected error; retrying after %.0f s", self.settings.agent.scan_interval_s)
                    stop.wait(self.settings.agent.scan_interval_s * 5)
                wake.wait(self.settings.agent.scan_interval_s)
                wake.clear()
        finally:
            observer.stop()
            observer.join(timeout=5)
            log.info("agent stopped")

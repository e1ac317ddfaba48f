"""The sync daemon: push, pull and the health gate on an APScheduler 3.11 schedule.

Each job is a method taking ``now`` (seconds since the epoch) that does one
pass and never raises: the daemon calls it with the clock, tests with a
fixed time. Each job keeps its own :class:`~har_edge.sync.retry.Backoff`: after a pass
that could not reach its server it waits exponentially longer (with jitter)
before trying again, whatever the schedule says; a success resets it.

Jobs run with ``max_instances=1`` and ``coalesce=True`` (a slow pass is never
doubled, missed runs collapse into one) and the scheduler's own ``jitter``.
SIGTERM sets the stop event: a running push finishes its current request and
marks it, then the scheduler shuts down waiting for the job.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from har_edge.agent.outbox import Outbox
from har_edge.agent.settings import Settings
from har_edge.sync.custody import Custody, CustodyReport
from har_edge.sync.errors import CustodyMismatch, LockBusy, RegistryError, ServerAccessDenied, ServerUnreachable
from har_edge.sync.models import ModelManager, PullReport
from har_edge.sync.passes import record
from har_edge.sync.push import Pusher, PushReport, pending_summary
from har_edge.sync.retry import Backoff

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

log = logging.getLogger(__name__)

#: the report type of a job: PushReport for push, PullReport for pull and the health gate, CustodyReport for custody
R = TypeVar("R", PushReport, PullReport, CustodyReport)


@dataclass
class JobResult(Generic[R]):
    """What one job pass did: its report, or why it did nothing."""

    ran: bool
    report: R | None = None
    error: Exception | None = None
    retry_in_s: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def unreachable(self) -> bool:
        return isinstance(self.error, (ServerUnreachable, ServerAccessDenied, RegistryError))


class SyncDaemon:
    def __init__(
        self,
        settings: Settings,
        *,
        outbox: Outbox | None = None,
        rng: random.Random | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        s = settings.sync
        self.outbox = outbox or Outbox(settings.outbox_path)
        self.stop = stop or threading.Event()
        rng = rng or random.Random()
        self.pusher = Pusher(settings, self.outbox)
        self.models = ModelManager(settings, self.outbox)
        self.push_backoff = Backoff(s.backoff_initial_s, s.backoff_max_s, rng=rng)
        self.pull_backoff = Backoff(s.backoff_initial_s, s.backoff_max_s, rng=rng)
        #: raw custody (sync.raw_store): None when no store is configured
        self.custody = Custody(settings, self.outbox) if s.raw_store else None
        self.custody_backoff = Backoff(s.backoff_initial_s, s.backoff_max_s, rng=rng)

    # -- jobs ---------------------------------------------------------------------------

    def _guarded(
        self,
        label: str,
        backoff: Backoff,
        now: float,
        run: Callable[[], R],
        unreachable: tuple[type[Exception], ...],
        pending: Callable[[], str] | None = None,
    ) -> JobResult[R]:
        """One pass of a backed-off job that never raises: the outcome for ``record`` and the log.

        ``unreachable`` (a server or registry that did not answer or refused the connection) and any
        other exception back the job off; access denied is logged as an error, the rest as a warning.
        A busy lock skips the pass. ``pending`` adds what is still waiting to the unreachable line.
        """
        if not backoff.ready(now):
            return JobResult(False)
        try:
            report = run()
        except unreachable as exc:
            delay = backoff.failed(now)
            level = logging.ERROR if isinstance(exc, ServerAccessDenied) else logging.WARNING
            if pending is None:
                log.log(level, "%s: %s; next attempt in %.0f s", label, exc, delay)
            else:
                log.log(level, "%s: %s; next attempt in %.0f s (%s)", label, exc, delay, pending())
            return JobResult(True, error=exc, retry_in_s=delay)
        except LockBusy as exc:
            log.info("%s skipped: %s", label, exc)
            return JobResult(False, error=exc)
        except Exception as exc:  # a bug or a broken outbox: keep the daemon alive, back off
            delay = backoff.failed(now)
            log.exception("%s failed unexpectedly; next attempt in %.0f s", label, delay)
            return JobResult(True, error=exc, retry_in_s=delay)
        backoff.succeeded()
        return JobResult(True, report=report)

    def push_job(self, now: float, max_files: int | None = None) -> JobResult[PushReport]:
        return self._guarded(
            "push",
            self.push_backoff,
            now,
            lambda: self.pusher.push(now, self.stop, max_files=max_files),
            (ServerUnreachable, ServerAccessDenied),
            pending=lambda: pending_summary(self.pusher.delivery),
        )

    def pull_job(self, now: float) -> JobResult[PullReport]:
        result = self._guarded("pull", self.pull_backoff, now, lambda: self.models.update(now), (RegistryError,))
        report = result.report
        if report is not None and (report.activated or report.refused or report.rolled_back):
            log.info("pull: %s", report.summary())
        return result

    def health_job(self, now: float) -> JobResult[PullReport]:
        try:
            report = self.models.check_health(now)
        except LockBusy:
            return JobResult(False)
        except Exception as exc:
            log.exception("health check failed unexpectedly")
            return JobResult(True, error=exc)
        return JobResult(True, report=report)

    def custody_job(self, now: float) -> JobResult[CustodyReport]:
        """One custody pass; a file whose upload did not verify is a failure of the pass (retried next time)."""
        custody = self.custody
        if custody is None:
            return JobResult(False)
        result = self._guarded(
            "raw custody",
            self.custody_backoff,
            now,
            lambda: custody.run(self.stop),
            (ServerUnreachable, ServerAccessDenied),
        )
        report = result.report
        if report is not None and report.failed:  # counted under the first failure's kind (custody_mismatch, ...)
            result.error = report.first_error or CustodyMismatch(report.failed[0])
        return result

    # -- schedule ----------------------------------------------------------------------------

    def scheduler(self) -> BackgroundScheduler:
        from apscheduler.schedulers.background import BackgroundScheduler

        s = self.settings.sync
        sched = BackgroundScheduler(executors={"default": {"type": "threadpool", "max_workers": 4}})
        # one pass of each at a time; runs missed while one was busy collapse into one
        once = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        start = datetime.now(UTC)  # the first push and pull right away, then on the interval

        def every(task: str, name: str, job: Callable[[float], JobResult[Any]], seconds: float, jitter: float,
                  **first: datetime) -> None:  # fmt: skip
            sched.add_job(lambda: record(self.outbox, task, job(time.time())), "interval", id=task, name=name,
                          seconds=seconds, jitter=jitter, **first, **once)  # fmt: skip

        every("push", "push outbox", self.push_job, s.push_interval_s, s.jitter_s, next_run_time=start)
        every("pull", "pull models", self.pull_job, s.pull_interval_s, s.jitter_s, next_run_time=start)
        every("health", "health gate", self.health_job, s.health_interval_s, min(s.jitter_s, s.health_interval_s / 2))
        if self.custody is not None:
            every("custody", "raw custody", self.custody_job, s.raw_store_interval_s, s.jitter_s, next_run_time=start)
        return sched

    def run(self, stop: threading.Event | None = None) -> None:
        """Run until ``stop`` (or this daemon's own event) is set; the running pass finishes its batch first."""
        if stop is not None:
            self.stop = stop
        sched = self.scheduler()
        sched.start()
        log.info(
            "sync daemon started: push every %.0f s to %s, pull every %.0f s from %s",
            self.settings.sync.push_interval_s,
            self.pusher.target.display,
            self.settings.sync.pull_interval_s,
            self.models.registry.display if self.models.registry else "no registry",
        )
        if self.custody is not None:
            log.info(
                "raw custody: archived exports to %s every %.0f s",
                self.custody.store.display,
                self.settings.sync.raw_store_interval_s,
            )
        try:
            self.stop.wait()
        finally:
            log.info("sync daemon stopping: waiting for the running pass to finish its batch")
            sched.shutdown(wait=True)
            log.info("sync daemon stopped")

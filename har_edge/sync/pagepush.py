"""The pages of the pushed runs: each file run's timeline, table and description, and daily runs per key.

Called by :class:`har_edge.sync.push.Pusher`: for a file run it gives the recording's span (the run's
start and end), its markdown description and readable tags; at the end of each pass, :meth:`Pages.push`
delivers what is pending:

- a file (``files.pages_ms`` NULL, its run made): ``activity_summary.json`` (a table artifact) and
  ``timeline.png``; then ``pages_ms`` is set. The summary is kept in ``files.summary_json`` the first time
  it is computed, so the reclaimed windows (``sync.reclaim_after_days``) do not take it along; a file
  whose windows are gone before its timeline was drawn gets its table only (logged).
- a daily run per value of each grouping key (the device, and each participant), identity tags ``har.kind=daily``,
  ``har.daily.key``, ``har.daily.value``: ``daily_activity.png`` (minutes per activity per local day,
  stacked) and ``daily_minutes.json``, redrawn from every file summary whenever a file is not counted yet
  (``files.daily_ms`` NULL).

Every upload overwrites the same artifact path and every tag is set whole, so a retry after a crash
(between upload and marking) changes nothing. Plots are drawn in a child process
(:mod:`har_edge.sync.renderer`); when drawing fails the results are delivered anyway, the plot is
logged and tried again after :data:`RETRY_S`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select, update

from har_edge.agent.outbox import files, now_ms
from har_edge.common.states import FileStatus
from har_edge.sync import runs
from har_edge.sync.errors import ServerRejected
from har_edge.sync.localtime import LocalTime
from har_edge.sync.pages import (
    DAILY_PLOT_ARTIFACT,
    DAILY_TABLE_ARTIFACT,
    LOGGED_ARTIFACTS_TAG,
    TABLE_ARTIFACT,
    TIMELINE_ARTIFACT,
    Daily,
    FileSummary,
    activity_table,
    daily_summaries,
    file_description,
    file_tags,
    logged_tables_tag,
    summarize,
    verdict_text,
)
from har_edge.sync.participant_tags import summary_key, summary_tags
from har_edge.sync.renderer import RenderResult, render
from har_edge.sync.state import KnownModel

if TYPE_CHECKING:
    from har_edge.sync.push import Pusher, PushReport

log = logging.getLogger(__name__)

#: files whose pages one pass delivers at most (an old backlog is worked off over several passes)
FILES_PER_PASS = 20
#: after a failed plot, the next try waits this long
RETRY_S = 300.0
DAILY_KEY = "har.daily.key"
DAILY_VALUE = "har.daily.value"
#: the grouping keys of daily runs: an attribute of each file (see :meth:`Pages.group_attrs`)
KEYS: tuple[str, ...] = ("device", "participant")
MPL_DIR = ".sync-tmp/matplotlib"


class Pages:
    """The pages of one Pusher's runs."""

    def __init__(self, pusher: Pusher, keys: Sequence[str] = KEYS) -> None:
        self.pusher = pusher
        self.keys = tuple(keys)
        self._summaries: dict[int, FileSummary] = {}
        self._retry_at = 0.0
        #: the last plot child's figures (for the bench and the logs)
        self.last_render: RenderResult | None = None

    # -- for the file run -----------------------------------------------------------------------------

    def _model(self, f: Any) -> KnownModel | None:
        return self.pusher.known_model(f)

    def local_time(self, f: Any) -> LocalTime:
        return LocalTime.of(f.utc_offset_s, f.utc_offset_source, self.pusher.settings.timezone)

    def _summarize(self, f: Any, starts: np.ndarray, probs: np.ndarray, names: list[str]) -> FileSummary:
        m = self._model(f)
        step_ms = round(m.step / m.sample_rate_hz * 1000) if m else None
        window_ms = round(m.window / m.sample_rate_hz * 1000) if m else None
        return summarize(names, starts, probs, self.local_time(f), step_ms=step_ms, window_ms=window_ms)

    def summary(self, f: Any, windows: tuple[list[str], np.ndarray, np.ndarray] | None = None) -> FileSummary | None:
        """The file's summary: kept in the outbox, else computed from its windows (None: they are gone).

        ``windows``: the file's (names, starts, probs) when the caller has read them already."""
        if f.id in self._summaries:
            return self._summaries[f.id]
        s: FileSummary | None = None
        if f.summary_json:
            try:
                s = FileSummary.from_json(f.summary_json)
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("%s: its stored activity summary is unreadable (%s): computing it again", f.name, exc)
        if s is None:
            names, starts, probs = windows if windows is not None else self.pusher.outbox.file_windows(f.id)
            if not len(starts):
                return None
            s = self._summarize(f, starts, probs, names)
            self._store_summary(f.id, s)
        self._summaries[f.id] = s
        return s

    def start_ms(self, f: Any) -> int:
        """The run's start: the recording's first window (else when the file arrived)."""
        return int(f.first_window_ms) if f.first_window_ms is not None else int(f.received_ms)

    def end_ms(self, f: Any) -> int:
        """The run's end: the end of the recording's last window (else when the file was processed)."""
        s = self.summary(f)
        if s is not None and s.windows:
            return s.end_ms
        return int(f.last_window_ms) if f.last_window_ms is not None else int(f.processed_ms)

    def description(self, f: Any) -> str:
        s = self.summary(f)
        model = f"{f.model_name or '?'} {f.model_version or '?'}"
        if s is None:
            verdict, reasons = verdict_text(f.monitor_status, f.monitor_json)
            return f"`{f.name}` on `{self.pusher.device}` with {model}: monitor **{verdict}**" + "".join(
                f"\n- {r}" for r in reasons
            )
        return file_description(
            s,
            file_name=f.name,
            device=self.pusher.device,
            file_format=f.format,
            model=model,
            monitor_status=f.monitor_status,
            monitor_json=f.monitor_json,
        )

    def tags(self, f: Any) -> dict[str, str]:
        s = self.summary(f)
        return file_tags(s) if s is not None else {}

    def group_attrs(self, f: Any) -> dict[str, str]:
        """The values a file is grouped by in daily runs, one per key (a file without a participant: device only)."""
        attrs = {"device": self.pusher.device}
        participant = summary_key(f)
        if participant:
            attrs["participant"] = participant
        return attrs

    # -- the outbox -------------------------------------------------------------------------------------

    def _store_summary(self, file_id: int, s: FileSummary) -> None:
        with self.pusher.outbox.transaction() as conn:
            conn.execute(update(files).where(files.c.id == file_id).values(summary_json=s.to_json()))

    def _mark(self, column: str, ids: Sequence[int]) -> None:
        if not ids:
            return
        at = now_ms()
        with self.pusher.outbox.transaction() as conn:
            for i in range(0, len(ids), 900):
                conn.execute(update(files).where(files.c.id.in_(ids[i : i + 900])).values({column: at}))

    def pending(self, limit: int = FILES_PER_PASS) -> list[Any]:
        """Files with a run whose pages are not on the server yet, oldest first."""
        q = (
            select(files)
            .where(
                files.c.status == FileStatus.PROCESSED.value, files.c.run_id.is_not(None), files.c.pages_ms.is_(None)
            )
            .order_by(files.c.id)
            .limit(limit)
        )
        with self.pusher.outbox.engine.connect() as conn:
            return list(conn.execute(q).all())

    def _daily_due(self) -> bool:
        q = select(files.c.id).where(
            files.c.status == FileStatus.PROCESSED.value, files.c.summary_json.is_not(None), files.c.daily_ms.is_(None)
        )
        with self.pusher.outbox.engine.connect() as conn:
            return conn.execute(q.limit(1)).first() is not None

    def _summarized(self) -> list[Any]:
        q = (
            select(files)
            .where(files.c.status == FileStatus.PROCESSED.value, files.c.summary_json.is_not(None))
            .order_by(files.c.id)
        )
        with self.pusher.outbox.engine.connect() as conn:
            return list(conn.execute(q).all())

    # -- the pass ---------------------------------------------------------------------------------------

    def push(self, report: PushReport, stop: threading.Event | None = None) -> None:
        """Deliver the pending pages (at most :data:`FILES_PER_PASS` files) and the daily runs they change."""
        if not self.pusher.settings.sync.pages or time.monotonic() < self._retry_at:
            return
        todo = self.pending()
        if not todo and not self._daily_due():
            return
        tmp_root = Path(self.pusher.settings.data_dir) / ".sync-tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tmp_root) as tmp_name:
            tmp = Path(tmp_name)
            jobs: list[dict[str, Any]] = []
            plans: list[tuple[Any, FileSummary | None, str | None]] = []
            for f in todo:
                if stop is not None and stop.is_set():
                    break
                plans.append(self._plan_file(f, tmp, jobs))
            groups = self._plan_daily(tmp, jobs) if self._daily_due() else ([], [])
            result = self._render(tmp, jobs)
            failed = False
            for f, s, png in plans:
                failed |= not self._deliver_file(f, s, png, tmp, result, report)
            daily_done = True
            for daily, png in groups[1]:
                daily_done &= self._deliver_daily(daily, png, tmp, result, report)
            if groups[1] and daily_done:
                self._mark("daily_ms", groups[0])
            failed |= not daily_done
        if failed:
            self._retry_at = time.monotonic() + RETRY_S
            log.warning("some plots could not be drawn: their results are delivered, the plots tried again in %.0f s",
                        RETRY_S)  # fmt: skip

    def _render(self, tmp: Path, jobs: list[dict[str, Any]]) -> RenderResult:
        if not jobs:
            return RenderResult()
        result = render(tmp, jobs, Path(self.pusher.settings.data_dir) / MPL_DIR)
        self.last_render = result
        rss = f"{result.peak_rss_kb / 1024:.0f} MB" if result.peak_rss_kb else "?"
        log.info("drew %d of %d plot(s) in %.1f s (plot process peak RSS %s)", len(result.done), len(jobs),
                 result.seconds, rss)  # fmt: skip
        for out, why in sorted(result.failed.items()):
            log.warning("plot %s not drawn: %s", out, why)
        return result

    def _plan_file(self, f: Any, tmp: Path, jobs: list[dict[str, Any]]) -> tuple[Any, FileSummary | None, str | None]:
        names, starts, probs = self.pusher.outbox.file_windows(f.id)
        s = self.summary(f, (names, starts, probs))
        if s is None:
            return f, None, None
        if not len(starts):
            log.warning("%s: its windows were reclaimed before its timeline was drawn: the run gets its table only",
                        f.name)  # fmt: skip
            return f, s, None
        local = self.local_time(f)
        data, png = f"timeline-{f.id}.npz", f"timeline-{f.id}.png"
        np.savez(
            tmp / data,
            local_ms=local.to_local_ms(starts),
            label=probs.argmax(axis=1).astype(np.int16),
            confidence=probs.max(axis=1).astype(np.float32),
            labels=np.array(names),
            step_ms=np.int64(s.step_ms),
        )
        verdict, _ = verdict_text(f.monitor_status, f.monitor_json)
        day = local.local_text(s.start_ms, "%a %Y-%m-%d")
        jobs.append(
            {
                "kind": "timeline",
                "data": data,
                "out": png,
                "title": f"{f.name}  ·  monitor: {verdict}",
                "subtitle": f"device {self.pusher.device}  ·  {day}  ·  {f.model_name} {f.model_version}  ·  "
                f"{s.windows} windows, {s.gaps} gap(s)",
                "xlabel": f"local time ({local.describe(s.start_ms)})",
            }
        )
        return f, s, png

    def _plan_daily(self, tmp: Path, jobs: list[dict[str, Any]]) -> tuple[list[int], list[tuple[Daily, str]]]:
        """(the files counted, [(a group's daily summary, its plot)])."""
        rows = self._summarized()
        items, ids = [], []
        for f in rows:
            s = self.summary(f)
            if s is not None:
                items.append((self.group_attrs(f), s))
                ids.append(int(f.id))
        out = []
        for key in self.keys:
            for n, (value, daily) in enumerate(sorted(daily_summaries(items, key).items())):
                data, png = f"daily-{key}-{n}.json", f"daily-{key}-{n}.png"
                (tmp / data).write_text(
                    json.dumps({"labels": daily.labels, "rows": [r[:-1] for r in daily.rows()]}),
                    encoding="utf-8",
                )
                zones = ", ".join(sorted(daily.sources))
                jobs.append(
                    {
                        "kind": "daily",
                        "data": data,
                        "out": png,
                        "title": f"{key} {value}: minutes per activity per day",
                        "xlabel": f"local day ({zones})",
                    }
                )
                out.append((daily, png))
        return ids, out

    # -- uploads --------------------------------------------------------------------------------------

    def _upload(self, run_id: str, path: Path, what: str) -> None:
        p = self.pusher
        p._call(what, p.client.log_artifact, run_id, str(path))

    def _set_tags(self, run_id: str, tags: dict[str, str], what: str) -> None:
        from mlflow.entities import RunTag

        p = self.pusher
        p._call(what, p.client.log_batch, run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _deliver_file(
        self, f: Any, s: FileSummary | None, png: str | None, tmp: Path, result: RenderResult, report: PushReport
    ) -> bool:
        """Upload one file's pages; False when its timeline is to be drawn again later."""
        run_id: str = f.run_id
        if s is None:
            log.warning("%s: no windows and no stored summary: its run gets no pages", f.name)
            self._mark("pages_ms", [f.id])
            return True
        drawn = png is not None and png in result.done
        folder = tmp / f"file-{f.id}"
        folder.mkdir()
        table = folder / TABLE_ARTIFACT
        table.write_text(activity_table(s), encoding="utf-8")
        try:
            self._upload(run_id, table, f"uploading the activity table of {f.name}")
            tags = {
                runs.DESCRIPTION: self.description(f),
                LOGGED_ARTIFACTS_TAG: logged_tables_tag([TABLE_ARTIFACT]),
                **self.tags(f),
            }
            self._set_tags(run_id, tags, f"setting the description of {f.name}")
            if drawn:
                assert png is not None
                timeline = folder / TIMELINE_ARTIFACT
                (tmp / png).rename(timeline)
                self._upload(run_id, timeline, f"uploading the timeline of {f.name}")
        except ServerRejected as exc:
            if self.pusher._run_gone(run_id):
                log.warning("%s: its run %s is gone: its pages are given up", f.name, run_id)
            else:
                self.pusher._refuse("pages", f.id, f"pages of {f.name}", exc, report)
            self._mark("pages_ms", [f.id])
            return True
        if drawn or png is None:
            self._mark("pages_ms", [f.id])
            report.pages += 1
            return True
        return False

    def _daily_run(self, daily: Daily) -> str:
        identity = {runs.KIND: "daily", DAILY_KEY: daily.key, DAILY_VALUE: daily.value}
        # a participant's daily run carries the tag `har-edge forget` deletes runs by
        tags = {runs.DEVICE: daily.value} if daily.key == "device" else summary_tags(daily.value)
        run_id, created = self.pusher._run(
            f"finding the daily run of {_label(daily)}",
            identity,
            tags=tags,
            run_name=f"daily {daily.key} {daily.value}",
            start_time=daily.start_ms,
        )
        if created:
            log.info("created the daily run %s of %s", run_id, _label(daily))
        return run_id

    def _deliver_daily(self, daily: Daily, png: str, tmp: Path, result: RenderResult, report: PushReport) -> bool:
        """Upload one group's daily page; False when its plot is to be drawn again later."""
        drawn = png in result.done
        folder = tmp / f"{png.removesuffix('.png')}-upload"  # the artifact's own name, one folder per group
        folder.mkdir()
        table = folder / DAILY_TABLE_ARTIFACT
        table.write_text(daily.table(), encoding="utf-8")
        try:
            run_id = self._daily_run(daily)
            self._upload(run_id, table, f"uploading the daily table of {_label(daily)}")
            self._set_tags(
                run_id,
                {
                    runs.DESCRIPTION: daily.description(),
                    LOGGED_ARTIFACTS_TAG: logged_tables_tag([DAILY_TABLE_ARTIFACT]),
                    "har.daily.days": str(len(daily.days)),
                    "har.daily.files": str(daily.files),
                    "har.local_time_source": ", ".join(sorted(daily.sources)),
                },
                f"setting the daily description of {_label(daily)}",
            )
            if drawn:
                plot = folder / DAILY_PLOT_ARTIFACT
                (tmp / png).rename(plot)
                self._upload(run_id, plot, f"uploading the daily plot of {_label(daily)}")
            p = self.pusher
            p._call(
                f"finishing the daily run of {_label(daily)}",
                p.client.set_terminated,
                run_id,
                "FINISHED",
                end_time=daily.end_ms,
            )
        except ServerRejected as exc:
            self.pusher._refuse("daily", None, f"daily run of {_label(daily)}", exc, report)
            return True
        return drawn


def _label(daily: Daily) -> str:
    """How logs and errors name a daily run: the device by its id, a participant never by theirs (an erased
    participant must not stay behind in a log; the run id says which run it was)."""
    return f"{daily.key} {daily.value}" if daily.key == "device" else f"a {daily.key}"

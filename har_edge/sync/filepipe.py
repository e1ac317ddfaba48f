"""The files of a push pass, pipelined: runs opened, CSVs uploaded and runs finished while the points stream.

Requests go out in two lanes, each one thread that sends in the order it was given (:class:`Lanes`):

- **points**: ``log_batch`` chunks, file after file (the first chunk of a file carries its params), at most
  :data:`POINTS_AHEAD` submitted at a time (one in flight, the next queued behind it), so the server never
  waits for the outbox between two chunks;
- **control**: the per-file requests, which a single-worker MLflow server answers beside a ``log_batch``:
  file N+1's run found by its tags or created (while N's points stream), file N's predictions CSV upload (written
  from the outbox a run of windows at a time while its points stream), then its FINISHED. (The embedded store
  has one thread for both: its SQLite file takes one writer at a time.)

The pass's thread owns the outbox (every read and every mark happens on it, as before) and runs an asyncio loop
of small coroutines: per file one streams the points, one writes and uploads the CSV, one finishes the run. The
invariants are the serial pass's:

- a file's run is found by its tags before it is created and its id stored (``files.run_id``) before any of its
  points is sent; files are opened, streamed and finished in the pass's order (oldest first);
- a point, the CSV or FINISHED is marked only after the server acknowledged it; FINISHED is sent only when every
  point of the file is marked and its CSV delivered;
- an error that ends the pass (unreachable, access denied, a bug) stops both lanes: a request queued behind it is
  never sent (:class:`Skipped`), one already in flight in the other lane is awaited and marked if acknowledged, and
  the first error is raised once everything settled. A 4xx for one item is recorded in ``sync_refusals`` as before;
  a run deleted on the server gives up that file only (:class:`RunGone`).

At most two files are open at a time besides the next one's run: the one streaming and the previous one's
upload and FINISHED (two CSVs on disk, memory bounded by one run of windows and :data:`POINTS_AHEAD` chunks).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from har_edge.agent.forget import withheld
from har_edge.sync.delivery import PendingPoint
from har_edge.sync.errors import ServerRejected
from har_edge.sync.predictions import ARTIFACT_NAME, iter_write_predictions_csv

if TYPE_CHECKING:
    from har_edge.sync.push import Pusher, PushReport, _FileRow

log = logging.getLogger(__name__)

_T = TypeVar("_T")

POINTS_AHEAD = 2  # point requests submitted at a time: one in flight, one queued behind it
MAX_BATCH_ITEMS = 1000  # MLflow's cap on metrics + params + tags in one log_batch
Lane = Literal["points", "control"]
_Acked = tuple[list[PendingPoint], list[tuple[PendingPoint, str]]]


class RunGone(Exception):
    """The run of a file no longer accepts data (deleted on the server)."""


class Skipped(Exception):
    """A request not sent: an earlier one failed and the pass ends."""


class Lanes:
    """The two sending threads of a pass, and its first error: once set, nothing more is sent.

    ``shared``: one thread serves both lanes, in the order requests were queued (the embedded store: its SQLite
    file takes one writer at a time, and its requests run in this process anyway)."""

    def __init__(self, *, shared: bool = False) -> None:
        points = ThreadPoolExecutor(max_workers=1, thread_name_prefix="har-edge-sync-points")
        control = points if shared else ThreadPoolExecutor(max_workers=1, thread_name_prefix="har-edge-sync-control")
        self._pools: dict[Lane, ThreadPoolExecutor] = {"points": points, "control": control}
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc

    def call(self, lane: Lane, fn: Callable[[], _T]) -> asyncio.Future[_T]:
        """Queue ``fn`` on a lane; it is skipped when the pass failed before its turn."""
        return asyncio.get_running_loop().run_in_executor(self._pools[lane], self._guarded, fn)

    def _guarded(self, fn: Callable[[], _T]) -> _T:
        if self.error is not None:
            raise Skipped
        try:
            return fn()
        except RunGone:
            raise  # one file's run: the pass goes on
        except BaseException as exc:
            self.fail(exc)
            raise

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True)


@dataclass
class _Job:
    """One file in the pipeline."""

    f: _FileRow
    run_id: str
    created: bool
    gone: bool = False  # given up (its run was deleted on the server)


@dataclass(frozen=True)
class _First:
    """The answer to a file's first point request: the points, and the params if the server refused them."""

    ok: list[PendingPoint]
    bad: list[tuple[PendingPoint, str]]
    params_refused: ServerRejected | None


class FilePipeline:
    """The pending files of one pass, pipelined (see the module's docstring)."""

    def __init__(self, pusher: Pusher, report: PushReport, stop: threading.Event | None) -> None:
        self.p = pusher
        self.report = report
        self.stop = stop
        self.lanes = Lanes(shared=not pusher.target.is_server)

    def push(self, files: Iterable[_FileRow]) -> None:
        """Deliver ``files`` in their order; raise the first error that ends the pass."""
        _ = self.p.client  # made on this thread, before the lanes share it
        try:
            asyncio.run(self._push(iter(files)))
        finally:
            self.lanes.close()
        if self.lanes.error is not None:
            raise self.lanes.error

    # -- the conductor --------------------------------------------------------------------------------------

    def _halted(self) -> bool:
        if self.lanes.error is not None:
            return True
        return self.p._stopped(self.stop, self.report)

    async def _guard(self, coro: Coroutine[Any, Any, _T]) -> _T | None:
        """Run a task; its error ends the pass (kept as the pass's first error), the other tasks settle."""
        try:
            return await coro
        except Skipped:
            return None
        except BaseException as exc:
            self.lanes.fail(exc)
            return None

    async def _push(self, files: Iterator[_FileRow]) -> None:
        tasks: list[asyncio.Task[Any]] = []

        def task(coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T | None]:
            t = asyncio.create_task(self._guard(coro))
            tasks.append(t)
            return t

        tails: deque[asyncio.Task[None]] = deque()
        opening = task(self._open_next(files))
        try:
            while not self._halted():
                job = await opening
                if job is None or self._halted():
                    break
                csv = task(self._csv(job))
                opening = task(self._open_next(files))  # the next run, found or made while these points stream
                await self._stream(job)
                tails.append(task(self._finish(job, csv)))
                while len(tails) > 1:  # the file before is finished before the next one streams
                    await tails.popleft()
        except BaseException as exc:
            self.lanes.fail(exc)
        finally:
            await asyncio.gather(*tasks, return_exceptions=True)  # in-flight requests answered and marked

    # -- one file ----------------------------------------------------------------------------------------------

    async def _open_next(self, files: Iterator[_FileRow]) -> _Job | None:
        """The next file to push, its run found by tags or created (its id stored before anything else)."""
        p = self.p
        for f in files:
            if self._halted():
                return None
            if withheld(p.outbox, f.id):  # its participant is being forgotten: never sent
                continue
            if f.run_id is not None:
                return _Job(f, f.run_id, created=False)
            tags = p._file_tags(f)
            identity, start = p._file_identity(f), p.pages.start_ms(f)  # the recording's span, not when processed
            find = functools.partial(
                p._run,
                f"finding or creating the run of {f.name}",
                identity,
                tags=tags,
                run_name=f.name,
                start_time=start,
            )
            run_id, created = await self.lanes.call("control", find)
            p.delivery.set_run_id(f.id, run_id)  # before anything else: no retry may create a second one
            if created:
                self.report.runs_created += 1
                log.debug("created run %s for %s", run_id, f.name)
            else:  # made by an interrupted pass (or by hand): make sure of its descriptive tags
                retag = functools.partial(p._send_tags, run_id, tags, f"the tags of {f.name}", f.id)
                await self.lanes.call("control", retag)
            return _Job(f, run_id, created)
        return None

    def _give_up(self, job: _Job, exc: RunGone) -> None:
        if job.gone:
            return
        job.gone = True
        f = job.f
        msg = (
            f"the run {job.run_id} of {f.name} no longer accepts data ({exc}); it was probably deleted on the "
            "server: the file's remaining results are given up (listed in sync_refusals)"
        )
        log.error("%s", msg)
        self.p.delivery.refuse_file(f.id, msg)
        self.report.refused.append(f"file {f.name}")

    async def _stream(self, job: _Job) -> None:
        """The file's pending points in ``log_batch`` chunks, :data:`POINTS_AHEAD` submitted at a time; each chunk
        marked once acknowledged, in order. The first request carries the params (with the first points on a run
        just made: it has none to conflict with, and it saves a request)."""
        p, f = self.p, job.f
        what = f"metric points of {f.name}"
        batch = p.sync.batch_size
        params = p._file_params(f)
        fallback: Literal["apart", "skip"] = "skip" if p.delivery.refused("params", f.id) else "apart"
        mode: Literal["with", "apart", "skip"] = "with" if job.created else fallback
        limit = min(batch, MAX_BATCH_ITEMS - len(params)) if mode == "with" else batch
        pts = p.delivery.pending_points(f.id, limit)
        inflight: deque[asyncio.Future[_Acked | _First]] = deque()
        first = mode != "skip"  # params go even when no point is left (a pass cut after the points)
        try:
            while True:
                while (pts or first) and len(inflight) < POINTS_AHEAD and not job.gone and not self._halted():
                    chunk = pts
                    send: Callable[[], _Acked | _First]
                    if first:
                        send = functools.partial(self._send_first, job, chunk, params, mode, fallback, what)
                        first = False
                    else:
                        send = functools.partial(p._send_points, job.run_id, chunk, what)
                    inflight.append(self.lanes.call("points", send))
                    pts = p.delivery.pending_points(f.id, batch, after_id=chunk[-1].id) if chunk else []
                if not inflight:
                    return
                try:
                    answer = await inflight.popleft()
                except RunGone as exc:
                    self._give_up(job, exc)
                    continue
                if job.gone:
                    continue
                if isinstance(answer, _First):
                    if answer.params_refused is not None:
                        p._refuse("params", f.id, f"params of {f.name}", answer.params_refused, self.report)
                    answer = (answer.ok, answer.bad)
                p._mark(*answer, f.id, self.report)
        except BaseException as exc:
            self.lanes.fail(exc)  # nothing more is sent; what is in flight is answered before the pass ends
            for rest in inflight:  # skipped, or answered and left unmarked: sent again next pass, stored once
                with contextlib.suppress(BaseException):
                    await rest
            raise

    def _send_first(
        self,
        job: _Job,
        pts: list[PendingPoint],
        params: dict[str, str],
        mode: Literal["with", "apart", "skip"],
        fallback: Literal["apart", "skip"],
        what: str,
    ) -> _First:
        """(On the points lane.) The params with the first points, or apart when that batch is refused."""
        from mlflow.entities import Metric, Param

        p, f = self.p, job.f
        plist = [Param(k, v) for k, v in params.items()]
        if mode == "with":
            try:
                p._call(
                    f"logging the params and {len(pts)} metric points of {f.name}",
                    p.client.log_batch,
                    job.run_id,
                    metrics=[Metric(x.key, x.value, x.timestamp_ms, x.step) for x in pts],
                    params=plist,
                )
                return _First(pts, [], None)
            except ServerRejected:
                mode = fallback
        refused: ServerRejected | None = None
        if mode == "apart":
            try:
                p._call(f"logging the params of {f.name}", p.client.log_batch, job.run_id, params=plist)
            except ServerRejected as exc:
                if p._run_gone(job.run_id):
                    raise RunGone(str(exc)) from exc
                refused = exc
        ok, bad = p._send_points(job.run_id, pts, what) if pts else ([], [])
        return _First(ok, bad, refused)

    async def _csv(self, job: _Job) -> bool:
        """Write the predictions CSV from the outbox a run of windows at a time (other coroutines run in between),
        upload it on the control lane, mark it. True once delivered (or refused and recorded)."""
        p, f = self.p, job.f
        if f.artifact_delivered_ms is not None:
            return True
        if f.windows:
            names = p.delivery.file_labels(f.id)
            tmp_root = Path(p.settings.data_dir) / ".sync-tmp"
            tmp_root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
                path = Path(tmp) / ARTIFACT_NAME
                with (
                    contextlib.closing(p.delivery.iter_windows(f.id)) as parts,
                    contextlib.closing(iter_write_predictions_csv(path, names, parts)) as writing,
                ):
                    for _ in writing:
                        await asyncio.sleep(0)
                        if job.gone or self._halted():
                            return False
                try:
                    refused = await self.lanes.call("control", functools.partial(self._upload, job, path))
                except RunGone as exc:
                    self._give_up(job, exc)
                    return False
            if job.gone:
                return False
            if refused is None:
                self.report.artifacts += 1
            else:
                p._refuse("artifact", f.id, f"predictions of {f.name}", refused, self.report)
        p.delivery.mark_artifact(f.id)
        return True

    def _upload(self, job: _Job, path: Path) -> ServerRejected | None:
        """(On the control lane.) None once uploaded; the server's refusal; RunGone when the run was deleted."""
        p = self.p
        try:
            p._call(f"uploading the predictions of {job.f.name}", p.client.log_artifact, job.run_id, str(path))
        except ServerRejected as exc:
            if p._run_gone(job.run_id):
                raise RunGone(str(exc)) from exc
            return exc
        return None

    async def _finish(self, job: _Job, csv: asyncio.Task[bool | None]) -> None:
        """FINISHED once every point is marked and the CSV delivered; then the file is marked finished."""
        p, f = self.p, job.f
        if not await csv or job.gone or self.lanes.error is not None:
            return
        if p.delivery.pending_points(f.id, 1):  # the pass was stopped mid-file, or a chunk was not answered
            return
        end = p.pages.end_ms(f)

        def finish() -> ServerRejected | None:
            try:
                p._call(f"finishing the run of {f.name}", p.client.set_terminated, job.run_id, "FINISHED", end_time=end)
            except ServerRejected as exc:
                return exc
            return None

        refused = await self.lanes.call("control", finish)
        if refused is not None:
            p._refuse("finish", f.id, f"run {job.run_id}", refused, self.report)
        p.delivery.mark_finished(f.id)
        self.report.files_finished += 1

"""One export in, one outbox transaction out.

decode (streamed chunk by chunk) -> fuse/resample/window -> scale -> TFLite ->
per-window predictions, per-file and per-minute metrics -> outbox.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import queue
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import func, select

from har_edge.agent import __version__
from har_edge.agent.decode import open_export
from har_edge.agent.decode.types import Recording
from har_edge.agent.errors import HarEdgeError, InputError, InternalError, OutboxError, TooLarge, TooShort
from har_edge.agent.identity import Identities
from har_edge.agent.model import LoadedModel
from har_edge.agent.monitor.accumulate import MonitorAccumulator
from har_edge.agent.monitor.verdict import MonitorReport, judge
from har_edge.agent.outbox import FileRecord, MetricPoint, Outbox, now_ms
from har_edge.agent.outbox_schema import files
from har_edge.agent.preprocess import StreamWindower, WindowSet, merge_quality
from har_edge.agent.settings import AgentSettings, MonitorSettings
from har_edge.agent.summary import iter_minute_points, summary_points
from har_edge.agent.watch import Watch, watch_of
from har_edge.common.hashing import export_sha256
from har_edge.common.states import FileStatus

if TYPE_CHECKING:
    from har_edge.agent.decode.fit import Verified

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    status: FileStatus
    file_id: int
    name: str
    windows: int = 0
    seconds: float = 0.0
    error: HarEdgeError | None = None


@dataclass(frozen=True)
class Identity:
    """What an export is: its content hash, size, and the processed file with the same content (or None)."""

    sha256: str
    size: int
    prior: Any | None


@dataclass
class _Inferred:
    """What decoding, windowing and inference made of one export."""

    starts: np.ndarray
    probs: np.ndarray
    per_window: list[float]
    timings: dict[str, float]
    quality: dict[str, float]
    format: str
    #: the monitor's figures gathered during inference (None when monitoring is off)
    acc: MonitorAccumulator | None = None
    #: (local time minus UTC in s, where the export says so), from the first recording that states it
    utc_offset: tuple[int, str] | None = None


#: ``(stage, progress)``: called when a stage is entered; progress counts stage entries, so it grows with
#: every chunk decoded and batch inferred
StageListener = Callable[[str, int], None]


def latest_window_ms(outbox: Outbox) -> int | None:
    """The latest window start of any processed file in the outbox (None when there is none)."""
    with outbox.engine.connect() as conn:
        found = conn.execute(select(func.max(files.c.last_window_ms))).scalar()
    return int(found) if found is not None else None


class Processor:
    """Runs the pipeline for one export at a time against one outbox."""

    def __init__(
        self,
        settings: AgentSettings,
        outbox: Outbox,
        scratch: Path,
        on_stage: StageListener | None = None,
        *,
        monitor: MonitorSettings | None = None,
        share_flagged_windows: bool = False,
        identities: Identities | None = None,
    ) -> None:
        self.settings = settings
        #: assigns participants and watch pseudonyms (None: files carry the watch only)
        self.identities = identities
        #: the watch of the export being processed (known once it is decoded) and its participant folder
        self._watch: Watch | None = None
        self._folder: str | None = None
        self.monitor = monitor or MonitorSettings()
        self.share_flagged_windows = share_flagged_windows
        #: the monitor report of the last export processed
        self.last_monitor: MonitorReport | None = None
        self.outbox = outbox
        self.scratch = Path(scratch)
        self.on_stage = on_stage
        #: wall and CPU seconds per stage of the last export processed (for benchmarks and logs)
        self.last_stages: dict[str, dict[str, float]] = {}
        #: the latest sample time of the files processed so far (a plausibility reference for clocks); it
        #: starts from the outbox's latest window time, so a restart does not forget it
        self.last_data_ms: int | None = latest_window_ms(outbox)
        self._clock = _StageClock()

    def identify(self, paths: list[Path], sha256: str | None = None) -> Identity:
        """Hash the export (unless ``sha256`` is given) and look its content up: the one dedup query."""
        sha = sha256 or export_sha256(paths)
        size = sum(p.stat().st_size for p in paths)
        return Identity(sha, size, self.outbox.processed_file(sha))

    def process(
        self,
        paths: list[Path],
        model: LoadedModel,
        *,
        name: str | None = None,
        received_ms: int | None = None,
        progress: Callable[[int], None] | None = None,
        sha256: str | None = None,
        identity: Identity | None = None,
        verified: Iterable[Verified] = (),
        folder: str | None = None,
    ) -> Outcome:
        """Process an export (one file or a table pair) and store the result.

        ``folder``: the participant folder of the inbox the export came from (``inbox/<folder>/``).

        ``identity`` is the export's :meth:`identify` when the caller already has it; ``verified``
        the watcher's proofs of its FIT checks (see ``decode.check_complete``: decoding skips a second CRC pass).

        Input errors and unexpected exceptions (kind ``internal``, with the stage) are stored as a
        ``failed`` record and returned: the caller quarantines. Outbox trouble (a full disk, a locked
        or damaged file) propagates and the file stays where it is, to be retried.
        """
        name = name or paths[0].name
        t_start = time.perf_counter()
        self.last_stages = {}
        self._clock = _StageClock(self.on_stage)
        self._watch, self._folder = None, folder
        ident = identity or self.identify(paths, sha256)
        base = self._base(ident, name, received_ms)
        if ident.prior is not None:
            return self._record_duplicate(base, ident.prior)
        try:
            self._check_size(name, ident.size)
            inferred = self._run(paths, model, name, progress, verified)
        except InputError as exc:
            return self._record_failure(base, model, exc)
        except OutboxError:
            raise
        except Exception as exc:
            return self._record_failure(base, model, self._internal(name, exc, self._clock.current))
        try:
            return self._store(base, model, inferred, t_start)
        except OutboxError:
            raise
        except Exception as exc:
            return self._record_failure(base, model, self._internal(name, exc, "store"))

    def record_failure(
        self,
        paths: list[Path],
        model: LoadedModel,
        exc: HarEdgeError,
        *,
        name: str | None = None,
        folder: str | None = None,
    ) -> Outcome:
        """Store a failure decided outside the pipeline (a crash loop found at start)."""
        self._watch, self._folder = None, folder
        return self._record_failure(self._base(self.identify(paths), name or paths[0].name, None), model, exc)

    # -- the parts of process ------------------------------------------------

    @staticmethod
    def _base(ident: Identity, name: str, received_ms: int | None) -> dict[str, Any]:
        return dict(
            sha256=ident.sha256,
            name=name,
            size=ident.size,
            received_ms=received_ms if received_ms is not None else now_ms(),
            agent_version=__version__,
        )

    def _who(self) -> dict[str, Any]:
        """The identity columns of the export being processed: its watch and its participant."""
        w = self._watch
        out: dict[str, Any] = {}
        if w is not None:
            out.update(
                watch_manufacturer=w.manufacturer,
                watch_product=w.product,
                watch_serial=w.serial,
                watch_firmware=w.firmware,
            )
        if self.identities is not None:
            try:
                a = self.identities.assign(w, self._folder)
            except HarEdgeError as exc:  # a secret gone missing: the file is kept, unattributed
                log.error("no participant assigned to this export: %s", exc)
            else:
                out.update(participant=a.participant, participant_source=a.source, watch_pseudonym=a.watch_pseudonym)
        return out

    def _check_size(self, name: str, size: int) -> None:
        if size > self.settings.max_file_mb * 1e6:
            raise TooLarge(
                f"{name}: {size / 1e6:.0f} MB is over agent.max_file_mb = {self.settings.max_file_mb:.0f}: "
                "split the export or raise the limit"
            )

    def _record_duplicate(self, base: dict[str, Any], prior: Any) -> Outcome:
        name = base["name"]
        # the same content: the same watch; the participant of the folder it came from, else the prior's
        who: dict[str, Any] = {k: getattr(prior, k, None) for k in _WHO_COLUMNS}
        if self._folder is not None and self.identities is not None:
            self._watch = Watch(
                who["watch_manufacturer"], who["watch_product"], who["watch_serial"], who["watch_firmware"]
            )
            who.update(self._who())
        fid = self.outbox.record_file(
            FileRecord(
                **base,
                **who,
                status=FileStatus.DUPLICATE,
                processed_ms=now_ms(),
                error_message=f"same content as {prior.name}",
            )
        )
        log.info("%s: duplicate of %s (file %d), not processed again", name, prior.name, prior.id)
        return Outcome(FileStatus.DUPLICATE, fid, name)

    @staticmethod
    def _internal(name: str, exc: Exception, stage: str) -> InternalError:
        tb = "".join(traceback.format_exception(exc))
        log.error("%s: unexpected error in %s, the file is quarantined:\n%s", name, stage, tb)
        return InternalError(
            f"{name}: unexpected error in {stage}: {type(exc).__name__}: {exc} (a bug in har-edge: "
            "please report it with this file's reason.json; the file is kept in quarantine)",
            stage=stage,
            traceback=tb,
        )

    def _record_failure(self, base: dict[str, Any], model: LoadedModel, exc: HarEdgeError) -> Outcome:
        m = model.manifest
        who = self._who()
        fid = self.outbox.record_file(
            FileRecord(
                **base,
                **who,
                status=FileStatus.FAILED,
                processed_ms=now_ms(),
                error_kind=exc.kind,
                error_message=str(exc),
                error_stage=getattr(exc, "stage", None),
                model_name=m.name,
                model_version=m.version,
                model_sha256=m.sha256,
            )
        )
        if not isinstance(exc, InternalError):
            log.warning("%s: %s", base["name"], exc)
        return Outcome(FileStatus.FAILED, fid, base["name"], error=exc)

    def _store(self, base: dict[str, Any], model: LoadedModel, r: _Inferred, t_start: float) -> Outcome:
        name, m = base["name"], model.manifest
        release_free_memory()  # what decoding left behind, before the store's own buffers
        self._clock.enter("store")
        t_store, c_store = time.perf_counter(), time.thread_time()
        processed_ms = now_ms()
        points = summary_points(
            label_names=m.labels,
            probs=r.probs,
            step_s=m.step / m.sample_rate_hz,
            low_confidence=self.settings.low_confidence,
            per_window_s=r.per_window,
            timings=r.timings,
            quality=r.quality,
            timestamp_ms=processed_ms,
        )
        all_points: Iterable[MetricPoint] = itertools.chain(
            points, iter_minute_points(label_names=m.labels, start_ms=r.starts, probs=r.probs)
        )
        monitor, flagged = self._monitor_report(r.acc, model, r.timings)
        if monitor is not None:
            all_points = itertools.chain(all_points, monitor.metric_points(processed_ms))
        who = self._who()
        rec = FileRecord(
            **base,
            **who,
            status=FileStatus.PROCESSED,
            processed_ms=processed_ms,
            format=r.format,
            decode_s=r.timings["decode"],
            preprocess_s=r.timings["preprocess"],
            inference_s=r.timings["inference"],
            model_name=m.name,
            model_version=m.version,
            model_sha256=m.sha256,
            monitor_status=monitor.status if monitor is not None else None,
            monitor_json=monitor.to_json() if monitor is not None else None,
            utc_offset_s=r.utc_offset[0] if r.utc_offset else None,
            utc_offset_source=r.utc_offset[1] if r.utc_offset else None,
        )
        fid = self.outbox.record_file(
            rec, label_names=m.labels, start_ms=r.starts, probs=r.probs, points=all_points, flagged_npz=flagged
        )
        if monitor is not None and monitor.status == "alert":
            from har_edge.agent.monitor.trigger import check_trigger

            check_trigger(self.outbox, self.monitor)
        store_s = time.perf_counter() - t_store
        total = time.perf_counter() - t_start
        if self.last_stages:
            self.last_stages["wall_s"]["store"] = store_s
            self.last_stages["cpu_s"]["store"] = time.thread_time() - c_store
            self.last_stages["wall_s"]["total"] = total
        self.outbox.set_file_times(fid, store_s=store_s, total_s=total)
        release_free_memory()
        t = r.timings
        log.info(
            "%s: %d windows with %s in %.2f s (decode %.2f, preprocess %.2f, inference %.2f, store %.2f)",
            name,
            len(r.probs),
            model.label,
            total,
            t["decode"],
            t["preprocess"],
            t["inference"],
            store_s,
        )
        return Outcome(FileStatus.PROCESSED, fid, name, windows=len(r.probs), seconds=total)

    def _monitor_report(
        self, acc: MonitorAccumulator | None, model: LoadedModel, timings: dict[str, float]
    ) -> tuple[MonitorReport | None, bytes | None]:
        """The file's verdict (and, for an alert when sharing is on, its kept windows as npz bytes)."""
        self.last_monitor = None
        if acc is None:
            return None, None
        t0 = time.perf_counter()
        report = judge(acc.stats(), model.manifest.reference, self.monitor, list(model.manifest.labels))
        monitor_s = timings.get("monitor", 0.0) + time.perf_counter() - t0
        report.metrics["seconds"] = monitor_s
        report.metrics["cost_share"] = monitor_s / timings["inference"] if timings.get("inference") else 0.0
        self.last_monitor = report
        flagged = None
        if report.status == "alert" and acc.keep:
            import io

            idx, windows = acc.kept_windows()
            buf = io.BytesIO()
            np.savez_compressed(buf, idx=idx, windows=windows.astype(np.float32))
            flagged = buf.getvalue()
        return report, flagged

    def _run(
        self,
        paths: list[Path],
        model: LoadedModel,
        name: str,
        progress: Callable[[int], None] | None,
        verified: Iterable[Verified] = (),
    ) -> _Inferred:
        m = model.manifest
        acc = (
            MonitorAccumulator(
                m.reference,
                classes=len(m.labels),
                channels=[c.name for c in m.channels],
                low_confidence=self.settings.low_confidence,
                input_range=model.input_range(),
                keep_windows=self.monitor.flagged_windows_per_file if self.share_flagged_windows else 0,
            )
            if self.monitor.enabled
            else None
        )
        scratch = self.scratch / f"export-{time.monotonic_ns()}"
        scratch.mkdir(parents=True, exist_ok=True)
        clock = self._clock
        per_window: list[float] = []
        starts_parts: list[np.ndarray] = []
        probs_parts: list[np.ndarray] = []
        quality: dict[str, float] = {}
        outside = np.zeros(m.n_channels, np.float64)  # scaled values beyond the int8 input range, per channel
        try:
            with clock.stage("decode"):
                recordings = open_export(
                    paths,
                    scratch,
                    max_archive_bytes=int(self.settings.max_archive_mb * 1e6),
                    name=name,
                    verified=verified,
                )
            self._watch = watch_of(recordings)
            for rec in recordings:
                sw = StreamWindower(
                    rate_hz=m.sample_rate_hz,
                    window=m.window,
                    step=m.step,
                    max_gap_s=self.settings.max_gap_s,
                    has_gyro=rec.has_gyro,
                    accel_unit=rec.accel_unit,
                    name=rec.name,
                    last_file_ms=self.last_data_ms,
                )
                # decoded, windowed and inferred a chunk (~3 min) at a time: memory stays flat whatever the
                # file's length; with agent.decode_ahead a thread decodes and windows the next chunks while the
                # model runs (LiteRT's invoke and numpy's large operations release the GIL)
                batcher = _Batcher(getattr(model.runner, "batch", 1))
                ahead = self.settings.decode_ahead
                sets = _decoded_ahead(rec, sw, clock, ahead) if ahead > 0 else _window_sets(rec, sw, clock)
                for ws in itertools.chain(sets, [None]):
                    # whole batches only: a chunk's last few windows wait for the next chunk's
                    for windows, starts in batcher.add(ws):
                        with clock.stage("inference"):
                            scaled = model.scale(windows)
                            part = model.predict_scaled(scaled, per_window, outside)
                            probs_parts.append(part)
                            starts_parts.append(starts)
                        if acc is not None:
                            with clock.stage("monitor"):
                                acc.add(scaled, part)
                        if progress is not None:
                            progress(len(starts))
                if acc is not None:
                    with clock.stage("monitor"):  # it flushes the recording's last windows: monitor work
                        acc.end_recording()
                latest = sw.last_time_ms()
                if latest is not None and latest > (self.last_data_ms or 0):
                    self.last_data_ms = latest  # the next file's plausibility reference (see StreamWindower)
                merge_quality(quality, sw.quality())
            fmt = ",".join(sorted({r.format for r in recordings}))
            utc_offset = next(
                ((int(r.meta["utc_offset_s"]), str(r.meta["utc_offset_source"])) for r in recordings
                 if r.meta.get("utc_offset_s") is not None),
                None,
            )  # fmt: skip
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.last_stages = clock.figures()
        if not probs_parts:
            dur = quality.get("duration_s", 0.0)
            raise TooShort(
                f"{name}: {dur:.1f} s of usable IMU data holds no full window of "
                f"{m.window / m.sample_rate_hz:.0f} s (gaps over {self.settings.max_gap_s} s split it): "
                "record longer stretches"
            )
        starts = np.concatenate(starts_parts)
        probs = np.concatenate(probs_parts)
        values = len(probs) * m.window
        for c, n_out in zip(m.channels, outside.tolist(), strict=True):
            quality[f"input_outside_share_{c.name}"] = n_out / values if values else 0.0
        if len(starts) > 1 and not (np.diff(starts) >= 0).all():
            order = np.argsort(starts, kind="stable")
            starts, probs = starts[order], probs[order]
        timings: dict[str, float] = {
            k: clock.wall[k] for k in ("decode", "preprocess", "inference", "monitor") if k in clock.wall
        }
        return _Inferred(starts, probs, per_window, timings, quality, fmt, acc, utc_offset)


#: the identity columns of a file row (what a duplicate copies from its prior)
_WHO_COLUMNS = (
    "watch_manufacturer",
    "watch_product",
    "watch_serial",
    "watch_firmware",
    "watch_pseudonym",
    "participant",
    "participant_source",
)

_malloc_trim: Any = None


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them, so RSS would stay at a file's high-water mark)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc; musl and others have none
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


class _Batcher:
    """Regroups window sets into runs of whole batches; the remainder waits for the next set (None: flush)."""

    def __init__(self, batch: int) -> None:
        self.batch = max(1, int(batch))
        #: (windows, start_ms) waiting for the next set
        self._wait: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, ws: WindowSet | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if ws is None:
            if self._wait is not None:
                yield self._wait
                self._wait = None
            return
        w, s = ws.windows, ws.start_ms
        if self._wait is not None:  # top the waiting windows up to one batch
            ww, ws_ = self._wait
            need = self.batch - len(ww)
            head_w, head_s = np.concatenate((ww, w[:need])), np.concatenate((ws_, s[:need]))
            w, s = w[need:], s[need:]
            self._wait = None
            if len(head_w) < self.batch:
                self._wait = (head_w, head_s)
                return
            yield head_w, head_s
        full = len(w) - len(w) % self.batch
        if full:
            yield w[:full], s[:full]
        if full < len(w):
            self._wait = (w[full:].copy(), s[full:].copy())


class _StageClock:
    """Wall and CPU seconds (of this thread) per stage; the stage running now; a listener told of each entry."""

    def __init__(self, listener: StageListener | None = None) -> None:
        self.wall: dict[str, float] = {"decode": 0.0, "preprocess": 0.0, "inference": 0.0}
        self.cpu: dict[str, float] = dict(self.wall)
        self.listener = listener
        #: the stage entered last (an exception escaping a stage leaves it there)
        self.current = "decode"
        self.entries = 0

    def enter(self, name: str) -> None:
        self.current = name
        self.entries += 1
        if self.listener is not None:
            self.listener(name, self.entries)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.enter(name)
        w, c = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - c

    def figures(self) -> dict[str, dict[str, float]]:
        return {"wall_s": dict(self.wall), "cpu_s": dict(self.cpu)}

    def absorb(self, other: _StageClock) -> None:
        """Add another thread's stage seconds to these (its stages ran alongside, so walls overlap)."""
        for mine, theirs in ((self.wall, other.wall), (self.cpu, other.cpu)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0.0) + v


def _window_sets(rec: Recording, sw: StreamWindower, clock: _StageClock) -> Generator[WindowSet, None, None]:
    """Decode a recording chunk by chunk and window it; yields non-empty WindowSets."""
    chunks = rec.chunks()
    try:
        while True:
            with clock.stage("decode"):
                chunk = next(chunks, None)
            with clock.stage("preprocess"):
                last = chunk is None
                ws = sw.finish() if chunk is None else sw.feed(chunk)
            del chunk
            if len(ws):
                yield ws
            if last:
                return
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


#: (stage entries made since the last item, a window set or None at the end, an exception raised or None)
_Ahead = tuple[list[str], WindowSet | None, BaseException | None]


def _decoded_ahead(rec: Recording, sw: StreamWindower, clock: _StageClock, depth: int) -> Iterator[WindowSet]:
    """:func:`_window_sets` run by a decode thread at most ``depth`` window sets ahead of the caller.

    What the caller sees is what it would see without the thread: the same window sets in the same order, the
    decode thread's exception raised at the same point, and the stage entries (the listener: crash-loop
    progress) replayed in this thread in the same order before each set. The thread's own clock measures its
    stages; its seconds are added to ``clock`` at the end (they overlapped inference, so walls add up to more
    than the file's). Memory: ``depth`` sets in the queue, one being made, one being inferred.
    """
    pending: list[str] = []
    own = _StageClock(lambda name, _n: pending.append(name))
    q: queue.Queue[_Ahead] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: _Ahead) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        sets = _window_sets(rec, sw, own)
        try:
            for ws in sets:
                entries = pending[:]
                pending.clear()
                if not put((entries, ws, None)):
                    return
            put((pending[:], None, None))
        except BaseException as exc:  # handed to the caller, raised there
            put((pending[:], None, exc))
        finally:
            sets.close()

    worker = threading.Thread(target=work, name="har-edge-decode", daemon=True)
    worker.start()
    try:
        while True:
            entries, ws, exc = q.get()
            for name in entries:
                clock.enter(name)
            if exc is not None:
                raise exc
            if ws is None:
                return
            yield ws
    finally:
        stop.set()  # the caller stopped early (an error in inference): the thread ends after its chunk
        worker.join()
        clock.absorb(own)

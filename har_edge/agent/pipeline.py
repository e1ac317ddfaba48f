"""One export in, one outbox transaction out.

decode (streamed chunk by chunk) -> fuse/resample/window -> scale -> TFLite ->
per-window predictions, per-file and per-minute metrics -> outbox.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from har_edge.agent import __version__
from har_edge.agent.decode import open_export
from har_edge.agent.errors import HarEdgeError, InputError, TooLarge, TooShort
from har_edge.agent.model import LoadedModel
from har_edge.agent.outbox import FileRecord, Outbox, now_ms
from har_edge.agent.preprocess import StreamWindower
from har_edge.agent.settings import AgentSettings
from har_edge.agent.summary import iter_minute_points, summary_points

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    status: str  # processed | duplicate | failed
    file_id: int
    name: str
    windows: int = 0
    seconds: float = 0.0
    error: HarEdgeError | None = None


def export_sha256(paths: list[Path]) -> str:
    """sha256 of a file; of a group (a table pair), sha256 over the members' sorted hashes."""
    hashes = []
    view = memoryview(bytearray(1 << 20))  # one buffer, reused
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb", buffering=0) as f:
            while got := f.readinto(view):
                h.update(view[:got])
        hashes.append(h.hexdigest())
    if len(hashes) == 1:
        return hashes[0]
    return hashlib.sha256("".join(sorted(hashes)).encode()).hexdigest()


class Processor:
    """Runs the pipeline for one export at a time against one outbox."""

    def __init__(self, settings: AgentSettings, outbox: Outbox, scratch: Path) -> None:
        self.settings = settings
        self.outbox = outbox
        self.scratch = Path(scratch)
        #: wall and CPU seconds per stage of the last export processed (for benchmarks and logs)
        self.last_stages: dict[str, dict[str, float]] = {}
        #: the latest sample time of the files processed so far (a plausibility reference for clocks)
        self.last_data_ms: int | None = None

    def process(
        self,
        paths: list[Path],
        model: LoadedModel,
        *,
        name: str | None = None,
        received_ms: int | None = None,
        progress: Callable[[int], None] | None = None,
        sha256: str | None = None,
    ) -> Outcome:
        """Process an export (one file or a table pair) and store the result.

        ``sha256`` is the export's :func:`export_sha256` when the caller already has it.

        Input errors are stored as a ``failed`` record and returned (the caller
        quarantines); anything else (outbox trouble, a bug) propagates and the
        file stays where it is, to be retried.
        """
        name = name or paths[0].name
        t_start = time.perf_counter()
        self.last_stages = {}
        received_ms = received_ms if received_ms is not None else now_ms()
        sha = sha256 or export_sha256(paths)
        size = sum(p.stat().st_size for p in paths)
        base = dict(sha256=sha, name=name, size=size, received_ms=received_ms, agent_version=__version__)
        prior = self.outbox.processed_file(sha)
        if prior is not None:
            fid = self.outbox.record_file(
                FileRecord(
                    **base, status="duplicate", processed_ms=now_ms(), error_message=f"same content as {prior.name}"
                )
            )
            log.info("%s: duplicate of %s (file %d), not processed again", name, prior.name, prior.id)
            return Outcome("duplicate", fid, name)
        m = model.manifest
        try:
            if size > self.settings.max_file_mb * 1e6:
                raise TooLarge(
                    f"{name}: {size / 1e6:.0f} MB is over agent.max_file_mb = {self.settings.max_file_mb:.0f}: "
                    "split the export or raise the limit"
                )
            starts, probs, per_window, timings, quality, fmt = self._run(paths, model, name, progress)
        except InputError as exc:
            fid = self.outbox.record_file(
                FileRecord(
                    **base,
                    status="failed",
                    processed_ms=now_ms(),
                    error_kind=exc.kind,
                    error_message=str(exc),
                    model_name=m.name,
                    model_version=m.version,
                    model_sha256=m.sha256,
                )
            )
            log.warning("%s: %s", name, exc)
            return Outcome("failed", fid, name, error=exc)
        release_free_memory()  # what decoding left behind, before the store's own buffers
        t_store, c_store = time.perf_counter(), time.thread_time()
        processed_ms = now_ms()
        points = summary_points(
            label_names=m.labels,
            probs=probs,
            step_s=m.step / m.sample_rate_hz,
            low_confidence=self.settings.low_confidence,
            per_window_s=per_window,
            timings=timings,
            quality=quality,
            timestamp_ms=processed_ms,
        )
        points = itertools.chain(points, iter_minute_points(label_names=m.labels, start_ms=starts, probs=probs))
        rec = FileRecord(
            **base,
            status="processed",
            processed_ms=processed_ms,
            format=fmt,
            decode_s=timings["decode"],
            preprocess_s=timings["preprocess"],
            inference_s=timings["inference"],
            model_name=m.name,
            model_version=m.version,
            model_sha256=m.sha256,
        )
        fid = self.outbox.record_file(rec, label_names=m.labels, start_ms=starts, probs=probs, points=points)
        store_s = time.perf_counter() - t_store
        total = time.perf_counter() - t_start
        if self.last_stages:
            self.last_stages["wall_s"]["store"] = store_s
            self.last_stages["cpu_s"]["store"] = time.thread_time() - c_store
            self.last_stages["wall_s"]["total"] = total
        self.outbox.set_file_times(fid, store_s=store_s, total_s=total)
        release_free_memory()
        log.info(
            "%s: %d windows with %s in %.2f s (decode %.2f, preprocess %.2f, inference %.2f, store %.2f)",
            name,
            len(probs),
            model.label,
            total,
            timings["decode"],
            timings["preprocess"],
            timings["inference"],
            store_s,
        )
        return Outcome("processed", fid, name, windows=len(probs), seconds=total)

    def _run(self, paths, model: LoadedModel, name, progress):
        m = model.manifest
        scratch = self.scratch / f"export-{time.monotonic_ns()}"
        scratch.mkdir(parents=True, exist_ok=True)
        clock = _StageClock()
        per_window: list[float] = []
        starts_parts: list[np.ndarray] = []
        probs_parts: list[np.ndarray] = []
        quality: dict[str, float] = {}
        try:
            with clock.stage("decode"):
                recordings = open_export(
                    paths, scratch, max_archive_bytes=int(self.settings.max_archive_mb * 1e6), name=name
                )
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
                # file's length. (A decode thread running ahead of inference was measured: no faster here, as
                # decoding holds the GIL between numpy calls, and a second malloc arena costs ~2 MB.)
                batcher = _Batcher(getattr(model.runner, "batch", 1))
                for ws in itertools.chain(_window_sets(rec, sw, clock), [None]):
                    # whole batches only: a chunk's last few windows wait for the next chunk's
                    for windows, starts in batcher.add(ws):
                        with clock.stage("inference"):
                            probs_parts.append(model.predict(windows, per_window))
                            starts_parts.append(starts)
                        if progress is not None:
                            progress(len(starts))
                latest = sw.last_time_ms()
                if latest is not None and latest > (self.last_data_ms or 0):
                    self.last_data_ms = latest  # the next file's plausibility reference (see StreamWindower)
                q = sw.quality()
                for k, v in q.items():  # several recordings (a zip): sums, and the last rate
                    quality[k] = (
                        quality.get(k, 0.0) + v
                        if k not in ("native_rate_hz", "coverage", "gyro_present", "saturated_share")
                        else v
                    )
            fmt = ",".join(sorted({r.format for r in recordings}))
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
        if len(starts) > 1 and not (np.diff(starts) >= 0).all():
            order = np.argsort(starts, kind="stable")
            starts, probs = starts[order], probs[order]
        timings = {k: clock.wall[k] for k in ("decode", "preprocess", "inference")}
        return starts, probs, per_window, timings, quality, fmt


_malloc_trim = None


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
        self._w: np.ndarray | None = None
        self._s: np.ndarray | None = None

    def add(self, ws) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if ws is None:
            if self._w is not None:
                yield self._w, self._s
                self._w = self._s = None
            return
        w, s = ws.windows, ws.start_ms
        if self._w is not None:  # top the waiting windows up to one batch
            need = self.batch - len(self._w)
            head_w, head_s = np.concatenate((self._w, w[:need])), np.concatenate((self._s, s[:need]))
            w, s = w[need:], s[need:]
            self._w = self._s = None
            if len(head_w) < self.batch:
                self._w, self._s = head_w, head_s
                return
            yield head_w, head_s
        full = len(w) - len(w) % self.batch
        if full:
            yield w[:full], s[:full]
        if full < len(w):
            self._w, self._s = w[full:].copy(), s[full:].copy()


class _StageClock:
    """Wall and CPU seconds (of this thread) per stage."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {"decode": 0.0, "preprocess": 0.0, "inference": 0.0}
        self.cpu: dict[str, float] = dict(self.wall)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        w, c = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - c

    def figures(self) -> dict[str, dict[str, float]]:
        return {"wall_s": dict(self.wall), "cpu_s": dict(self.cpu)}


def _window_sets(rec, sw: StreamWindower, clock: _StageClock) -> Iterator:
    """Decode a recording chunk by chunk and window it; yields non-empty WindowSets."""
    chunks = rec.chunks()
    try:
        while True:
            with clock.stage("decode"):
                chunk = next(chunks, None)
            with clock.stage("preprocess"):
                last = chunk is None
                ws = sw.finish() if last else sw.feed(chunk)
            del chunk
            if len(ws):
                yield ws
            if last:
                return
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()

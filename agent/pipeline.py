"""One export in, one outbox transaction out.

decode (streamed chunk by chunk) -> fuse/resample/window -> scale -> TFLite ->
per-window predictions, per-file and per-minute metrics -> outbox.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent import __version__
from agent.decode import open_export
from agent.errors import HarEdgeError, InputError, TooLarge, TooShort
from agent.model import LoadedModel
from agent.outbox import FileRecord, Outbox, now_ms
from agent.preprocess import StreamWindower
from agent.settings import AgentSettings
from agent.summary import minute_points, summary_points

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
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
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

    def process(
        self,
        paths: list[Path],
        model: LoadedModel,
        *,
        name: str | None = None,
        received_ms: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Outcome:
        """Process an export (one file or a table pair) and store the result.

        Input errors are stored as a ``failed`` record and returned (the caller
        quarantines); anything else (outbox trouble, a bug) propagates and the
        file stays where it is, to be retried.
        """
        name = name or paths[0].name
        t_start = time.perf_counter()
        received_ms = received_ms if received_ms is not None else now_ms()
        sha = export_sha256(paths)
        size = sum(p.stat().st_size for p in paths)
        base = dict(sha256=sha, name=name, size=size, received_ms=received_ms, agent_version=__version__)
        prior = self.outbox.processed_file(sha)
        if prior is not None:
            fid = self.outbox.record_file(
                FileRecord(**base, status="duplicate", processed_ms=now_ms(), error_message=f"same content as {prior.name}")
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
                    **base, status="failed", processed_ms=now_ms(), error_kind=exc.kind, error_message=str(exc),
                    model_name=m.name, model_version=m.version, model_sha256=m.sha256,
                )
            )
            log.warning("%s: %s", name, exc)
            return Outcome("failed", fid, name, error=exc)
        t_store = time.perf_counter()
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
        ) + minute_points(label_names=m.labels, start_ms=starts, probs=probs)
        rec = FileRecord(
            **base, status="processed", processed_ms=processed_ms, format=fmt,
            decode_s=timings["decode"], preprocess_s=timings["preprocess"], inference_s=timings["inference"],
            model_name=m.name, model_version=m.version, model_sha256=m.sha256,
        )
        fid = self.outbox.record_file(rec, label_names=m.labels, start_ms=starts, probs=probs, points=points)
        store_s = time.perf_counter() - t_store
        total = time.perf_counter() - t_start
        with self.outbox.transaction() as conn:
            from sqlalchemy import update

            from agent.outbox import files

            conn.execute(update(files).where(files.c.id == fid).values(store_s=store_s, total_s=total))
        log.info(
            "%s: %d windows with %s in %.2f s (decode %.2f, preprocess %.2f, inference %.2f, store %.2f)",
            name, len(probs), model.label, total, timings["decode"], timings["preprocess"], timings["inference"], store_s,
        )
        return Outcome("processed", fid, name, windows=len(probs), seconds=total)

    def _run(self, paths, model: LoadedModel, name, progress):
        m = model.manifest
        scratch = self.scratch / f"export-{time.monotonic_ns()}"
        scratch.mkdir(parents=True, exist_ok=True)
        t_decode = t_pre = t_inf = 0.0
        per_window: list[float] = []
        starts_parts: list[np.ndarray] = []
        probs_parts: list[np.ndarray] = []
        quality: dict[str, float] = {}
        try:
            t0 = time.perf_counter()
            recordings = open_export(
                paths, scratch, max_archive_bytes=int(self.settings.max_archive_mb * 1e6), name=name
            )
            t_decode += time.perf_counter() - t0
            for rec in recordings:
                sw = StreamWindower(
                    rate_hz=m.sample_rate_hz, window=m.window, step=m.step, max_gap_s=self.settings.max_gap_s,
                    has_gyro=rec.has_gyro, accel_unit=rec.accel_unit,
                )
                chunks = rec.chunks()
                while True:
                    t0 = time.perf_counter()
                    chunk = next(chunks, None)
                    t1 = time.perf_counter()
                    t_decode += t1 - t0
                    ws = sw.finish() if chunk is None else sw.feed(chunk)
                    t2 = time.perf_counter()
                    t_pre += t2 - t1
                    if len(ws):
                        probs_parts.append(model.predict(ws.windows, per_window))
                        starts_parts.append(ws.start_ms)
                        if progress is not None:
                            progress(len(ws))
                    t_inf += time.perf_counter() - t2
                    if chunk is None:
                        break
                q = sw.quality()
                for k, v in q.items():  # several recordings (a zip): sums, and the last rate
                    quality[k] = quality.get(k, 0.0) + v if k not in ("native_rate_hz", "coverage", "gyro_present", "saturated_share") else v
            fmt = ",".join(sorted({r.format for r in recordings}))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if not probs_parts:
            dur = quality.get("duration_s", 0.0)
            raise TooShort(
                f"{name}: {dur:.1f} s of usable IMU data holds no full window of "
                f"{m.window / m.sample_rate_hz:.0f} s (gaps over {self.settings.max_gap_s} s split it): "
                "record longer stretches"
            )
        starts = np.concatenate(starts_parts)
        probs = np.concatenate(probs_parts)
        order = np.argsort(starts, kind="stable")
        timings = {"decode": t_decode, "preprocess": t_pre, "inference": t_inf}
        return starts[order], probs[order], per_window, timings, quality, fmt

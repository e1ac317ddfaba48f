"""Section 3: sync: queued metric points delivered to a local MLflow server by ``har_edge.sync.push``.

The outbox is filled the way the agent fills it: files of 24 h of windows
(43,200 windows, ~10,100 points each: per-file summary and per-minute series).
One ``Pusher.push`` pass (the sync daemon's) delivers them: per file a run
found or created by tags, params, the points in ``log_batch`` requests of
``har_edge.sync.batch_size``, the per-window CSV artifact, FINISHED (the
per-file requests in a lane of their own beside the points, ``har_edge.sync.filepipe``). Against the same
server in the same run: one ``log_metric`` call per point (a few hundred,
extrapolated) and raw ``log_batch`` of 1000 points (the ceiling).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from unittest import mock

import numpy as np

from bench.common import SCRATCH, Report, fmt

if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from bench.mlflow_server import MlflowServer
    from har_edge.agent.outbox import Outbox

log = logging.getLogger(__name__)

POINTS = 100_000
SINGLE = 300
RAW_BATCHES = 20
TARGET_SHARE = 0.90
T0_MS = 1_742_802_739_000  # 2025-03-24 07:52:19 UTC, the fixtures' start


def fill_outbox(outbox: Outbox, points: int) -> tuple[int, int]:
    """Files of 24 h of windows until ``points`` metric points are queued; (files, points)."""
    from har_edge.agent.manifest import read_manifest
    from har_edge.agent.model import BUNDLED_MODEL_DIR
    from har_edge.agent.outbox import FileRecord, now_ms
    from har_edge.agent.summary import iter_minute_points, summary_points

    model = read_manifest(BUNDLED_MODEL_DIR)  # a model the device knows: its params go with each run
    rng = np.random.default_rng(0)
    n_windows = 43_200
    files = queued = 0
    while queued < points:
        probs = rng.dirichlet(np.ones(len(model.labels)) * 0.3, size=n_windows).astype(np.float32)
        starts = T0_MS + files * 86_400_000 + np.arange(n_windows, dtype=np.int64) * 2000
        processed = now_ms()
        pts = summary_points(
            label_names=list(model.labels), probs=probs, step_s=2.0, low_confidence=0.6, per_window_s=[0.0001] * 64,
            timings={"decode": 0.5, "preprocess": 0.4, "inference": 5.0}, quality={"coverage": 1.0},
            timestamp_ms=processed,
        ) + list(iter_minute_points(label_names=list(model.labels), start_ms=starts, probs=probs))  # fmt: skip
        rec = FileRecord(
            sha256=hashlib.sha256(f"bench-{files}".encode()).hexdigest(), name=f"bench-day-{files:02d}.fit",
            size=123_379_299, status="processed", received_ms=processed - 9000, processed_ms=processed,
            agent_version="bench", format="fit", model_name=model.name, model_version=model.version,
            model_sha256=model.sha256,
        )  # fmt: skip
        outbox.record_file(rec, label_names=list(model.labels), start_ms=starts, probs=probs, points=pts)
        files += 1
        queued += len(pts)
    return files, queued


def _cpu(server: MlflowServer) -> tuple[float, float]:
    """CPU seconds so far of this process (all its threads) and of the server's process tree."""
    from har_edge.central.stack import tree_cpu

    t = os.times()
    return t.user + t.system, tree_cpu(server.proc.pid if server.proc else None)


def raw_ceiling(
    client: MlflowClient, experiment_id: str, outbox: Outbox, batches: int, offset: int
) -> tuple[int, float]:
    """(points, seconds) of plain log_batch calls of 1000 queued points (their keys, timestamps, steps) to a new run."""
    from mlflow.entities import Metric

    with outbox.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT key, value, timestamp_ms, step FROM metrics WHERE file_id IS NOT NULL ORDER BY id LIMIT ? OFFSET ?",
            (batches * 1000, offset * 1000),
        ).all()
    chunks = [
        [Metric(k, float(v), int(ts), int(st)) for k, v, ts, st in rows[i : i + 1000]]
        for i in range(0, len(rows), 1000)
    ]
    run_id = client.create_run(experiment_id, tags={"bench": "log_batch"}).info.run_id
    t0 = time.perf_counter()
    for chunk in chunks:
        client.log_batch(run_id, metrics=chunk)
    return len(rows), time.perf_counter() - t0


def run(report: Report, server: MlflowServer, *, points: int = POINTS, quick: bool = False) -> None:
    from har_edge.agent.outbox import Outbox
    from har_edge.agent.settings import load_settings
    from har_edge.sync.push import Pusher

    S = "3 sync"
    root = SCRATCH / "sync"
    shutil.rmtree(root, ignore_errors=True)
    sync = {"tracking_uri": server.url, "request_timeout_s": 60, "experiment": "bench"}
    # the points' delivery is measured without the MLflow pages (their plots and tables are timed apart below)
    settings = load_settings(env={}, data_dir=root, device_id="bench-device", sync={**sync, "pages": False})
    outbox = Outbox(settings.outbox_path)
    files, queued = fill_outbox(outbox, points)
    pusher = Pusher(settings, outbox)
    pusher.experiment_id()  # the experiment exists before the clock starts
    client = pusher.client
    in_batches: dict[str, float] = {"s": 0.0, "calls": 0, "points": 0}
    original = client.log_batch

    def timed_log_batch(run_id: str, metrics: Sequence[Metric] = (), *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return original(run_id, metrics, *args, **kwargs)
        finally:
            if metrics:
                in_batches["s"] += time.perf_counter() - t
                in_batches["calls"] += 1
                in_batches["points"] += len(metrics)

    in_artifacts: dict[str, float] = {"s": 0.0, "calls": 0}
    original_artifact = client.log_artifact

    def timed_log_artifact(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return original_artifact(*args, **kwargs)
        finally:
            in_artifacts["s"] += time.perf_counter() - t
            in_artifacts["calls"] += 1

    n_raw = 6 if quick else RAW_BATCHES
    # the ceiling, half before the push and half after it (the server's store grows meanwhile)
    c0 = _cpu(server)
    n_before, s_before = raw_ceiling(client, pusher.experiment_id(), outbox, n_raw - n_raw // 2, offset=n_raw // 2)
    c1 = _cpu(server)
    # instrumentation only: the same calls, timed
    with (
        mock.patch.object(client, "log_batch", timed_log_batch),
        mock.patch.object(client, "log_artifact", timed_log_artifact),
    ):
        t0 = time.perf_counter()
        push = pusher.push(time.time())
        push_s = time.perf_counter() - t0
    c2 = _cpu(server)
    delivered = push.points + push.device_points
    if push.files_finished != files or push.points < queued:
        report.notes.append(f"sync: {push.summary()} (expected {files} files, {queued} points)")

    # the same files' pages (timeline, activity table, description, daily runs), as a pass with pages on draws them
    from har_edge.sync.push import PushReport

    paged = Pusher(load_settings(env={}, data_dir=root, device_id="bench-device", sync=sync), outbox)
    t0 = time.perf_counter()
    paged.pages.push(PushReport())
    pages_s = time.perf_counter() - t0
    child = paged.pages.last_render
    child_mb = f"{child.peak_rss_kb / 1024:.0f} MB" if child is not None and child.peak_rss_kb else "n/a"

    # baselines on the same server, now
    exp = pusher.experiment_id()
    run_id = client.create_run(exp, tags={"bench": "log_metric"}).info.run_id
    n_single = 50 if quick else SINGLE
    t0 = time.perf_counter()
    for i in range(n_single):
        client.log_metric(run_id, "single", float(i), timestamp=T0_MS + i, step=i)
    single_s = time.perf_counter() - t0
    n_after, s_after = raw_ceiling(client, pusher.experiment_id(), outbox, n_raw // 2, offset=0)
    outbox.close()
    n_raw_points = n_before + n_after
    raw_rate = n_raw_points / (s_before + s_after)

    push_rate = delivered / push_s
    # CPU per 1000 points, this process (client) and the server's tree, in the first raw half and in the push
    raw_cpu = [(b - a) / n_before * 1000 for a, b in zip(c0, c1, strict=True)]
    push_cpu = [(b - a) / delivered * 1000 for a, b in zip(c1, c2, strict=True)]
    busy = (sum(c2) - sum(c1)) / push_s  # cores kept busy by client + server during the push
    single_rate = n_single / single_s
    share = push_rate / raw_rate
    report.add(S, f"sync.push of {fmt(queued)} queued points ({files} file{'s' if files > 1 else ''} of 24 h)",
               f"{fmt(push_rate)} points/s",
               baseline=f"raw log_batch {fmt(raw_rate)} points/s", ratio=f"{share * 100:.0f}% of raw",
               target=f">= {TARGET_SHARE * 100:.0f}%", ok=share >= TARGET_SHARE,
               note=f"{push_s:.1f} s for runs, params, points, {push.artifacts} per-window CSVs "
                    f"({fmt(files * 43_200)} rows) and FINISHED: {in_batches['s']:.1f} s in {in_batches['calls']} "
                    f"metric log_batch calls ({fmt(in_batches['points'] / max(in_batches['s'], 1e-9))} points/s while "
                    f"in them; the points lane idle {max(push_s - in_batches['s'], 0.0):.1f} s), "
                    f"{in_artifacts['s']:.1f} s uploading CSVs beside them (har_edge.sync.filepipe: runs, CSVs and "
                    "FINISHED overlap the points). CPU s per 1000 points, client / server: raw "
                    f"{raw_cpu[0]:.3f} / {raw_cpu[1]:.3f}, push {push_cpu[0]:.3f} / {push_cpu[1]:.3f}; "
                    f"client + server kept {busy:.2f} of {os.cpu_count()} cores busy during the push")  # fmt: skip
    report.add(S, f"MLflow pages of those {files} files (sync.pages, a plot child process)", f"{pages_s:.1f} s",
               note=f"timelines, activity tables, descriptions and the daily runs, after the push above; the plot "
                    f"child's peak RSS {child_mb}, apart from sync's")  # fmt: skip
    report.add(S, "one log_metric call per point", f"{fmt(single_rate)} points/s",
               ratio=f"push {push_rate / single_rate:.0f}x",
               note=f"{n_single} calls; {fmt(queued / single_rate / 60)} min "
                    f"for the same {fmt(queued)} points")  # fmt: skip
    report.add(S, "raw log_batch of 1000 (ceiling)", f"{fmt(raw_rate)} points/s",
               note=f"{fmt(n_raw_points)} of the same points (keys, timestamps, steps), half before the push and half "
                    "after, in runs of their own, no sync logic")  # fmt: skip
    report.raw["sync"] = {
        "files": files, "queued": queued, "delivered": delivered, "push_s": push_s, "report": push.summary(),
        "metric_batches": in_batches, "pages_s": pages_s, "artifacts": in_artifacts,
        "single": {"n": n_single, "s": single_s},
        "raw": {"before": [n_before, s_before], "after": [n_after, s_after]},
        "cpu_per_1000": {"raw": raw_cpu, "push": push_cpu}, "cores_busy_push": busy,
        "server_start_s": server.started_s,
    }  # fmt: skip

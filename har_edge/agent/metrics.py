"""The agent's Prometheus metrics, read from the outbox at scrape time.

Nothing is counted in memory: every figure is a cheap query on the outbox
(the ``files`` table has one row per export; pending points are counted
through the ``metrics_pending`` index), so a restart of the agent does not
reset a total, and figures written by the sync daemon (table
``sync_passes``, :mod:`har_edge.agent.syncpasses`) come out of the same
scrape. ``docs/observe.md`` lists every metric.

Counters are guarded within a process: when rows are deleted (a retention
pass dropping old file rows) the exported value does not go down; it keeps
counting from where it was. Across a restart such a drop shows as a counter
reset, which ``rate()`` handles.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from har_edge.agent.manifest import Manifest
from har_edge.agent.syncpasses import read_passes
from har_edge.common.states import FileStatus

log = logging.getLogger(__name__)

#: upper bounds (seconds) of the inference-time histogram: one export's inference, 4 ms to 2 min
INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Monotonic:
    """Keeps exported counters from going down when the rows they count are deleted."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, ...], float] = {}
        self._offset: dict[tuple[str, ...], float] = {}

    def __call__(self, key: tuple[str, ...], raw: float) -> float:
        last = self._last.get(key)
        if last is not None and raw < last:
            self._offset[key] = self._offset.get(key, 0.0) + last - raw
        self._last[key] = raw
        return raw + self._offset.get(key, 0.0)


def _has_column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    return any(row[1] == column for row in conn.execute(f"PRAGMA table_info({table})"))


class OutboxCollector(Collector):
    """A custom collector: one short read transaction on the outbox per scrape."""

    def __init__(
        self,
        outbox_path: Path,
        *,
        model: Callable[[], Manifest | None],
        paused: Callable[[], bool] | None = None,
        budget_bytes: float | None = None,
        data_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.outbox_path = Path(outbox_path)
        self.model = model
        self.paused = paused
        self.budget_bytes = budget_bytes
        self.data_dir = data_dir
        self.clock = clock
        self._mono = _Monotonic()
        #: seconds the last collect took (logged at DEBUG; the bench prints it)
        self.last_collect_s = 0.0

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{self.outbox_path}?mode=ro", uri=True, timeout=5.0)
        conn.execute("PRAGMA query_only = ON")
        return conn

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families depend on the outbox: not described up front (no collect at registration)

    def collect(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        out = list(self._model_families())
        if self.outbox_path.exists():
            try:
                conn = self._connect()
                try:
                    out += self._outbox_families(conn)
                finally:
                    conn.close()
            except sqlite3.Error as exc:
                log.warning("metrics: outbox %s could not be read: %s", self.outbox_path, exc)
        ok = GaugeMetricFamily(
            "har_edge_outbox_readable", "1 when the last scrape could read the outbox, 0 when it could not"
        )
        ok.add_metric([], 1.0 if any(m.name == "har_edge_files" for m in out) else 0.0)
        out.append(ok)
        out += self._device_families()
        self.last_collect_s = time.perf_counter() - t0
        log.debug("metrics collected in %.4f s", self.last_collect_s)
        return iter(out)

    # -- families ---------------------------------------------------------------

    def _model_families(self) -> Iterator[Metric]:
        m = self.model()
        info = GaugeMetricFamily(
            "har_edge_model_info", "the model the agent runs (always 1)", labels=["name", "version", "sha256"]
        )
        if m is not None:
            info.add_metric([m.name, m.version, m.sha256], 1.0)
        yield info

    def _device_families(self) -> Iterator[Metric]:
        if self.paused is not None:
            g = GaugeMetricFamily(
                "har_edge_ingestion_paused", "1 while the outbox is over its budget and files wait in the inbox"
            )
            g.add_metric([], 1.0 if self.paused() else 0.0)
            yield g
        if self.budget_bytes is not None:
            g = GaugeMetricFamily("har_edge_outbox_budget_bytes", "agent.outbox_max_mb in bytes")
            g.add_metric([], float(self.budget_bytes))
            yield g
        if self.data_dir is not None:
            try:
                free = shutil.disk_usage(self.data_dir).free
            except OSError:
                return
            g = GaugeMetricFamily("har_edge_data_dir_free_bytes", "free space of the file system of the data dir")
            g.add_metric([], float(free))
            yield g

    def _outbox_families(self, conn: sqlite3.Connection) -> list[Metric]:
        now = self.clock()
        out: list[Metric] = []
        mono = self._mono

        files = CounterMetricFamily(
            "har_edge_files", "exports handled, by outcome (processed, failed, duplicate)", labels=["status"]
        )
        counts = dict(conn.execute("SELECT status, count(*) FROM files GROUP BY status").fetchall())
        for status in sorted(set(counts) | {s.value for s in FileStatus}):
            files.add_metric([status], mono(("files", status), float(counts.get(status, 0))))
        out.append(files)

        (n_windows,) = conn.execute("SELECT coalesce(sum(windows), 0) FROM files WHERE status = 'processed'").fetchone()
        windows = CounterMetricFamily("har_edge_windows", "4 s windows classified")
        windows.add_metric([], mono(("windows",), float(n_windows)))
        out.append(windows)

        sums = ", ".join(f"sum(inference_s <= {b!r})" for b in INFERENCE_BUCKETS)
        row = conn.execute(
            f"SELECT count(*), coalesce(sum(inference_s), 0), {sums} FROM files "
            "WHERE status = 'processed' AND inference_s IS NOT NULL"
        ).fetchone()
        total, seconds, per_bucket = row[0], row[1], row[2:]
        buckets = [
            (repr(b), mono(("inference", repr(b)), float(c or 0)))
            for b, c in zip(INFERENCE_BUCKETS, per_bucket, strict=True)
        ]
        buckets.append(("+Inf", mono(("inference", "+Inf"), float(total))))
        hist = HistogramMetricFamily("har_edge_inference_seconds", "TFLite inference time of one export")
        hist.add_metric([], buckets, sum_value=mono(("inference", "sum"), float(seconds)))
        out.append(hist)

        (pending_points,) = conn.execute("SELECT count(*) FROM metrics WHERE delivered_ms IS NULL").fetchone()
        g = GaugeMetricFamily("har_edge_outbox_pending_points", "metric points not yet delivered to MLflow")
        g.add_metric([], float(pending_points))
        out.append(g)

        n_files, oldest_file = conn.execute(
            "SELECT count(*), min(processed_ms) FROM files WHERE finished_ms IS NULL AND status = 'processed'"
        ).fetchone()
        g = GaugeMetricFamily("har_edge_outbox_pending_files", "processed exports whose MLflow run is not finished")
        g.add_metric([], float(n_files))
        out.append(g)
        (oldest_device,) = conn.execute(
            "SELECT min(timestamp_ms) FROM metrics WHERE delivered_ms IS NULL AND file_id IS NULL"
        ).fetchone()
        (oldest_dep,) = conn.execute("SELECT min(time_ms) FROM deployments WHERE delivered_ms IS NULL").fetchone()
        oldest = [t for t in (oldest_file, oldest_device, oldest_dep) if t is not None]
        g = GaugeMetricFamily(
            "har_edge_outbox_oldest_pending_seconds", "age of the oldest item waiting for delivery (0: none waiting)"
        )
        g.add_metric([], max(0.0, now - min(oldest) / 1000) if oldest else 0.0)
        out.append(g)

        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        used = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        wal = Path(str(self.outbox_path) + "-wal")
        g = GaugeMetricFamily(
            "har_edge_outbox_bytes", "bytes the outbox holds (used pages plus the WAL; what agent.outbox_max_mb limits)"
        )
        g.add_metric([], float(used * page_size + (wal.stat().st_size if wal.exists() else 0)))
        out.append(g)

        verdicts = CounterMetricFamily(
            "har_edge_monitor_verdicts", "exports judged by the monitor, by verdict", labels=["status"]
        )
        if _has_column(conn, "files", "monitor_status"):
            for status, n in conn.execute(
                "SELECT monitor_status, count(*) FROM files WHERE monitor_status IS NOT NULL GROUP BY monitor_status"
            ):
                verdicts.add_metric([str(status)], mono(("verdicts", str(status)), float(n)))
        out.append(verdicts)

        out += self._sync_families(conn)
        return out

    def _sync_families(self, conn: sqlite3.Connection) -> list[Metric]:
        passes, failures = read_passes(conn)
        last = GaugeMetricFamily(
            "har_edge_sync_last_success_timestamp_seconds",
            "when a sync pass last succeeded (written by the sync daemon into the outbox)",
            labels=["task"],
        )
        for p in passes:
            if p.last_success_ms is not None:
                last.add_metric([p.task], p.last_success_ms / 1000)
        fails = CounterMetricFamily(
            "har_edge_sync_failures", "failed sync passes by task and error kind", labels=["task", "kind"]
        )
        for task, kind, n in failures:
            fails.add_metric([task, kind], float(n))
        return [last, fails]

"""Outbox -> MLflow, exactly once in effect.

One pass (:meth:`Pusher.push`) delivers, oldest first:

1. device-level points (``metrics.file_id IS NULL``: the heartbeat) to the
   device run, with the active model version as a tag;
2. deployment rows, each as a small finished run nested under the device run
   (tags ``har.deployment.from|to|outcome|reason``; start and end time = when
   it happened), so a fleet's rollouts can be searched in MLflow;
3. each processed file: its run (found by tags before it is created, its id
   stored in ``files.run_id`` at once), params (model name/version, window,
   step, rate; sent apart from metrics: a changed param is a 400 that would
   sink a whole batch), metric points in ``log_batch`` chunks of at most
   ``har_edge.sync.batch_size`` (each point with the timestamp and step the agent
   stored, so a re-send after a crash is stored once by MLflow), the
   per-window CSV artifact, and finally status FINISHED.

   The files go through :mod:`har_edge.sync.filepipe`: the points in one lane of
   requests, each file's run, CSV and FINISHED in another, overlapping them, with
   the same marks in the same order.

Each row is marked delivered only after the server acknowledged it. A server
that cannot be reached ends the pass (:class:`ServerUnreachable`, nothing
lost); one that refuses the credentials ends it too (:class:`ServerAccessDenied`);
a 4xx for one item is recorded in ``sync_refusals`` and the pass moves on.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

from har_edge.agent import __version__
from har_edge.agent.acknowledged import custody_backlog
from har_edge.agent.outbox import MetricPoint, Outbox, now_ms
from har_edge.agent.settings import Settings
from har_edge.sync import runs
from har_edge.sync.delivery import Delivery, PendingPoint
from har_edge.sync.errors import ServerAccessDenied, ServerRejected, SyncError
from har_edge.sync.filepipe import FilePipeline
from har_edge.sync.filepipe import RunGone as _RunGone
from har_edge.sync.locks import file_lock
from har_edge.sync.mlflow_client import Target, ensure_experiment, make_client, resolve_target
from har_edge.sync.pagepush import Pages
from har_edge.sync.participant_tags import file_run_tags
from har_edge.sync.retry import translate
from har_edge.sync.state import KnownModel, active_manifest, known_models

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")

LOCK_NAME = ".sync-push.lock"
LOCK_WAIT_S = 120.0
HEARTBEAT_KEYS = (
    "backlog_files",
    "backlog_points",
    "backlog_deployments",
    "oldest_undelivered_age_s",
    "disk_free_mb",
)  # the active model is the device run's tag har.active_model_version ("name version"), never a number
MAX_TAG_VALUE = 5000


@dataclass
class PushReport:
    runs_created: int = 0
    files_finished: int = 0
    points: int = 0
    device_points: int = 0
    artifacts: int = 0
    deployments: int = 0
    pages: int = 0  # file runs whose table and timeline were delivered (har_edge.sync.pagepush)
    refused: list[str] = field(default_factory=list)
    backlog: dict[str, int | None] = field(default_factory=dict)
    stopped: bool = False

    @property
    def delivered_anything(self) -> bool:
        return bool(
            self.points or self.device_points or self.artifacts or self.deployments or self.files_finished or self.pages
        )

    def summary(self) -> str:
        parts = [
            f"{self.files_finished} file run(s) finished ({self.runs_created} created)",
            f"{self.points} metric points",
            f"{self.artifacts} prediction CSV(s)",
            f"{self.device_points} device points",
            f"{self.deployments} deployment(s)",
            f"{self.pages} file page(s)",
        ]
        if self.refused:
            parts.append(f"{len(self.refused)} refused by the server")
        return ", ".join(parts)


class _FileRow(Protocol):
    """The columns of a pending ``files`` row (:meth:`Delivery.pending_files`) that a push reads."""

    @property
    def id(self) -> int: ...
    @property
    def sha256(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def format(self) -> str | None: ...
    @property
    def received_ms(self) -> int: ...
    @property
    def processed_ms(self) -> int: ...
    @property
    def windows(self) -> int: ...
    @property
    def model_name(self) -> str | None: ...
    @property
    def model_version(self) -> str | None: ...
    @property
    def model_sha256(self) -> str | None: ...
    @property
    def agent_version(self) -> str: ...
    @property
    def run_id(self) -> str | None: ...
    @property
    def artifact_delivered_ms(self) -> int | None: ...
    @property
    def monitor_status(self) -> str | None: ...
    @property
    def monitor_json(self) -> str | None: ...


class Pusher:
    """Delivers one device's outbox to MLflow. Not thread-safe: one pass at a time (a lock file enforces it)."""

    def __init__(self, settings: Settings, outbox: Outbox | None = None, *, target: Target | None = None) -> None:
        self.settings = settings
        self.sync = settings.sync
        self.outbox = outbox or Outbox(settings.outbox_path)
        self.delivery = Delivery(self.outbox)
        self.target = target or resolve_target(settings)
        self.device = settings.device
        try:
            runs.identity_filter({runs.DEVICE: self.device})
        except ValueError:
            raise SyncError(
                f"device id {self.device!r} holds a quote or backslash: set device_id (HAR_EDGE_DEVICE_ID) "
                "to letters, digits, '-', '_' or '.'"
            ) from None
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._device_run: str | None = None
        self._last_heartbeat_ms: int | None = None
        self._known: dict[str, KnownModel] | None = None
        self.pages = Pages(self)  # timelines, tables, descriptions and daily runs

    # -- plumbing ---------------------------------------------------------------

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = make_client(self.settings, self.target)
        return self._client

    def _call(self, what: str, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Call MLflow, turning its exceptions into unreachable / access denied / rejected."""
        try:
            return fn(*args, **kwargs)
        except SyncError:
            raise
        except Exception as exc:
            err = translate(exc, what, self.target.display)
            if err is None:
                raise
            raise err from exc

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = ensure_experiment(self.client, self.target, self.sync.experiment)
        return self._experiment_id

    def _run(
        self,
        what: str,
        identity: dict[str, str],
        *,
        tags: Mapping[str, str],
        run_name: str,
        start_time: int | None = None,
    ) -> tuple[str, bool]:
        try:
            return self._call(
                what,
                runs.find_or_create_run,
                self.client,
                self.experiment_id(),
                identity,
                tags=tags,
                run_name=run_name,
                start_time=start_time,
            )
        except ServerRejected as exc:
            # not about one item: the experiment or the account is wrong, and every file would fail alike
            raise ServerAccessDenied(f"{exc}: check sync.experiment and the account's permissions") from exc

    # -- the pass -----------------------------------------------------------------

    def push(self, now: float, stop: threading.Event | None = None, max_files: int | None = None) -> PushReport:
        """Deliver what is pending (at most ``max_files`` files); stop between requests when ``stop`` is set."""
        report = PushReport()
        with file_lock(Path(self.settings.data_dir) / LOCK_NAME, LOCK_WAIT_S):
            self.maybe_heartbeat(now)
            backlog = self.delivery.backlog()
            if backlog["points"] or backlog["files"] or backlog["deployments"]:
                self._push_device(report, stop)
                self._push_deployments(report, stop)
                self._push_retrain_requests(report, stop)
                if not self._stopped(stop, report):  # the files, pipelined: har_edge.sync.filepipe
                    FilePipeline(self, report, stop).push(self.delivery.pending_files(limit=max_files))
            self.pages.push(report, stop)
            self._reclaim(now)
            report.backlog = self.delivery.backlog()
        if report.delivered_anything:
            log.info("pushed to %s: %s", self.target.display, report.summary())
        return report

    def _stopped(self, stop: threading.Event | None, report: PushReport) -> bool:
        if stop is not None and stop.is_set():
            report.stopped = True
            return True
        return False

    # -- heartbeat and device run ---------------------------------------------------

    def maybe_heartbeat(self, now: float, force: bool = False) -> bool:
        """Store heartbeat points (device-level, timestamp ``now``) when the last ones are old enough."""
        now_ms_ = int(now * 1000)
        if self._last_heartbeat_ms is None:
            self._last_heartbeat_ms = self.delivery.last_device_point_ms(HEARTBEAT_KEYS[0])
        last = self._last_heartbeat_ms
        if not force and last is not None and 0 <= now_ms_ - last < self.sync.heartbeat_interval_s * 1000:
            return False
        b = self.delivery.backlog()
        values: dict[str, float] = {
            "backlog_files": b["files"] or 0,
            "backlog_points": b["points"] or 0,
            "backlog_deployments": b["deployments"] or 0,
            "oldest_undelivered_age_s": max(0.0, (now_ms_ - b["oldest_ms"]) / 1000) if b["oldest_ms"] else 0.0,
            "disk_free_mb": shutil.disk_usage(self.settings.data_dir).free / 1e6,
        }
        if self.settings.sync.raw_store:  # raw custody: archived files not yet verified in the store
            cb = custody_backlog(self.outbox, self.settings.archive_dir, self.settings.sync.raw_store)
            values |= {"custody_backlog_files": cb.files, "custody_backlog_mb": cb.bytes / 1e6}
        self.outbox.add_metrics([MetricPoint(k, float(v), now_ms_, 0) for k, v in values.items()], file_id=None)
        self._last_heartbeat_ms = now_ms_
        return True

    def device_run(self) -> str:
        if self._device_run is None:
            self._device_run, created = self._run(
                f"finding the run of device {self.device}",
                {runs.KIND: "device", runs.DEVICE: self.device},
                tags={runs.AGENT_VERSION: __version__},
                run_name=f"device {self.device}",
            )
            if created:
                log.info("created the device run %s for %s", self._device_run, self.device)
        return self._device_run

    def _push_device(self, report: PushReport, stop: threading.Event | None) -> None:
        first = True
        while not self._stopped(stop, report):
            pts = self.delivery.pending_points(None, self.sync.batch_size)
            if not pts:
                return
            run_id = self.device_run()
            if first:
                m = active_manifest(self.settings.models_dir, self.settings.agent.model_dir)
                if m is not None:
                    self._send_tags(
                        run_id,
                        {runs.ACTIVE_MODEL: f"{m.name} {m.version}", runs.AGENT_VERSION: __version__},
                        "device tags",
                        None,
                    )
                first = False
            try:
                ok, bad = self._send_points(run_id, pts, f"device points of {self.device}")
            except _RunGone:
                self._device_run = None  # someone deleted it: the next pass makes a new one
                raise SyncError(
                    f"the device run of {self.device} was deleted on the server; a new one is made next pass"
                ) from None
            self._mark(ok, bad, None, report, device=True)

    # -- deployments ------------------------------------------------------------------

    def _push_deployments(self, report: PushReport, stop: threading.Event | None) -> None:
        for d in self.delivery.pending_deployments():
            if self._stopped(stop, report):
                return
            parent = self.device_run()
            key = f"{self.device}/{d.id}/{d.time_ms}"
            tags = {
                runs.DEVICE: self.device,
                runs.PARENT: parent,
                "har.deployment.from": d.from_version or "",
                "har.deployment.to": d.to_version or "",
                "har.deployment.outcome": d.outcome,
                "har.deployment.reason": (d.reason or "")[:MAX_TAG_VALUE],
            }
            run_id, _ = self._run(
                f"finding the run of deployment {key}",
                {runs.KIND: "deployment", runs.DEPLOYMENT_KEY: key},
                tags=tags,
                run_name=f"{d.outcome} {d.to_version or ''}".strip(),
                start_time=d.time_ms,
            )
            try:
                self._call(
                    f"finishing the run of deployment {key}",
                    self.client.set_terminated,
                    run_id,
                    "FINISHED",
                    end_time=d.time_ms,
                )
            except ServerRejected as exc:
                self._refuse("deployment", None, f"deployment {key}", exc, report)
            self.delivery.mark_deployment(d.id)
            report.deployments += 1

    # -- retraining requests ------------------------------------------------------------------

    def _push_retrain_requests(self, report: PushReport, stop: threading.Event | None) -> None:
        """Each request: a tag on the device run and an artifact listing its files (and their windows, if shared)."""
        import json

        for req in self.outbox.pending_retrain_requests():
            if self._stopped(stop, report):
                return
            run_id = self.device_run()
            listed = json.loads(req.files_json)
            tmp_root = Path(self.settings.data_dir) / ".sync-tmp"
            tmp_root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
                doc = Path(tmp) / f"retrain_request_{req.id}.json"
                doc.write_text(
                    json.dumps({"request": req.id, "time_ms": req.time_ms, "files": listed}, indent=2), encoding="utf-8"
                )
                paths = [doc]
                if self.sync.share_flagged_windows:
                    npz = self._flagged_npz(listed, Path(tmp) / f"flagged_windows_{req.id}.npz")
                    if npz is not None:
                        paths.append(npz)
                try:
                    for path in paths:
                        self._call(
                            f"uploading retraining request {req.id}",
                            self.client.log_artifact,
                            run_id,
                            str(path),
                            "retrain_requests",
                        )
                        report.artifacts += 1
                except ServerRejected as exc:
                    self._refuse("retrain_request", None, f"retraining request {req.id}", exc, report)
            self._send_tags(
                run_id,
                {runs.RETRAIN_REQUESTED: f"request {req.id}: {len(listed)} alerting files at {req.time_ms}"},
                "the retraining tag",
                None,
            )
            self.outbox.mark_retrain_request(req.id)

    def _flagged_npz(self, listed: list[dict[str, Any]], path: Path) -> Path | None:
        """One .npz of the kept (scaled) windows of the listed files: ``<sha256[:16]>.windows`` / ``.idx``."""
        import io

        import numpy as np

        # values typed Any: numpy's stub matches ``**arrays`` against ``allow_pickle: bool`` too, and passing
        # allow_pickle explicitly would store an array of that name on numpy < 2 (edge-legacy)
        arrays: dict[str, Any] = {}
        for f in listed:
            blob = self.outbox.flagged_npz(int(f["file_id"]))
            if blob is None:
                continue
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                key = f["sha256"][:16]
                arrays[f"{key}.windows"] = z["windows"]
                arrays[f"{key}.idx"] = z["idx"]
        if not arrays:
            return None
        np.savez_compressed(path, **arrays)
        return path

    # -- files ----------------------------------------------------------------------------

    def _file_identity(self, f: _FileRow) -> dict[str, str]:
        return {runs.KIND: "file", runs.DEVICE: self.device, runs.FILE_SHA: f.sha256}

    def _file_tags(self, f: _FileRow) -> dict[str, str]:
        tags = {
            runs.FILE_NAME: f.name[:MAX_TAG_VALUE],
            runs.FILE_FORMAT: f.format or "",
            runs.MODEL_NAME: f.model_name or "",
            runs.MODEL_VERSION: f.model_version or "",
            runs.MODEL_SHA: f.model_sha256 or "",
            runs.AGENT_VERSION: f.agent_version,
            runs.MONITOR: f.monitor_status or "",
            runs.DESCRIPTION: self.pages.description(f),
            **self.pages.tags(f),
            **file_run_tags(f, share_serial=self.settings.participants.share_serial),
        }
        return {k: v for k, v in tags.items() if v}

    def known_model(self, f: Any) -> KnownModel | None:
        """The installed model a file was processed with (the models folder is read once per Pusher)."""
        if self._known is None:
            self._known = known_models(self.settings.models_dir)
        return self._known.get(f.model_sha256 or "")

    def _file_params(self, f: _FileRow) -> dict[str, str]:
        params = {"model_name": f.model_name, "model_version": f.model_version}
        known = self.known_model(f)
        if known is not None:
            params.update(window=str(known.window), step=str(known.step), sample_rate_hz=f"{known.sample_rate_hz:g}")
        else:
            log.warning(
                "%s: the manifest of model %s %s (sha256 %s) is not known here any more: "
                "window/step params are left out of its run",
                f.name,
                f.model_name,
                f.model_version,
                (f.model_sha256 or "?")[:12],
            )
        return {k: v for k, v in params.items() if v}

    # -- points --------------------------------------------------------------------------

    def _send_points(
        self, run_id: str, pts: list[PendingPoint], what: str, top: bool = True
    ) -> tuple[list[PendingPoint], list[tuple[PendingPoint, str]]]:
        """(acknowledged, [(point, error)]) for a chunk; a rejected chunk is split to find the bad points."""
        from mlflow.entities import Metric

        batch = [Metric(p.key, p.value, p.timestamp_ms, p.step) for p in pts]
        try:
            self._call(f"logging {len(pts)} {what}", self.client.log_batch, run_id, metrics=batch)
            return pts, []
        except ServerRejected as exc:
            if top and self._run_gone(run_id):
                raise _RunGone(str(exc)) from exc
            if len(pts) == 1:
                return [], [(pts[0], str(exc))]
            mid = len(pts) // 2
            ok1, bad1 = self._send_points(run_id, pts[:mid], what, top=False)
            ok2, bad2 = self._send_points(run_id, pts[mid:], what, top=False)
            return ok1 + ok2, bad1 + bad2

    def _run_gone(self, run_id: str) -> bool:
        try:
            run = self._call(f"checking run {run_id}", self.client.get_run, run_id)
        except ServerRejected:
            return True
        return run.info.lifecycle_stage == "deleted"

    def _mark(
        self,
        ok: list[PendingPoint],
        bad: list[tuple[PendingPoint, str]],
        file_id: int | None,
        report: PushReport,
        device: bool = False,
    ) -> None:
        self.delivery.mark_points([p.id for p in ok])
        if device:
            report.device_points += len(ok)
        else:
            report.points += len(ok)
        for p, err in bad:
            obj = f"point {p.key}={p.value!r} step {p.step} at {p.timestamp_ms}"
            log.warning("MLflow refused %s (%s): not retried, listed in sync_refusals", obj, err)
            self.delivery.record_refusal("metrics", file_id, obj, err)
            report.refused.append(obj)
        self.delivery.mark_points([p.id for p, _ in bad])

    def _send_tags(self, run_id: str, tags: dict[str, str], what: str, file_id: int | None) -> None:
        from mlflow.entities import RunTag

        try:
            self._call(f"setting {what}", self.client.log_batch, run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        except ServerRejected as exc:
            log.warning("%s: not retried", exc)

    def _refuse(self, kind: str, file_id: int | None, obj: str, exc: Exception, report: PushReport) -> None:
        log.warning("%s: %s is given up and listed in sync_refusals; the other results go on", exc, obj)
        self.delivery.record_refusal(kind, file_id, obj, str(exc))
        report.refused.append(obj)

    # -- space -------------------------------------------------------------------------------

    def _reclaim(self, now: float) -> None:
        days = self.sync.reclaim_after_days
        if days <= 0:
            return
        n_windows, n_points = self.delivery.reclaim(int(now * 1000 - days * 86_400_000))
        if n_windows or n_points:
            log.info(
                "reclaimed %d window rows and %d device points delivered over %g days ago", n_windows, n_points, days
            )


def pending_summary(delivery: Delivery) -> str:
    b = delivery.backlog()
    age = "" if b["oldest_ms"] is None else f", oldest from {max(0, now_ms() - b['oldest_ms']) / 1000:.0f} s ago"
    return f"{b['files']} files, {b['points']} metric points, {b['deployments']} deployments pending{age}"

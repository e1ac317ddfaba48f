"""``har-edge fleet status``: every device known to the central MLflow, from what sync itself stores there.

Read with an account that may see every device's experiment (the admin of
the central server, through ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` or
``sync.username``/``password``). Per device, from its device run
(``har.kind=device``, :mod:`har_edge.sync.runs`):

- the newest heartbeat: the timestamp of its newest ``backlog_files`` point
  (the device's clock when it made the heartbeat, not when it was delivered:
  a device that was offline and catches up still shows how long it was gone);
- its backlog as of that heartbeat (files, points, deployments, age of the
  oldest undelivered item) and its free disk;
- its active model (tag ``har.active_model_version``) and agent version;
- the monitor verdicts (tag ``har.monitor``) of its ``fleet.recent_files``
  newest file runs, and whether it asked for retraining.

A device is *silent* when its newest heartbeat is older than
``fleet.silent_after_s`` (or it never sent one); the command then exits 1,
so cron or a CI job can alert on boxes that Prometheus cannot reach.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from har_edge.agent.settings import Settings
from har_edge.common.cli import Exit, add_command
from har_edge.sync import runs
from har_edge.sync.errors import ServerAccessDenied, ServerUnreachable
from har_edge.sync.mlflow_client import make_client, resolve_target
from har_edge.sync.retry import translate

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

HEARTBEAT_KEY = "backlog_files"
BACKLOG_KEYS = ("backlog_files", "backlog_points", "backlog_deployments", "oldest_undelivered_age_s", "disk_free_mb")


@dataclass
class DeviceStatus:
    device: str
    experiment: str
    run_id: str
    last_heartbeat_ms: int | None
    heartbeat_age_s: float | None
    silent: bool
    model: str | None
    agent_version: str | None
    backlog: dict[str, float] = field(default_factory=dict)
    monitor: dict[str, int] = field(default_factory=dict)
    last_file_ms: int | None = None
    retrain_requested: str | None = None


@dataclass
class FleetStatus:
    server: str
    now_ms: int
    silent_after_s: float
    devices: list[DeviceStatus]

    @property
    def silent(self) -> list[DeviceStatus]:
        return [d for d in self.devices if d.silent]

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "now_ms": self.now_ms,
            "silent_after_s": self.silent_after_s,
            "devices": [asdict(d) for d in self.devices],
            "silent": [d.device for d in self.silent],
        }


def _latest_points(run: Run) -> dict[str, tuple[float, int]]:
    """key -> (value, timestamp ms) of the run's latest points (the run proto carries the timestamps)."""
    out: dict[str, tuple[float, int]] = {}
    for m in run.data.to_proto().metrics:
        prev = out.get(m.key)
        if prev is None or m.timestamp >= prev[1]:
            out[m.key] = (float(m.value), int(m.timestamp))
    return out


def _experiments(client: MlflowClient) -> dict[str, str]:
    """id -> name of every active experiment the account can see."""
    out: dict[str, str] = {}
    token: str | None = None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        out.update({e.experiment_id: e.name for e in page})
        token = page.token
        if not token:
            return out


def collect(
    client: MlflowClient, *, now_ms: int, silent_after_s: float, recent_files: int, server: str = ""
) -> FleetStatus:
    """The status of every device whose device run the client can see."""
    exps = _experiments(client)
    device_runs = runs.search_all(client, list(exps), f"tags.`{runs.KIND}` = 'device'")
    best: dict[str, tuple[Run, dict[str, tuple[float, int]]]] = {}
    for run in device_runs:
        device = run.data.tags.get(runs.DEVICE)
        if not device:
            continue
        points = _latest_points(run)
        hb = points.get(HEARTBEAT_KEY, (0.0, -1))[1]
        if device not in best or hb > best[device][1].get(HEARTBEAT_KEY, (0.0, -1))[1]:
            best[device] = (run, points)
    devices = []
    for device in sorted(best):
        run, points = best[device]
        hb_ms = points[HEARTBEAT_KEY][1] if HEARTBEAT_KEY in points else None
        age = (now_ms - hb_ms) / 1000 if hb_ms is not None else None
        exp_id = run.info.experiment_id
        files = client.search_runs(
            [exp_id],
            runs.identity_filter({runs.KIND: "file", runs.DEVICE: device}),
            max_results=recent_files,
            order_by=["attributes.start_time DESC"],
        )
        verdicts = Counter(r.data.tags.get(runs.MONITOR, "none") for r in files)
        devices.append(
            DeviceStatus(
                device=device,
                experiment=exps.get(exp_id, exp_id),
                run_id=run.info.run_id,
                last_heartbeat_ms=hb_ms,
                heartbeat_age_s=round(age, 1) if age is not None else None,
                silent=age is None or age > silent_after_s,
                model=run.data.tags.get(runs.ACTIVE_MODEL),
                agent_version=run.data.tags.get(runs.AGENT_VERSION),
                backlog={k: points[k][0] for k in BACKLOG_KEYS if k in points},
                monitor=dict(sorted(verdicts.items())),
                last_file_ms=max((int(r.info.start_time) for r in files), default=None),
                retrain_requested=run.data.tags.get(runs.RETRAIN_REQUESTED),
            )
        )
    return FleetStatus(server, now_ms, silent_after_s, devices)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def render(status: FleetStatus) -> str:
    rows = [("DEVICE", "HEARTBEAT", "BACKLOG", "MODEL", "MONITOR", "STATE")]
    for d in status.devices:
        b = d.backlog
        backlog = f"{b.get('backlog_files', 0):.0f} files / {b.get('backlog_points', 0):.0f} pts" if b else "-"
        mon = ", ".join(f"{v} {k}" for k, v in d.monitor.items()) or "-"
        state = "SILENT" if d.silent else "ok"
        if d.monitor.get("alert"):
            state += ", alerts"
        if d.retrain_requested:
            state += ", retrain requested"
        rows.append((d.device, _age(d.heartbeat_age_s) + " ago" if d.heartbeat_age_s is not None else "never",
                     backlog, d.model or "?", mon, state))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    n = len(status.silent)
    lines.append(
        f"{len(status.devices)} device(s) on {status.server}; {n} silent for more than "
        f"{_age(status.silent_after_s)} (fleet.silent_after_s)"
    )
    return "\n".join(lines)


def cmd_fleet_status(settings: Settings, args: argparse.Namespace) -> int:
    target = resolve_target(settings)
    silent_after = args.silent_after if args.silent_after is not None else settings.fleet.silent_after_s
    client = make_client(settings, target)
    try:
        status = collect(
            client,
            now_ms=int(time.time() * 1000),
            silent_after_s=silent_after,
            recent_files=settings.fleet.recent_files,
            server=target.display,
        )
    except Exception as exc:
        err = translate(exc, "reading the fleet's device runs", target.display)
        if err is None:
            raise
        print(f"fleet: {err}")
        return Exit.UNREACHABLE if isinstance(err, (ServerUnreachable, ServerAccessDenied)) else Exit.FAILED
    if args.json:
        print(json.dumps(status.to_json(), indent=2))
    else:
        print(render(status))
    return Exit.FAILED if status.silent else Exit.OK


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> None:
    """Add ``fleet status`` to the ``har-edge`` parser."""
    fleet = add_command(subparsers, "fleet", None, "the central view of many devices on one MLflow server", parents)
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="COMMAND")
    st = add_command(
        fsub,
        "status",
        cmd_fleet_status,
        "devices with their last heartbeat, backlog, model and monitor verdicts; exit 1 if one is silent",
        parents,
    )
    st.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    st.add_argument("--silent-after", type=float, metavar="SECONDS", help="override fleet.silent_after_s for this call")

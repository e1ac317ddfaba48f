"""Device level: a retraining request when K of the last N files alerted (``monitor.trigger_*``).

The window restarts after each request: the next one needs K new alerts among
files processed after the newest file of the previous request.
"""

from __future__ import annotations

import json
import logging

from har_edge.agent.outbox import Outbox
from har_edge.agent.settings import MonitorSettings

log = logging.getLogger(__name__)


def check_trigger(outbox: Outbox, cfg: MonitorSettings) -> int | None:
    """Record a retraining request when due; return its id (None: not due)."""
    rows = outbox.recent_monitor(cfg.trigger_files)
    last = outbox.last_retrain_request()
    after = max((f["file_id"] for f in json.loads(last.files_json)), default=0) if last is not None else 0
    alerts = [r for r in rows if r.monitor_status == "alert" and r.id > after]
    if len(alerts) < cfg.trigger_alerts:
        return None
    listed = []
    for r in reversed(alerts):
        try:
            reasons = list(json.loads(r.monitor_json or "{}").get("reasons", []))
        except ValueError:
            reasons = []
        listed.append(
            {"file_id": r.id, "name": r.name, "sha256": r.sha256, "verdict": r.monitor_status, "reasons": reasons}
        )
    rid = outbox.record_retrain_request(json.dumps(listed))
    log.warning(
        "retraining requested: %d of the last %d files alerted (%s)",
        len(alerts),
        len(rows),
        ", ".join(f["name"] for f in listed),
    )
    return rid

"""Deleting one participant's MLflow runs (the server side of ``har-edge forget``).

Runs are found by the tag ``har.participant`` in this device's experiment (file runs and
per-participant summaries alike) and deleted with ``MlflowClient.delete_run``. On a tracking
server that is a soft delete: the run moves to the "deleted" lifecycle stage, hidden from
searches and the UI, but its rows and artifacts stay in the server's store until an operator
runs ``mlflow gc`` there (docs/privacy.md says how). On the local store (no server configured:
``<data_dir>/mlflow/mlflow.db``) this module runs the purge itself, so nothing of the
participant stays in the data dir.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from har_edge.agent.settings import Settings
from har_edge.sync import runs
from har_edge.sync.mlflow_client import EMBEDDED_DIR, make_client, resolve_target
from har_edge.sync.participant_tags import PARTICIPANT
from har_edge.sync.retry import translate

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

GC_TIMEOUT_S = 300.0


def _run_ids(client: MlflowClient, experiment_id: str, participant: str) -> list[str]:
    query = runs.identity_filter({PARTICIPANT: participant})
    return [r.info.run_id for r in runs.search_all(client, [experiment_id], query)]


def _purge_local(uri: str, run_ids: list[str]) -> bool:
    """``mlflow gc`` on the local store for these (deleted) runs: their rows and artifacts go for good."""
    if not run_ids:
        return True
    cmd = [sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", uri, "--tracking-uri", uri]
    cmd += ["--run-ids", ",".join(run_ids)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=GC_TIMEOUT_S, check=False)
    if res.returncode != 0:
        log.error("mlflow gc on the local store failed (exit %d): %s", res.returncode, res.stderr.strip()[-500:])
        return False
    return True


def delete_participant_runs(settings: Settings, participant: str) -> dict[str, Any]:
    """Delete the participant's runs; what was done, for the forget report."""
    target = resolve_target(settings)
    if not target.is_server and target.uri.startswith("sqlite:///") and not (settings.data_dir / EMBEDDED_DIR).exists():
        return {"skipped": "no tracking server configured and no local MLflow store: nothing to delete"}
    try:
        client = make_client(settings, target)
        experiment = client.get_experiment_by_name(settings.sync.experiment)
        if experiment is None:
            return {"target": target.display, "runs_deleted": 0, "run_ids": [], "purged": True}
        ids = _run_ids(client, experiment.experiment_id, participant)
        for run_id in ids:
            client.delete_run(run_id)
    except Exception as exc:
        err = translate(exc, f"deleting the runs of a participant at {target.display}", target.display)
        if err is None:
            raise
        raise err from exc
    purged = False if target.is_server else _purge_local(target.uri, ids)
    log.info("deleted %d MLflow run(s) of a participant at %s", len(ids), target.display)
    return {"target": target.display, "runs_deleted": len(ids), "run_ids": ids, "purged": purged}


def delete_participant_raw(settings: Settings, sha256s: list[str]) -> dict[str, Any]:
    """Delete the participant's raw exports from ``sync.raw_store`` (raw custody), by their content's sha256."""
    from har_edge.sync.rawstore import open_store

    store = open_store(settings)
    if store is None:
        return {"skipped": "no raw store configured"}
    erased = [sha for sha in dict.fromkeys(sha256s) if store.erase(sha)]
    log.info("erased %d raw export(s) of a participant from %s", len(erased), store.display)
    return {"store": store.display, "exports_erased": len(erased)}


def erase_participant_remote(settings: Settings, participant: str, sha256s: list[str]) -> dict[str, Any]:
    """What ``har-edge forget`` erases off the device: the MLflow runs, then the raw exports in custody."""
    out = delete_participant_runs(settings, participant)
    out["raw_store"] = delete_participant_raw(settings, sha256s)
    return out

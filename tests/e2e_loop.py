"""The whole har-edge loop on this machine, as a person would run it (``make demo``; also a test).

1. ``har-train all`` trains a small model on synthetic data, ``har-train release``
   publishes it into a fresh model registry (git + a local DVC remote);
2. ``har-edge sync once`` pulls, verifies and activates it;
3. the agent processes a generated Garmin FIT export (``har-edge agent process``);
4. ``har-edge sync once`` pushes the outbox to the MLflow server;
5. the MLflow run's metrics and predictions artifact are compared with the outbox.

Every step is the real command in a subprocess; the MLflow server is a real
``mlflow server`` on 127.0.0.1.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
VERSION = "2.0.0"
MODEL = "har-cnn"


def _run(cmd: list[str], *, cwd: Path, env: dict | None = None, timeout: float = 600, log=print) -> str:
    log("$ " + " ".join(str(c) for c in cmd))
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def _git(cwd: Path, *args: str, log=print) -> str:
    return _run(["git", "-c", "user.name=har-edge demo", "-c", "user.email=demo@localhost", *args], cwd=cwd, log=log)


def make_registry(root: Path, log=print) -> tuple[Path, Path, Path]:
    """A registry working repo, the bare repo devices read from, and an empty DVC remote folder."""
    origin = root / "registry.git"
    _git(root, "init", "-q", "--bare", "-b", "main", str(origin), log=log)
    repo = root / "registry"
    _git(root, "init", "-q", "-b", "main", str(repo), log=log)
    _git(repo, "remote", "add", "origin", str(origin), log=log)
    _git(repo, "commit", "-q", "--allow-empty", "-m", "model registry", log=log)
    return repo, origin, root / "dvc-remote"


def train_small_model(root: Path, tracking_uri: str, log=print) -> Path:
    params = {
        "data": {
            "source": "synthetic",
            "cache_dir": "cache",
            "synthetic": {"subjects": 8, "seconds_per_activity": 40, "seed": 3},
        },
        "split": {"test_subjects": [], "val_subjects": 2, "seed": 1},
        "train": {"epochs": 6, "patience": 6, "threads": 2, "filters": [16, 32, 48], "dense": 32},
        "export": {"name": MODEL, "version": VERSION, "representative_windows": 64, "golden_per_class": 2},
        "gate": {"min_int8_accuracy": 0.6, "min_agreement": 0.9},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "har-trainer-demo", "run_kind": "demo"},
        "build_dir": "build",
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run([BIN / "har-train", "--params", root / "params.yaml", "all"], cwd=root, log=log)
    return root / "build" / "model"


def _history(client, run_id: str, key: str) -> Counter:
    return Counter((m.value, m.timestamp, m.step) for m in client.get_metric_history(run_id, key))


def run_loop(work: Path, tracking_uri: str, log=print) -> dict:
    """Run the loop in ``work`` against the MLflow server at ``tracking_uri``; return what it found."""
    sys.path.insert(0, str(HERE))
    from fitgen import write_imu_fit
    from mlflow import MlflowClient

    from har_edge.agent.outbox import Outbox

    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, DVC_NO_ANALYTICS="1")
    env.pop("HAR_EDGE_CONFIG", None)
    t0 = time.monotonic()

    log("== 1. train a small model and release it")
    repo, origin, remote = make_registry(work, log=log)
    folder = train_small_model(work / "trainer", tracking_uri, log=log)
    _run(
        [
            BIN / "har-train",
            "--params",
            work / "trainer" / "params.yaml",
            "release",
            "--registry",
            repo,
            "--remote",
            remote,
            folder,
        ],
        cwd=work / "trainer",
        env=env,
        log=log,
    )

    log("== 2. the device pulls, verifies and activates it")
    data = work / "device"
    data.mkdir()
    (data / "har-edge.toml").write_text(
        f'device_id = "demo-device"\n[agent]\nsettle_s = 0.2\n'
        f'[sync]\ntracking_uri = "{tracking_uri}"\nregistry = "{origin}"\nmodel_name = "{MODEL}"\n'
        f'experiment = "har-edge-demo"\n'
    )
    edge_env = dict(env, HAR_EDGE_DATA_DIR=str(data))
    t_pull = time.monotonic()
    out = _run([BIN / "har-edge", "sync", "once"], cwd=work, env=edge_env, log=log)
    pull_s = time.monotonic() - t_pull
    log(out.strip())
    status = json.loads(_run([BIN / "har-edge", "status", "--json"], cwd=work, env=edge_env, log=log))
    if status["model"].get("version") != VERSION:
        raise AssertionError(f"release {VERSION} was not activated: {status['model']}")

    log("== 3. the agent processes a Garmin FIT export")
    export = work / "walk.fit"
    write_imu_fit(export, rate_hz=50, seconds=180, start=datetime(2025, 3, 24, 7, 52, 19, tzinfo=UTC))
    log(_run([BIN / "har-edge", "agent", "process", export], cwd=work, env=edge_env, log=log).strip())

    log("== 4. the device pushes its outbox")
    log(_run([BIN / "har-edge", "sync", "once"], cwd=work, env=edge_env, log=log).strip())

    log("== 5. MLflow holds exactly what the outbox holds")
    ob = Outbox(data / "outbox.sqlite")
    with ob.engine.connect() as c:
        row = c.exec_driver_sql(
            "SELECT id, sha256, run_id, model_version, finished_ms FROM files WHERE status='processed'"
        ).one()
    client = MlflowClient(tracking_uri)
    run = client.get_run(row.run_id)
    problems = []
    if run.data.tags.get("har.model_version") != VERSION or row.model_version != VERSION:
        problems.append(f"run tags model {run.data.tags.get('har.model_version')}, outbox {row.model_version}")
    if run.info.status != "FINISHED" or row.finished_ms is None:
        problems.append(f"run status {run.info.status}")
    expected: dict[str, Counter] = {}
    for p in ob.file_metrics(row.id):
        expected.setdefault(p.key, Counter())[(p.value, p.timestamp_ms, p.step)] += 1
    for key, points in expected.items():
        got = _history(client, row.run_id, key)
        if got != points:
            problems.append(f"metric {key}: MLflow {sorted(got.items())[:3]} vs outbox {sorted(points.items())[:3]}")
    names, starts, probs = ob.file_windows(row.id)
    csv_path = Path(client.download_artifacts(row.run_id, "predictions.csv", str(work)))
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if [int(r["start_ms"]) for r in rows] != starts.tolist():
        problems.append("predictions.csv start times differ from the outbox")
    if [r["label"] for r in rows] != [names[i] for i in probs.argmax(1)]:
        problems.append("predictions.csv labels differ from the outbox")
    if problems:
        raise AssertionError("MLflow and the outbox disagree:\n  " + "\n  ".join(problems))
    result = {
        "run_id": row.run_id,
        "model_version": VERSION,
        "windows": len(rows),
        "metric_keys": len(expected),
        "metric_points": sum(sum(c.values()) for c in expected.values()),
        "minutes": len(expected.get("minute_confidence", ())),
        "release_to_activation_s": round(pull_s, 2),
        "total_s": round(time.monotonic() - t0, 1),
    }
    log("OK: " + json.dumps(result))
    return result


def main() -> int:
    from conftest import MlflowServer  # the tests' server helper: mlflow server on 127.0.0.1

    with tempfile.TemporaryDirectory(prefix="har-edge-demo-") as tmp:
        root = Path(tmp)
        (root / "mlflow").mkdir()
        server = MlflowServer(root / "mlflow")
        print(f"starting an MLflow server on {server.url} (30-60 s) ...", flush=True)
        server.start()
        try:
            run_loop(root / "loop", server.url, log=lambda s: print(s, flush=True))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())

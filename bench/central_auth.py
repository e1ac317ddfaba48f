"""What basic-auth costs the central MLflow server: CPU-seconds per request and per file run, auth off / on / cached.

MLflow's basic-auth checks the password on every request, and the check is a
scrypt hash (werkzeug's default): this measures what that costs the server's
own processes (uvicorn's supervisor and workers, from their process tree), on
one stack whose MLflow is restarted in each mode:

- ``off``: no ``--app-name basic-auth``;
- ``on``: basic-auth, every request checked (``auth_cache_ttl_seconds = 0``);
- ``cached``: basic-auth with the check cached per worker for 300 s (the stack's default).

The workload per mode is one device pushing the same outbox (FILES files of
MINUTES minutes each, as the agent stores them) with ``Pusher``, then REQUESTS
plain ``GET runs/get`` calls. Run: ``python bench/central_auth.py [--files 6]``.
Client and server share the machine's cores; the figures are server CPU only.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import restored_environ  # noqa: E402
from har_edge.agent.manifest import read_manifest  # noqa: E402
from har_edge.agent.model import BUNDLED_MODEL_DIR  # noqa: E402
from har_edge.agent.outbox import FileRecord, Outbox, now_ms  # noqa: E402
from har_edge.agent.settings import load_settings  # noqa: E402
from har_edge.agent.summary import minute_points, summary_points  # noqa: E402
from har_edge.central.stack import CentralStack, StackOptions  # noqa: E402
from har_edge.sync.mlflow_client import ENV_NAMES  # noqa: E402
from har_edge.sync.push import Pusher  # noqa: E402


def fill(outbox: Outbox, files: int, minutes: int) -> int:
    """``files`` processed files as the agent stores them (one window per 2 s); returns the metric points."""
    m = read_manifest(BUNDLED_MODEL_DIR)
    labels = list(m.labels)
    points = 0
    for seed in range(files):
        rng = np.random.default_rng(seed)
        n = minutes * 30
        probs = rng.dirichlet(np.ones(len(labels)) * 0.3, size=n).astype(np.float32)
        t = now_ms()
        starts = 1_742_802_739_000 + seed * 86_400_000 + np.arange(n, dtype=np.int64) * 2000
        pts = summary_points(
            label_names=labels,
            probs=probs,
            step_s=2.0,
            low_confidence=0.6,
            per_window_s=[0.001] * n,
            timings={"decode": 0.1, "preprocess": 0.05, "inference": 0.02},
            quality={"coverage": 1.0},
            timestamp_ms=t,
        ) + minute_points(label_names=labels, start_ms=starts, probs=probs)
        rec = FileRecord(
            sha256=hashlib.sha256(f"bench-{seed}".encode()).hexdigest(),
            name=f"rec-{seed:04d}.fit",
            size=1000 + seed,
            status="processed",
            received_ms=t - 500,
            processed_ms=t,
            agent_version="bench",
            format="fit",
            model_name=m.name,
            model_version=m.version,
            model_sha256=m.sha256,
        )
        outbox.record_file(rec, label_names=labels, start_ms=starts, probs=probs, points=pts)
        points += len(pts)
    return points


def measure(stack: CentralStack, mode: str, work: Path, files: int, minutes: int, requests_n: int) -> dict[str, float]:
    import requests

    m = stack.mlflow
    m.stop()
    m.auth = mode != "off"
    m.auth_cache_ttl_s = 300 if mode == "cached" else 0
    m.start()
    device = f"bench-{mode}"
    sync: dict[str, object] = {"tracking_uri": stack.url, "request_timeout_s": 60, "batch_size": 1000}
    auth: tuple[str, str] | None = None
    if m.auth:
        account = stack.add_device(device) if not stack.admin().user_exists(device) else None
        if account is None:
            raise SystemExit(f"user {device} exists already: use a fresh --root")
        sync.update(experiment=account.experiment, username=account.username, password=account.password)
        auth = (account.username, account.password)
    else:
        sync["experiment"] = f"har-edge/{device}"
    data = work / device
    data.mkdir(parents=True)
    settings = load_settings(env={}, data_dir=data, device_id=device, sync=sync)
    outbox = Outbox(settings.outbox_path)
    points = fill(outbox, files, minutes)
    with restored_environ(ENV_NAMES):  # Pusher sets the MLflow variables for its client
        pusher = Pusher(settings, outbox)
        pusher.experiment_id()
        before = stack.cpu_seconds()["mlflow"]
        t0 = time.perf_counter()
        report = pusher.push(time.time())
        push_s = time.perf_counter() - t0
        push_cpu = stack.cpu_seconds()["mlflow"] - before
        assert report.files_finished == files, report.summary()
        run_id = outbox.file(1).run_id
        session = requests.Session()
        before = stack.cpu_seconds()["mlflow"]
        t0 = time.perf_counter()
        for _ in range(requests_n):
            r = session.get(f"{stack.url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, auth=auth, timeout=60)
            r.raise_for_status()
        req_s = time.perf_counter() - t0
        req_cpu = stack.cpu_seconds()["mlflow"] - before
    return {
        "push_cpu_per_file_s": push_cpu / files,
        "push_cpu_per_1000_points_s": push_cpu / points * 1000,
        "push_wall_s": push_s,
        "points": float(points),
        "cpu_per_request_ms": req_cpu / requests_n * 1000,
        "wall_per_request_ms": req_s / requests_n * 1000,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=6, help="files pushed per mode")
    ap.add_argument("--minutes", type=int, default=30, help="minutes of windows per file")
    ap.add_argument("--requests", type=int, default=100, help="plain GET runs/get requests per mode")
    ap.add_argument("--workers", type=int, default=2, help="MLflow workers")
    args = ap.parse_args()
    top = Path(tempfile.mkdtemp(prefix="har-central-bench-"))
    os.chmod(top, 0o755)  # PostgreSQL runs as the postgres user when this runs as root
    stack = CentralStack(top / "stack", StackOptions(workers=args.workers))
    results: dict[str, dict[str, float]] = {}
    try:
        stack.start()
        for mode in ("off", "on", "cached"):
            results[mode] = measure(stack, mode, top / "devices", args.files, args.minutes, args.requests)
            print(f"{mode}: {results[mode]}", flush=True)
        sizes = storage_figures(stack)
        print(f"storage: {sizes}", flush=True)
    finally:
        stack.mlflow.stop()
        stack.store.stop(kill=True)
        stack.postgres.stop("immediate")
        shutil.rmtree(top, ignore_errors=True)
    print(f"\nMLflow server CPU, basic-auth off / on / cached 300 s ({args.workers} workers, "
          f"{args.files} files x {args.minutes} min per mode; clients on the same cores)")  # fmt: skip
    print("| figure | off | on (check every request) | on, cached 300 s |\n|---|---|---|---|")
    for key, label in (
        ("push_cpu_per_file_s", "server CPU s per file run"),
        ("push_cpu_per_1000_points_s", "server CPU s per 1,000 points"),
        ("cpu_per_request_ms", "server CPU ms per GET runs/get"),
        ("wall_per_request_ms", "wall ms per GET runs/get"),
        ("push_wall_s", f"push of {args.files} files, wall s"),
    ):
        print(f"| {label} | " + " | ".join(f"{results[m][key]:.3g}" for m in ("off", "on", "cached")) + " |")
    print(
        f"\nstorage: {sizes['pg_bytes_per_metric_row']:.0f} bytes per metric row in PostgreSQL "
        f"(table + indexes, {sizes['metric_rows']:.0f} rows); {sizes['csv_bytes_per_window']:.0f} bytes per window "
        f"in predictions.csv; MLflow RSS {sizes['mlflow_rss_mb']:.0f} MB ({args.workers} workers + supervisor)"
    )
    return 0


def storage_figures(stack: CentralStack) -> dict[str, float]:
    """Bytes per stored metric row, per window of the predictions CSVs, and the server's memory."""
    import psutil

    with stack.postgres.connect("mlflow") as conn:
        rows = conn.execute("SELECT count(*) FROM metrics").fetchone()
        size = conn.execute("SELECT pg_total_relation_size('metrics')").fetchone()
    assert rows is not None and size is not None
    s3 = stack.s3_client()
    csv_bytes = 0
    windows = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("predictions.csv"):
                body = s3.get_object(Bucket=stack.bucket, Key=obj["Key"])["Body"].read()
                csv_bytes += len(body)
                windows += body.count(b"\n") - 1
    pid = stack.pids()["mlflow"]
    rss = 0.0
    if pid:
        top = psutil.Process(pid)
        rss = sum(p.memory_info().rss for p in [top, *top.children(recursive=True)]) / 1e6
    return {
        "metric_rows": float(rows[0]),
        "pg_bytes_per_metric_row": size[0] / max(1, rows[0]),
        "csv_bytes_per_window": csv_bytes / max(1, windows),
        "mlflow_rss_mb": rss,
    }


if __name__ == "__main__":
    sys.exit(main())

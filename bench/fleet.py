"""The fleet bench (``make bench-fleet``): N simulated devices push to the central stack at once, then pull a release.

Each device has its own data dir, device id and MLflow account (its own experiment on the central
server), and an outbox the agent filled from its own exports (FIT files of ``FLEET_MINUTES``, 50 Hz
accel + gyro, ``FLEET_FILES`` per device, every one distinct). The outboxes are filled once and kept
under ``build/fleet-fixture/`` (each run pushes a fresh copy). Then:

1. **PostgreSQL**: the central stack (PostgreSQL, SeaweedFS S3, MLflow with ``--workers 2`` and
   basic-auth, :class:`har_edge.central.stack.CentralStack`); every device runs ``har-edge sync once``
   at the same moment, and again (as its daemon would after a back-off) while anything is pending.
   Server CPU is read from the services' own process trees (``/proc``: user + system of each process,
   live and reaped children).
2. an **idle pass**: every device once more with nothing queued (a heartbeat: what a device costs
   between exports).
3. **release**: ``har_edge.trainer.release`` of a new version into an S3 DVC remote on the same
   SeaweedFS; every device pulls it at the same moment (ls-remote, ``dvc get``, sha256, load, golden
   windows, switch).
4. **SQLite**: the same push load against ``mlflow server`` on SQLite with local artifacts (the
   single-box setup), same worker count, no auth.

Checked after each push: exactly one run per file, FINISHED, every point of the outbox on the
server (counted in the server's database), a predictions CSV per file. Latencies are measured with
the 50 clients on the same 2 cores as the servers.

    FLEET_N=10 .venv/bin/python -m bench.fleet     # a few minutes
    make bench-fleet                               # FLEET_N=50
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT, SCRATCH, fitgen, restored_environ
from har_edge.central.stack import tree_cpu

log = logging.getLogger(__name__)

N = int(os.environ.get("FLEET_N", "50"))
FILES = int(os.environ.get("FLEET_FILES", "2"))
MINUTES = float(os.environ.get("FLEET_MINUTES", "60"))
WORKERS = int(os.environ.get("FLEET_WORKERS", "2"))
#: seconds a worker trusts a checked password (MLflow's auth_cache_ttl_seconds); 0 hashes it on every request
AUTH_TTL = int(os.environ.get("FLEET_AUTH_CACHE_TTL", "300"))
#: ``sync once`` runs per device at most (a daemon would go on backing off)
MAX_PASSES = 8
FIXTURE = ROOT / "build" / "fleet-fixture" / f"f{FILES}-m{MINUTES:g}"
WORK = SCRATCH / "fleet"
OUT = SCRATCH / "fleet.json"
#: a day-long export (50 Hz, 2 s step): what the arithmetic in docs/deploy.md is for
DAY_WINDOWS = 43_200


def device_name(i: int) -> str:
    return f"fleet-{i:03d}"


# -- fixture: outboxes filled by the agent ------------------------------------------------------------


def fill_device(i: int) -> Path:
    """``FIXTURE/<device>``: a data dir whose outbox the agent filled from this device's own exports."""
    from har_edge.agent.daemon import Agent
    from har_edge.agent.settings import load_settings

    name = device_name(i)
    dest = FIXTURE / name
    if (dest / ".filled").exists():
        return dest
    tmp = FIXTURE / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    settings = load_settings(
        env={}, data_dir=tmp, device_id=name, agent={"settle_s": 0.0, "archive": False}, http={"address": ""}
    )
    agent = Agent(settings)
    exports = FIXTURE / ".exports"
    for j in range(FILES):
        seed = 10_000 + i * FILES + j  # distinct exports everywhere: distinct sha256s, distinct runs
        path = fitgen().cached_fit(exports, hours=MINUTES / 60, seed=seed)
        shutil.move(path, settings.inbox / f"{name}-{j}.fit")
    done = 0
    for _ in range(FILES * 3):
        done += sum(o.status == "processed" for o in agent.step(now=time.monotonic() + 1e6))
        if done >= FILES:
            break
    agent.outbox.close()
    if done != FILES:
        raise RuntimeError(f"{name}: the agent processed {done} of {FILES} exports")
    (tmp / ".filled").write_text("")
    os.rename(tmp, dest)
    return dest


def fill(n: int) -> tuple[list[Path], float]:
    FIXTURE.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    dirs = [fill_device(i) for i in range(n)]
    shutil.rmtree(FIXTURE / ".exports", ignore_errors=True)
    return dirs, time.monotonic() - t0


def outbox_files(data_dir: Path) -> list[dict[str, Any]]:
    """id, sha256, run_id, finished_ms and the metric point count of every processed file."""
    with sqlite3.connect(data_dir / "outbox.sqlite") as c:
        rows = c.execute(
            "SELECT f.id, f.sha256, f.run_id, f.finished_ms, "
            "(SELECT count(*) FROM metrics m WHERE m.file_id = f.id) "
            "FROM files f WHERE f.status = 'processed' ORDER BY f.id"
        ).fetchall()
    return [{"id": r[0], "sha256": r[1], "run_id": r[2], "finished_ms": r[3], "points": r[4]} for r in rows]


def outbox_points(data_dir: Path) -> tuple[int, int]:
    """(metric points queued, delivered) of a data dir's outbox, device-level points included."""
    with sqlite3.connect(data_dir / "outbox.sqlite") as c:
        total, delivered = c.execute("SELECT count(*), count(delivered_ms) FROM metrics").fetchone()
    return int(total), int(delivered)


# -- CPU of a server's process tree --------------------------------------------------------------------


# -- one push phase ----------------------------------------------------------------------------------


@dataclass
class Target:
    """A server under load: how devices reach it and how its CPU and database are read."""

    name: str
    url: str
    cpu: Any  # () -> {service: cpu seconds}
    metric_counts: Any  # (run ids) -> {run id: points}
    run_rows: Any  # () -> [(file sha256, run id, status)] of every active file run
    artifact_count: Any  # () -> predictions CSVs stored
    server_logs: list[Path] = field(default_factory=list)
    accounts: dict[str, Any] = field(default_factory=dict)


#: (kind, pattern) in the order they are tried on one printed error line
_KINDS = (
    ("sqlite_locked", re.compile(r"database is locked")),
    ("timeout", re.compile(r"no answer within the time-out|timed out")),
    ("http_5xx", re.compile(r"(?:HTTP|status|code)\D{0,12}5\d\d\b|INTERNAL_ERROR|Internal Server Error")),
    ("access_denied", re.compile(r"(?:HTTP|status|code)\D{0,12}40[13]\b|PERMISSION_DENIED|Unauthorized")),
    ("refused_by_server", re.compile(r"refused by the server|INVALID_PARAMETER_VALUE")),
    ("unreachable", re.compile(r"could not be reached|Connection refused")),
)


def error_kinds(text: str) -> list[tuple[str, str]]:
    """(kind, line) of the errors a ``sync once`` printed on stdout (its log lines repeat them: not counted)."""
    found = []
    for line in text.splitlines():
        low = line.strip()
        if not low.startswith(("push:", "models:", "refused by the server")):
            continue
        if low.startswith("models:") and "no registry configured" in low:
            continue
        kinds = [kind for kind, pattern in _KINDS if pattern.search(low)]
        found.append((kinds[0] if kinds else "other", low[-300:]))
    return found


def device_env(target: Target, name: str, data_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HAR_EDGE_", "MLFLOW_", "AWS_"))}
    env.update(
        {
            "HAR_EDGE_DATA_DIR": str(data_dir),
            "HAR_EDGE_DEVICE_ID": name,
            "HAR_EDGE_HTTP__ADDRESS": "",
            "HAR_EDGE_SYNC__TRACKING_URI": target.url,
            "HAR_EDGE_SYNC__EXPERIMENT": f"har-edge/{name}",
            "PYTHONPATH": str(ROOT),
        }
    )
    account = target.accounts.get(name)
    if account is not None:
        env["HAR_EDGE_SYNC__EXPERIMENT"] = account.experiment
        env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = account.username, account.password
    env.update(extra or {})
    return env


def _pending(out: str) -> int | None:
    for line in out.splitlines():
        if "still pending:" in line:
            parts = line.split("still pending:")[1].split(",")
            return sum(int(p.strip().split()[0]) for p in parts)
    return None


def run_device(name: str, data_dir: Path, env: dict[str, str], barrier: threading.Barrier) -> dict[str, Any]:
    """``har-edge sync once`` until nothing is pending (at most MAX_PASSES), as a daemon's passes would."""
    exe = Path(sys.executable).with_name("har-edge")
    barrier.wait()
    t0 = time.time()
    kinds: list[str] = []
    samples: dict[str, str] = {}
    passes = 0
    pending: int | None = None
    while passes < MAX_PASSES:
        passes += 1
        res = subprocess.run([str(exe), "sync", "once"], env=env, capture_output=True, text=True, timeout=900)
        text = res.stdout + res.stderr
        pending = _pending(res.stdout)
        found = error_kinds(res.stdout)
        for kind, line in found:
            kinds.append(kind)
            samples.setdefault(kind, line)
        if res.returncode != 0 and not found:
            kinds.append(f"exit_{res.returncode}")
            samples.setdefault(f"exit_{res.returncode}", text[-300:])
        if res.returncode == 0 and pending == 0:
            break
        time.sleep(1.0)
    return {
        "device": name,
        "t0": t0,
        "t_end": time.time(),
        "passes": passes,
        "pending": pending,
        "errors": kinds,
        "samples": samples,
    }


def _merge_errors(results: list[dict[str, Any]]) -> tuple[Counter[str], dict[str, str]]:
    """The devices' error counts added up, and the first sample message of each kind."""
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}
    for r in results:
        errors.update(r["errors"])
        for k, v in r["samples"].items():
            samples.setdefault(k, v)
    return errors, samples


def push_phase(target: Target, fixture_dirs: list[Path], extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Copy the fixture, start every device at once, wait for all; figures and checks."""
    root = WORK / target.name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    dirs = {}
    for src in fixture_dirs:
        dest = root / src.name
        shutil.copytree(src, dest)
        dirs[src.name] = dest
    queued = {n: outbox_points(d)[0] for n, d in dirs.items()}
    barrier = threading.Barrier(len(dirs) + 1)
    cpu0 = target.cpu()
    with ThreadPoolExecutor(max_workers=len(dirs)) as pool:
        futures = [pool.submit(run_device, n, d, device_env(target, n, d, extra_env), barrier) for n, d in dirs.items()]
        barrier.wait()
        t_start = time.time()
        results = [f.result() for f in futures]
    wall = max(r["t_end"] for r in results) - t_start
    cpu1 = target.cpu()
    cpu = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
    return check_push(target, dirs, results, t_start, wall, cpu, queued)


def check_push(
    target: Target,
    dirs: dict[str, Path],
    results: list[dict[str, Any]],
    t_start: float,
    wall: float,
    cpu: dict[str, float],
    queued: dict[str, int],
) -> dict[str, Any]:
    files = {n: outbox_files(d) for n, d in dirs.items()}
    all_files = [f for fs in files.values() for f in fs]
    delivered = {n: outbox_points(d)[1] for n, d in dirs.items()}
    points = sum(delivered.values())
    errors, samples = _merge_errors(results)
    for r in results:
        if r["pending"]:
            errors["left_pending"] += 1
    latencies = [(f["finished_ms"] / 1000 - t_start) for f in all_files if f["finished_ms"]]
    unfinished = sum(1 for f in all_files if not f["finished_ms"])
    # the server's own record: one active run per file, FINISHED, every point
    rows = target.run_rows()
    by_sha: dict[str, list[tuple[str, str]]] = {}
    for sha, run_id, status in rows:
        by_sha.setdefault(sha, []).append((run_id, status))
    duplicates = sum(len(v) - 1 for v in by_sha.values() if len(v) > 1)
    missing = sum(1 for f in all_files if f["sha256"] not in by_sha)
    not_finished = sum(1 for v in by_sha.values() for _, st in v if st != "FINISHED")
    counts = target.metric_counts([f["run_id"] for f in all_files if f["run_id"]])
    points_differ = sum(1 for f in all_files if f["run_id"] and counts.get(f["run_id"], 0) != f["points"])
    csvs = target.artifact_count()
    log_hits: Counter[str] = Counter()
    for path in target.server_logs:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        log_hits["database is locked"] += text.count("database is locked")
        log_hits["Traceback"] += text.count("Traceback")
        log_hits['" 500'] += text.count('" 500') + text.count(" 500 Internal")
    server_cpu = sum(cpu.values())
    file_points = sum(f["points"] for f in all_files)
    return {
        "target": target.name,
        "devices": len(dirs),
        "files": len(all_files),
        "points": points,
        "points_queued": sum(queued.values()),
        "file_points": file_points,
        "wall_s": wall,
        "points_per_s": points / wall if wall else 0.0,
        "files_per_s": len(all_files) / wall if wall else 0.0,
        "latency_p50_s": _pct(latencies, 50),
        "latency_p95_s": _pct(latencies, 95),
        "latency_max_s": max(latencies) if latencies else None,
        "passes_max": max(r["passes"] for r in results),
        "passes_total": sum(r["passes"] for r in results),
        "server_cpu_s": cpu,
        "cpu_per_1000_points": server_cpu / points * 1000 if points else None,
        "cpu_per_file_run": server_cpu / len(all_files) if all_files else None,
        "errors": dict(errors),
        "error_samples": samples,
        "server_log": dict(log_hits),
        "checks": {
            "unfinished_in_outbox": unfinished,
            "missing_runs": missing,
            "duplicate_runs": duplicates,
            "runs_not_finished": not_finished,
            "points_differ": points_differ,
            "points_undelivered": sum(outbox_points(d)[0] for d in dirs.values()) - points,
            "csv_artifacts": csvs,
        },
    }


def idle_phase(target: Target) -> dict[str, Any]:
    """Every device once more, nothing queued but a heartbeat: the server's cost of a quiet pass."""
    root = WORK / target.name
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    barrier = threading.Barrier(len(dirs) + 1)
    cpu0 = target.cpu()
    extra = {"HAR_EDGE_SYNC__HEARTBEAT_INTERVAL_S": "1"}
    time.sleep(1.5)  # the heartbeat of the push phase is older than the interval
    with ThreadPoolExecutor(max_workers=len(dirs)) as pool:
        futures = [pool.submit(run_device, d.name, d, device_env(target, d.name, d, extra), barrier) for d in dirs]
        barrier.wait()
        t0 = time.time()
        results = [f.result() for f in futures]
    cpu1 = target.cpu()
    server_cpu = sum(cpu1[k] - cpu0.get(k, 0.0) for k in cpu1)
    errors, samples = _merge_errors(results)
    return {
        "devices": len(dirs),
        "error_samples": samples,
        "wall_s": max(r["t_end"] for r in results) - t0,
        "server_cpu_s": server_cpu,
        "cpu_per_pass": server_cpu / len(dirs),
        "errors": dict(errors),
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# -- targets -------------------------------------------------------------------------------------------


def central_target(stack: Any, n: int) -> Target:
    from har_edge.sync.runs import FILE_SHA, KIND

    def run_rows() -> list[tuple[str, str, str]]:
        with stack.postgres.connect("mlflow") as c:
            return [
                tuple(r)
                for r in c.execute(
                    "SELECT t.value, r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                    "JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = %s AND k.value = 'file' "
                    "WHERE t.key = %s AND r.lifecycle_stage = 'active'",
                    (KIND, FILE_SHA),
                ).fetchall()
            ]

    def metric_counts(run_ids: list[str]) -> dict[str, int]:
        with stack.postgres.connect("mlflow") as c:
            rows = c.execute(
                "SELECT run_uuid, count(*) FROM metrics WHERE run_uuid = ANY(%s) GROUP BY run_uuid", (run_ids,)
            ).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def artifact_count() -> int:
        return sum(1 for k in stack.artifact_keys() if k.endswith("/predictions.csv"))

    t = Target(
        "postgresql",
        stack.url,
        stack.cpu_seconds,
        metric_counts,
        run_rows,
        artifact_count,
        server_logs=sorted((stack.root / "logs").glob("*")),
    )
    for i in range(n):
        t.accounts[device_name(i)] = stack.add_device(device_name(i))
    return t


def sqlite_target(server: Any) -> Target:
    from har_edge.sync.runs import FILE_SHA, KIND

    db = server.root / "mlflow.db"

    def run_rows() -> list[tuple[str, str, str]]:
        with sqlite3.connect(db, timeout=60) as c:
            return c.execute(
                "SELECT t.value, r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = ? AND k.value = 'file' "
                "WHERE t.key = ? AND r.lifecycle_stage = 'active'",
                (KIND, FILE_SHA),
            ).fetchall()

    def metric_counts(run_ids: list[str]) -> dict[str, int]:
        with sqlite3.connect(db, timeout=60) as c:
            rows = c.execute("SELECT run_uuid, count(*) FROM metrics GROUP BY run_uuid").fetchall()
        wanted = set(run_ids)
        return {r[0]: int(r[1]) for r in rows if r[0] in wanted}

    def artifact_count() -> int:
        return sum(1 for _ in (server.root / "artifacts").rglob("predictions.csv"))

    return Target(
        "sqlite",
        server.url,
        lambda: {"mlflow": tree_cpu(server.proc.pid if server.proc else None)},
        metric_counts,
        run_rows,
        artifact_count,
        server_logs=[server.log],
    )


# -- release to S3, then every device pulls -------------------------------------------------------------


def _new_model(dest: Path, version: str) -> Path:
    """The bundled model as a new version: its own bytes (trailing, the flatbuffer stays valid) and sha256."""
    from har_edge.agent.model import BUNDLED_MODEL_DIR
    from har_edge.common.hashing import sha256_file

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(BUNDLED_MODEL_DIR, dest)
    with open(dest / "model.tflite", "ab") as f:
        f.write(f"har-edge fleet bench {version}".encode().ljust(32, b"\0"))
    m = json.loads((dest / "manifest.json").read_text())
    m["version"], m["sha256"] = version, sha256_file(dest / "model.tflite")
    (dest / "manifest.json").write_text(json.dumps(m, indent=2))
    return dest


def release_phase(stack: Any, n: int) -> dict[str, Any]:
    from har_edge.agent.manifest import read_manifest
    from har_edge.agent.model import BUNDLED_MODEL_DIR
    from har_edge.common.versions import parse_version
    from har_edge.trainer.release import release
    from har_edge.trainer.settings import load_settings as trainer_settings

    root = WORK / "release"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    git = ["git", "-c", "user.name=trainer", "-c", "user.email=trainer@localhost"]
    origin, work = root / "registry.git", root / "registry"
    subprocess.run([*git, "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    subprocess.run([*git, "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run([*git, "remote", "add", "origin", str(origin)], cwd=work, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "model registry"], cwd=work, check=True)
    params = root / "params.yaml"
    params.write_text(
        f"data:\n  cache_dir: {root / 'cache'}\nmlflow:\n  tracking_uri: sqlite:///{root / 'mlflow.db'}\n"
    )
    key = parse_version(read_manifest(BUNDLED_MODEL_DIR).version)
    version = f"{(key.core[0] + 1) if key else 1}.0.0"
    folder = _new_model(root / "model", version)
    with restored_environ(stack.store.env()):
        os.environ.update(stack.store.env())  # the trainer's endpoint and keys: the standard AWS variables
        t0 = time.time()
        r = release(trainer_settings(params), folder, registry=str(work), remote=f"s3://{stack.bucket}/dvc")
        t_released = time.time()
    devices = sorted(p for p in (WORK / "postgresql").iterdir() if p.is_dir())[:n]
    s3 = stack.store.env()
    cpu0 = stack.cpu_seconds()

    def pull(d: Path, barrier: threading.Barrier) -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HAR_EDGE_", "MLFLOW_", "AWS_"))}
        env.update(
            {
                "HAR_EDGE_DATA_DIR": str(d),
                "HAR_EDGE_DEVICE_ID": d.name,
                "HAR_EDGE_SYNC__REGISTRY": str(origin),
                "HAR_EDGE_SYNC__DVC_REMOTE_ENDPOINT": stack.store.endpoint,
                "AWS_ACCESS_KEY_ID": s3["AWS_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": s3["AWS_SECRET_ACCESS_KEY"],
                "AWS_DEFAULT_REGION": s3["AWS_DEFAULT_REGION"],
                "PYTHONPATH": str(ROOT),
            }
        )
        barrier.wait()
        res = subprocess.run(
            [sys.executable, "-m", "bench.fleet", "--pull-one"], env=env, capture_output=True, text=True, timeout=900
        )
        try:
            got = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            got = {"activated": None, "error": (res.stderr or res.stdout)[-300:], "t_end": time.time()}
        return got

    barrier = threading.Barrier(len(devices) + 1)
    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        futures = [pool.submit(pull, d, barrier) for d in devices]
        barrier.wait()
        t_pull = time.time()
        results = [f.result() for f in futures]
    cpu1 = stack.cpu_seconds()
    ok = [x for x in results if x.get("activated") == version]
    lat = [x["t_end"] - t_released for x in ok]
    errors = Counter(
        str(x.get("error") or x.get("note") or "not activated")[-400:] for x in results if x.get("activated") != version
    )
    return {
        "version": version,
        "tag": r.tag,
        "release_s": t_released - t0,
        "devices": len(devices),
        "activated": len(ok),
        "release_to_activation_p50_s": _pct(lat, 50),
        "release_to_activation_p95_s": _pct(lat, 95),
        "release_to_activation_max_s": max(lat) if lat else None,
        "pull_start_after_release_s": t_pull - t_released,
        "s3_cpu_s": cpu1["s3"] - cpu0["s3"],
        "errors": dict(errors),
    }


def pull_one() -> int:
    """One device's pull pass (the sync daemon's ``pull_job`` without the push), as JSON on stdout."""
    from har_edge.agent.settings import load_settings
    from har_edge.sync.models import ModelManager

    logging.basicConfig(level=logging.WARNING)
    try:
        report = ModelManager(load_settings()).update(time.time())
        out: dict[str, Any] = {"activated": report.activated, "note": report.summary(), "t_end": time.time()}
    except Exception as exc:  # reported, counted by kind
        out = {"activated": None, "error": f"{type(exc).__name__}: {exc}", "t_end": time.time()}
    print(json.dumps(out))
    return 0


# -- the run -------------------------------------------------------------------------------------------


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(res: dict[str, Any]) -> str:
    pg, sq, rel, idle = res.get("postgresql"), res.get("sqlite"), res.get("release"), res.get("idle")
    lines = [
        f"fleet bench: {res['devices']} devices x {FILES} exports of {MINUTES:g} min "
        f"({res['fixture']['windows_per_file']} windows, {res['fixture']['points_per_file']:.0f} points per file); "
        f"MLflow --workers {WORKERS}; {os.cpu_count()} cores shared by clients and servers",
        "",
        "| figure | PostgreSQL + S3 (auth) | SQLite + local artifacts |",
        "|---|---|---|",
    ]

    def row(label: str, key: str, nd: int = 1, f: Any = None) -> None:
        def get(r: dict[str, Any] | None) -> str:
            if r is None:
                return "not run"
            return _fmt(f(r) if f else r.get(key), nd)

        lines.append(f"| {label} | {get(pg)} | {get(sq)} |")

    row("files / points pushed", "", f=lambda r: f"{r['files']} / {r['points']:,}")
    row("wall time, s", "wall_s")
    row("points/s (total)", "points_per_s", 0)
    row("files/s (total)", "files_per_s", 2)
    row("processed -> run FINISHED p50, s (clients on the same cores)", "latency_p50_s")
    row("processed -> run FINISHED p95, s (clients on the same cores)", "latency_p95_s")
    row("server CPU-s (all services)", "", f=lambda r: f"{sum(r['server_cpu_s'].values()):.1f}")
    row(
        "  of which",
        "",
        f=lambda r: ", ".join(f"{k} {v:.1f}" for k, v in r["server_cpu_s"].items()),
    )
    row("server CPU-s per 1,000 points", "cpu_per_1000_points", 2)
    row("server CPU-s per file run", "cpu_per_file_run", 2)
    row("sync once passes (max per device)", "passes_max", 0)
    row("errors by kind (client)", "", f=lambda r: ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "none")
    row("server log", "", f=lambda r: ", ".join(f"{k} {v}" for k, v in r["server_log"].items() if v) or "clean")
    row(
        "runs: missing / duplicate / not FINISHED",
        "",
        f=lambda r: "{missing_runs} / {duplicate_runs} / {runs_not_finished}".format(**r["checks"]),
    )
    row(
        "files whose points differ / points undelivered",
        "",
        f=lambda r: "{points_differ} / {points_undelivered}".format(**r["checks"]),
    )
    row("predictions CSVs stored", "", f=lambda r: f"{r['checks']['csv_artifacts']} of {r['files']}")
    if idle:
        lines.append(
            f"| idle pass (heartbeat only): server CPU-s per device pass | {idle['cpu_per_pass']:.3f} "
            f"(errors: {idle['errors'] or 'none'}) | |"
        )
    if rel:
        lines += [
            "",
            f"release {rel['tag']} to s3:// (SeaweedFS) in {rel['release_s']:.1f} s; {rel['activated']} of "
            f"{rel['devices']} devices activated it, pulling at the same moment (clients on the same cores): "
            f"release -> activation p50 {_fmt(rel['release_to_activation_p50_s'])} s, "
            f"p95 {_fmt(rel['release_to_activation_p95_s'])} s, max {_fmt(rel['release_to_activation_max_s'])} s; "
            f"object store CPU {rel['s3_cpu_s']:.1f} s; errors: {rel['errors'] or 'none'}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--pull-one"]:
        return pull_one()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("har_edge", "urllib3", "botocore", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    phases = {"postgresql", "idle", "release", "sqlite"}
    if "--phases" in argv:
        phases = set(argv[argv.index("--phases") + 1].split(","))
    from bench.mlflow_server import MlflowServer
    from har_edge.central.stack import CentralStack, StackOptions

    WORK.mkdir(parents=True, exist_ok=True)
    log.info("filling %d outboxes (once; cached in %s)", N, FIXTURE)
    dirs, fill_s = fill(N)
    first = outbox_files(dirs[0])
    res: dict[str, Any] = {
        "devices": N,
        "files_per_device": FILES,
        "minutes_per_export": MINUTES,
        "workers": WORKERS,
        "cores": os.cpu_count(),
        "fixture": {
            "fill_s": fill_s,
            "points_per_file": statistics.mean(f["points"] for f in first),
            "windows_per_file": int(MINUTES * 30),
        },
    }
    shutil.rmtree(WORK / "central", ignore_errors=True)
    stack = CentralStack(WORK / "central", StackOptions(workers=WORKERS, auth=True, auth_cache_ttl_s=AUTH_TTL))
    try:
        log.info("starting the central stack (PostgreSQL, SeaweedFS, MLflow --workers %d, basic-auth)", WORKERS)
        res["stack_start_s"] = stack.start()
        target = central_target(stack, N)
        log.info("postgresql: %d devices push at once", N)
        res["postgresql"] = push_phase(target, dirs)
        log.info("postgresql: %s", json.dumps(res["postgresql"]))
        if "idle" in phases:
            log.info("idle pass")
            res["idle"] = idle_phase(target)
        if "release" in phases:
            log.info("release to S3 and %d pulls at once", N)
            res["release"] = release_phase(stack, N)
            log.info("release: %s", json.dumps(res["release"]))
    finally:
        stack.stop()
    if "sqlite" in phases:
        shutil.rmtree(WORK / "sqlite-server", ignore_errors=True)
        server = MlflowServer(WORK / "sqlite-server", workers=WORKERS)
        try:
            log.info("starting mlflow server on SQLite (--workers %d)", WORKERS)
            server.start()
            log.info("sqlite: %d devices push at once", N)
            res["sqlite"] = push_phase(sqlite_target(server), dirs)
            log.info("sqlite: %s", json.dumps(res["sqlite"]))
        finally:
            server.stop()
    OUT.write_text(json.dumps(res, indent=2, default=str))
    print(table(res))
    print(f"\nraw figures: {OUT}")
    pg = res["postgresql"]["checks"]
    bad = pg["missing_runs"] or pg["duplicate_runs"] or pg["runs_not_finished"] or pg["points_differ"]
    bad = bad or pg["points_undelivered"] or res["postgresql"]["errors"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Real components for the sync tests: a model registry (bare git repo + working clone + local DVC
remote, released the way ``har-train release`` does it) and an outbox filled like the agent fills it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from har_edge.agent.manifest import read_manifest
from har_edge.agent.model import BUNDLED_MODEL_DIR
from har_edge.agent.outbox import FileRecord, Outbox
from har_edge.agent.summary import minute_points, summary_points
from har_edge.common.hashing import sha256_file
from har_edge.common.versions import parse_version
from har_edge.sync import runs

MODEL_NAME = "har-cnn"
T0_MS = 1_742_802_739_000  # 2025-03-24T07:52:19Z

#: the bundled model (replaced by trained ones over time: tests read it, never assume its version or labels)
BUNDLED = read_manifest(BUNDLED_MODEL_DIR)


def release_version(n: int) -> str:
    """The n-th test release, above whatever version the bundled model has (so "newer" means newer)."""
    key = parse_version(BUNDLED.version)
    major = key.core[0] + 1 if key else 1
    return f"{major}.{n}.0"


@pytest.fixture(autouse=True)
def restore_mlflow_env(monkeypatch):
    """Settings write MLflow's variables into the process environment (that is how MLflow reads them);
    put them back after each test so other modules' MLflow clients keep their own time-outs."""
    from har_edge.sync.mlflow_client import ENV_NAMES

    for name in ENV_NAMES:
        absent = name not in os.environ
        monkeypatch.setenv(name, os.environ.get(name, ""))  # records the value before the test (or none)
        if absent:
            monkeypatch.delenv(name)


# -- model folders ---------------------------------------------------------------------------


def make_model_folder(dest: Path, version: str, *, name: str = MODEL_NAME, variant: str = "good") -> Path:
    """A valid model folder made from the bundled one, with its own model.tflite bytes, then spoiled per ``variant``.

    variants: good | bad_sha (manifest names another sha256) | window (manifest window 50 longer than the
    model's input) | labels (one label more than outputs) | golden (expected outputs that the model does not
    reproduce; golden sha256 updated, so only the golden check catches it).
    """
    shutil.copytree(BUNDLED_MODEL_DIR, dest)
    # trailing bytes keep the flatbuffer valid but give each version its own sha256 and DVC object
    with open(dest / "model.tflite", "ab") as f:
        f.write(f"har-edge-test {name} {version}".encode().ljust(32, b"\0"))
    m = json.loads((dest / "manifest.json").read_text())
    m["name"], m["version"] = name, version
    m["sha256"] = sha256_file(dest / "model.tflite")
    if variant == "bad_sha":
        m["sha256"] = hashlib.sha256(b"another model").hexdigest()
    elif variant == "window":
        m["window"] = m["window"] + 50
    elif variant == "labels":
        m["labels"] = m["labels"] + ["jumping_jacks"]
    elif variant == "golden":
        with np.load(dest / "golden.npz") as g:
            windows, probs = g["windows"], g["probs"]
        probs = np.roll(probs, 1, axis=1)  # every expected label moves to the next class
        buf = io.BytesIO()
        np.savez(buf, windows=windows, probs=probs)
        (dest / "golden.npz").write_bytes(buf.getvalue())
        m["golden"]["sha256"] = sha256_file(dest / "golden.npz")
    elif variant != "good":
        raise ValueError(f"unknown variant {variant}")
    (dest / "manifest.json").write_text(json.dumps(m, indent=2))
    return dest


def install_local(models_dir: Path, version: str, *, previous: str | None = None) -> None:
    """Put a good version under models/ and point current at it, as if sync had activated it earlier."""
    from har_edge.agent.modelstore import set_pointer

    models_dir.mkdir(parents=True, exist_ok=True)
    make_model_folder(models_dir / version, version)
    set_pointer(models_dir, version)
    if previous:
        set_pointer(models_dir, previous, "previous")


# -- registry ----------------------------------------------------------------------------------


# DVC run in a child process: in-process it installs console handlers (and colorama) bound to the
# streams pytest captures, which break later tests. One child does a whole series of releases.
_RELEASE_SCRIPT = r"""
import json, shutil, subprocess, sys
from pathlib import Path
from dvc.repo import Repo

job = json.loads(sys.argv[1])
work = Path(job["work"])
def git(*a):
    subprocess.run(["git", "-c", "user.name=trainer", "-c", "user.email=trainer@example.org", *a],
                   cwd=work, check=True, capture_output=True)
if job.get("init"):
    with Repo.init(str(work)) as repo:
        with repo.config.edit() as c:
            c["core"]["remote"] = "store"
            c["core"]["check_update"] = False
            c["core"]["analytics"] = False
            c["remote"]["store"] = {"url": job["store"]}
    git("add", "-A"); git("commit", "-qm", "registry"); git("push", "-q", "origin", "main")
for rel in job["releases"]:
    target = work / "models" / job["name"]
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(rel["folder"], target)
    with Repo(str(work)) as repo:
        repo.add([str(target)])
        repo.push()
    git("add", "-A"); git("commit", "-qm", "release " + rel["tag"]); git("tag", "-f", rel["tag"])
    git("push", "-q", "-f", "origin", "main", rel["tag"])
"""


@dataclass
class RegistryRepo:
    """``remote.git`` (bare, what devices read), ``work/`` (the trainer's clone), ``dvcstore/`` (DVC remote)."""

    root: Path
    name: str = MODEL_NAME

    def __post_init__(self) -> None:
        self.remote = self.root / "remote.git"
        self.work = self.root / "work"
        self.store = self.root / "dvcstore"
        self.staged = self.root / "staged"
        self.root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.remote)], check=True)
        subprocess.run(["git", "clone", "-q", str(self.remote), str(self.work)], check=True, capture_output=True)
        self._initialized = False
        self.folders: dict[str, Path] = {}

    @property
    def url(self) -> str:
        return str(self.remote)

    def release_many(self, versions: list[tuple[str, str]], prepare=None) -> list[str]:
        """Release (version, variant) pairs in order: copy to models/<name>, dvc add + push, commit, tag, push.

        ``prepare(folder, version)``, when given, changes each model folder before it is released (signs it).
        """
        import sys

        releases = []
        for version, variant in versions:
            folder = self.staged / f"{version}-{len(releases)}"
            shutil.rmtree(folder, ignore_errors=True)
            make_model_folder(folder, version, name=self.name, variant=variant)
            if prepare is not None:
                prepare(folder, version)
            self.folders[version] = folder
            releases.append({"tag": f"{self.name}@v{version}", "folder": str(folder)})
        job = {
            "work": str(self.work),
            "store": str(self.store),
            "name": self.name,
            "init": not self._initialized,
            "releases": releases,
        }
        env = dict(os.environ, DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(self.root / "dvc-site"))
        res = subprocess.run(
            [sys.executable, "-c", _RELEASE_SCRIPT, json.dumps(job)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if res.returncode != 0:
            raise RuntimeError(f"release failed: {res.stderr[-3000:]}")
        self._initialized = True
        return [r["tag"] for r in releases]

    def release(self, version: str, variant: str = "good", prepare=None) -> str:
        return self.release_many([(version, variant)], prepare)[0]

    def object_path(self, data: bytes) -> Path:
        md5 = hashlib.md5(data).hexdigest()
        return self.store / "files" / "md5" / md5[:2] / md5[2:]

    def corrupt(self, version: str) -> Path:
        """Flip one byte of the stored model.tflite object of a released version (it is the only one using it)."""
        model = self.folders[version] / "model.tflite"
        path = self.object_path(model.read_bytes())
        path.chmod(0o644)
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
        return path


# -- outbox ----------------------------------------------------------------------------------------


def add_file(
    ob: Outbox,
    seed: int,
    *,
    minutes: int = 10,
    labels: list[str] | None = None,
    model_version: str | None = None,
    model_sha256: str | None = None,
    model_name: str | None = None,
    status: str = "processed",
    error_kind: str | None = None,
    confidence: float | None = None,
    processed_ms: int | None = None,
    quality: dict[str, float] | None = None,
) -> int:
    """Store one file the way the agent does (windows every 2 s, summary and per-minute points)."""
    from har_edge.agent.outbox import now_ms

    labels = labels or list(BUNDLED.labels)
    rng = np.random.default_rng(seed)
    processed_ms = processed_ms if processed_ms is not None else now_ms()
    rec = FileRecord(
        sha256=hashlib.sha256(f"file-{seed}".encode()).hexdigest(),
        name=f"rec-{seed:04d}.fit",
        size=1000 + seed,
        status=status,
        received_ms=processed_ms - 500,
        processed_ms=processed_ms,
        agent_version="test",
        format="fit",
        model_name=model_name or BUNDLED.name,
        model_version=model_version or BUNDLED.version,
        model_sha256=model_sha256 or BUNDLED.sha256,
        error_kind=error_kind,
        error_message=error_kind and f"{error_kind} (test)",
    )
    if status != "processed":
        return ob.record_file(rec)
    n = minutes * 30
    probs = rng.dirichlet(np.ones(len(labels)) * 0.3, size=n).astype(np.float32)
    if confidence is not None:  # every window this confident in a random label
        probs = np.full((n, len(labels)), (1 - confidence) / (len(labels) - 1), np.float32)
        probs[np.arange(n), rng.integers(0, len(labels), n)] = confidence
    starts = T0_MS + seed * 86_400_000 + np.arange(n, dtype=np.int64) * 2000
    points = summary_points(
        label_names=labels,
        probs=probs,
        step_s=2.0,
        low_confidence=0.6,
        per_window_s=[0.001] * n,
        timings={"decode": 0.1, "preprocess": 0.05, "inference": 0.02},
        quality={"coverage": 1.0, **(quality or {})},
        timestamp_ms=processed_ms,
    ) + minute_points(label_names=labels, start_ms=starts, probs=probs)
    return ob.record_file(rec, label_names=labels, start_ms=starts, probs=probs, points=points)


def sqlite_ids(ob: Outbox, sql: str) -> list:
    with ob.engine.connect() as c:
        return [tuple(r) for r in c.exec_driver_sql(sql).all()]


# -- MLflow checks ----------------------------------------------------------------------------------


def file_runs(p) -> dict[str, list]:
    """sha256 -> runs carrying it (must be exactly one each)."""
    out: dict[str, list] = {}
    for r in p.client.search_runs([p.experiment_id()], f"tags.`{runs.KIND}` = 'file'", max_results=1000):
        out.setdefault(r.data.tags[runs.FILE_SHA], []).append(r)
    return out


def history(client, run_id: str) -> Counter:
    run = client.get_run(run_id)
    got = Counter()
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            got[(m.key, m.value, m.timestamp, m.step)] += 1
    return got


def outbox_points(ob: Outbox, file_id: int | None) -> Counter:
    return Counter((p.key, p.value, p.timestamp_ms, p.step) for p in ob.file_metrics(file_id))


def db_history(db: Path, run_id: str) -> Counter:
    """Every metric row MLflow stored for a run, read from its backend database (duplicates included)."""
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT key, value, timestamp, step FROM metrics WHERE run_uuid = ?", (run_id,)).fetchall()
    finally:
        con.close()
    return Counter((k, float(v), int(ts), int(step)) for k, v, ts, step in rows)


def assert_delivered_once(p, db: Path) -> None:
    """Every processed file: one FINISHED run whose stored metric rows equal the outbox points, none twice.

    ``db`` is the MLflow backend store (the server's or the embedded one): reading it shows every row,
    where the REST API would need one request per metric key.
    """
    ob = p.outbox
    by_sha = file_runs(p)
    processed = sqlite_ids(ob, "SELECT id, sha256, run_id, name FROM files WHERE status = 'processed'")
    assert len(by_sha) == len(processed)
    for fid, sha, run_id, name in processed:
        (run,) = by_sha[sha]
        assert run.info.run_id == run_id and run.info.status == "FINISHED"
        assert run.data.tags[runs.FILE_NAME] == name and run.data.tags[runs.DEVICE] == p.device
        assert db_history(db, run_id) == outbox_points(ob, fid)
    pending = sqlite_ids(ob, "SELECT count(*) FROM metrics WHERE delivered_ms IS NULL")[0][0]
    assert pending == 0


def sync_senders() -> list[str]:
    """The sync pass's sending threads still alive (har_edge.sync.filepipe names them ``har-edge-sync-*``)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("har-edge-sync-")]

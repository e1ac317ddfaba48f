"""The agent under failure, on real FIT files, real SQLite, the real TFLite runtime and real processes:
one file's failure stays that file's, crash loops end in quarantine, files still being written are never
taken, a full disk pauses, and every commit is on disk before the file it describes is moved."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fitgen import write_imu_fit

from har_edge.agent.daemon import Agent
from har_edge.agent.errors import DiskFull
from har_edge.agent.model import LoadedModel
from har_edge.agent.outbox import FileRecord, Outbox
from har_edge.agent.preprocess import merge_quality
from har_edge.agent.settings import load_settings

START = datetime(2025, 3, 24, 7, 52, 19, tzinfo=UTC)


@pytest.fixture
def walk_fit(tmp_path) -> Path:
    p = tmp_path / "src" / "walk.fit"
    p.parent.mkdir()
    write_imu_fit(p, rate_hz=50, seconds=120, start=START)
    return p


def _steps(agent: Agent, passes: int = 3, t0: float = 1e9):
    out = []
    for i in range(passes):
        out += agent.step(now=t0 + i * 1000)
    return out


def _rows(ob: Outbox, sql: str) -> list[tuple]:
    with ob.engine.connect() as c:
        return [tuple(r) for r in c.exec_driver_sql(sql).all()]


# -- one file's failure stays that file's ----------------------------------------------------------------


def test_a_bug_in_inference_quarantines_that_file_only(settings, walk_fit, monkeypatch):
    """A bug cannot be made to happen for real: predict raises once, as a bug in it would."""
    real = LoadedModel.predict_scaled  # what the pipeline calls for each batch
    calls = {"n": 0}

    def buggy(self, *a, **k):
        timed = len(a) > 1 and a[1] is not None  # the pipeline's calls (with timings), not the golden check at load
        calls["n"] += timed
        if calls["n"] == 1 and timed:
            raise ZeroDivisionError("division by zero")
        return real(self, *a, **k)

    monkeypatch.setattr(LoadedModel, "predict_scaled", buggy)
    agent = Agent(settings)
    shutil.copy(walk_fit, agent.folder.inbox / "a.fit")
    write_imu_fit(agent.folder.inbox / "b.fit", rate_hz=50, seconds=60, start=START, seed=4)
    outcomes = {o.name: o for o in _steps(agent)}
    assert outcomes["a.fit"].status == "failed" and outcomes["a.fit"].error.kind == "internal"
    assert outcomes["b.fit"].status == "processed"
    reason = json.loads((agent.folder.quarantine / "a.fit.reason.json").read_text())
    assert reason["kind"] == "internal" and reason["stage"] == "inference"
    assert "ZeroDivisionError" in reason["message"] and "in buggy" in reason["traceback"]
    row = agent.outbox.file(outcomes["a.fit"].file_id)
    assert (row.status, row.error_kind, row.error_stage) == ("failed", "internal", "inference")
    assert _rows(agent.outbox, "SELECT count(*) FROM attempts") == [(0,)]


def test_a_bug_in_decoding_records_the_decode_stage(settings, walk_fit, monkeypatch):
    import har_edge.agent.pipeline as pipeline

    def broken(*a, **k):
        raise KeyError("oops")

    monkeypatch.setattr(pipeline, "open_export", broken)
    agent = Agent(settings)
    shutil.copy(walk_fit, agent.folder.inbox / "walk.fit")
    (o,) = _steps(agent)
    assert o.status == "failed" and o.error.kind == "internal"
    assert agent.outbox.file(o.file_id).error_stage == "decode"
    assert (agent.folder.quarantine / "walk.fit").exists()


def test_dedup_is_queried_once_per_file(settings, walk_fit):
    agent = Agent(settings)
    calls = []
    real = agent.outbox.processed_file
    agent.outbox.processed_file = lambda sha: calls.append(sha) or real(sha)  # a spy, the real query runs
    shutil.copy(walk_fit, agent.folder.inbox / "walk.fit")
    (o,) = _steps(agent)
    assert o.status == "processed" and len(calls) == 1


def test_quality_figures_merge_by_preprocess_rules():
    total: dict[str, float] = {}
    merge_quality(total, {"gaps": 2, "duration_s": 10.0, "coverage": 0.5, "native_rate_hz": 50.0})
    merge_quality(total, {"gaps": 1, "duration_s": 5.0, "coverage": 0.9, "native_rate_hz": 25.0})
    assert total == {"gaps": 3, "duration_s": 15.0, "coverage": 0.9, "native_rate_hz": 25.0}


# -- crash loops: real processes killed at one point ------------------------------------------------------

_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from har_edge.agent.daemon import Agent
    from har_edge.agent.model import LoadedModel
    from har_edge.agent.settings import load_settings

    data_dir, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    real, calls = LoadedModel.predict_scaled, [0]  # what the pipeline calls for each batch

    def predict(self, *a, **k):
        timed = len(a) > 1 and a[1] is not None  # the pipeline's calls (with timings), not the golden check at load
        calls[0] += timed
        if calls[0] == kill_at and timed:  # dies here, as a segfault or an OOM kill would
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *a, **k)

    LoadedModel.predict_scaled = predict
    agent = Agent(load_settings(env={}, data_dir=data_dir, agent={"settle_s": 0}))
    out = agent.recover()
    print(";".join(f"{o.name}:{o.status}:{o.error.kind if o.error else ''}" for o in out))
    """
)


def _run_killer(data_dir: Path, kill_at: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run(
        [sys.executable, "-c", _KILLER, str(data_dir), str(kill_at)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _attempts(data_dir: Path) -> list[tuple]:
    con = sqlite3.connect(data_dir / "outbox.sqlite")
    try:
        return con.execute("SELECT stage, progress FROM attempts ORDER BY id").fetchall()
    finally:
        con.close()


@pytest.mark.slow
def test_a_file_that_kills_the_agent_at_one_point_is_quarantined_after_max_attempts(tmp_path, walk_fit):
    data_dir = tmp_path / "var"
    (data_dir / "work").mkdir(parents=True)
    shutil.copy(walk_fit, data_dir / "work" / "walk.fit")  # claimed by a run that then died
    for i in range(3):
        r = _run_killer(data_dir, kill_at=1)
        assert r.returncode == -9, r.stderr
        assert len(_attempts(data_dir)) == i + 1
    points = _attempts(data_dir)
    assert len(set(points)) == 1 and points[0][0] == "inference"
    r = _run_killer(data_dir, kill_at=0)  # the 4th start does not try again
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "walk.fit:failed:internal"
    reason = json.loads((data_dir / "quarantine" / "walk.fit.reason.json").read_text())
    assert reason["kind"] == "internal" and "died 3 times in a row in inference" in reason["message"]
    ob = Outbox(data_dir / "outbox.sqlite")
    assert _rows(ob, "SELECT status, error_kind, error_stage FROM files") == [("failed", "internal", "inference")]
    assert _rows(ob, "SELECT count(*) FROM attempts") == [(0,)]


@pytest.mark.slow
def test_kills_of_a_large_good_file_at_different_points_never_quarantine_it(tmp_path):
    data_dir = tmp_path / "var"
    (data_dir / "work").mkdir(parents=True)
    write_imu_fit(data_dir / "work" / "long.fit", rate_hz=50, seconds=1200, start=START)
    for kill_at in (1, 4, 7):
        assert _run_killer(data_dir, kill_at).returncode == -9
    points = _attempts(data_dir)
    assert len(points) == 3 and len(set(points)) == 3, points  # three different points: progress each time
    r = _run_killer(data_dir, kill_at=0)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "long.fit:processed:"
    ob = Outbox(data_dir / "outbox.sqlite")
    assert _rows(ob, "SELECT status, windows FROM files") == [("processed", 599)]
    assert list((data_dir / "archive").rglob("long.fit"))


# -- health: internal failures count against a model only in inference ----------------------------------


def test_health_counts_internal_failures_only_in_inference(tmp_path):
    from har_edge.sync.health import judge
    from har_edge.sync.state import Probation

    settings = load_settings(env={}, data_dir=tmp_path, sync={"health_files": 2, "health_max_failed_share": 0.4})
    ob = Outbox(settings.outbox_path)
    p = Probation(folder="2.0.0", version="2.0.0", sha256="m" * 64, since_ms=0)

    def failed(seed: int, stage: str) -> None:
        ob.record_file(
            FileRecord(
                sha256=f"{seed:064d}",
                name=f"f{seed}.fit",
                size=1,
                status="failed",
                received_ms=1,
                processed_ms=10 + seed,
                agent_version="t",
                model_sha256=p.sha256,
                error_kind="internal",
                error_stage=stage,
            )
        )

    failed(1, "decode")
    failed(2, "store")
    assert judge(ob, p, settings.sync).state == "pending"  # not the model's fault: not judged
    failed(3, "inference")
    failed(4, "inference")
    v = judge(ob, p, settings.sync)
    assert v.state == "failed" and "internal" in v.reason


# -- never take a file that may still be written ---------------------------------------------------------


def test_a_copy_that_pauses_before_writing_is_taken_whole(tmp_path, walk_fit):
    """``(sleep 4; cat walk.fit) > inbox/walk.fit`` with settle_s 2: the empty file is not taken."""
    settings = load_settings(env={}, data_dir=tmp_path / "var", agent={"settle_s": 2.0})
    agent = Agent(settings)
    dest = agent.folder.inbox / "walk.fit"
    writer = subprocess.Popen(["sh", "-c", f'(sleep 4; cat "{walk_fit}") > "{dest}"'])
    outcomes: list = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not outcomes:
        outcomes += agent.step()
        time.sleep(0.1)
    assert writer.wait(timeout=10) == 0
    assert [(o.status, o.windows) for o in outcomes] == [("processed", 59)]
    assert not list(agent.folder.quarantine.iterdir())


def test_a_file_too_short_to_identify_is_never_complete(settings):
    agent = Agent(settings)
    (agent.folder.inbox / "empty.fit").write_bytes(b"")
    (agent.folder.inbox / "tiny.csv").write_bytes(b"t,x\n")
    assert agent.step(now=100.0) == [] and agent.step(now=150.0) == []
    assert sorted(p.name for p in agent.folder.inbox.iterdir()) == ["empty.fit", "tiny.csv"]


def test_the_stale_timer_of_an_incomplete_file_survives_a_restart(settings, walk_fit):
    agent = Agent(settings)
    part = agent.folder.inbox / "partial.fit"
    part.write_bytes(walk_fit.read_bytes()[:5000])
    assert agent.step(now=100.0) == []
    ((name, first),) = _rows(agent.outbox, "SELECT name, first_seen_ms FROM inbox_seen")
    assert name == "partial.fit" and abs(first - time.time() * 1000) < 60_000
    agent.outbox.close()
    # a restart: the new process sees the file for the first time, the outbox remembers since when
    again = Agent(settings)
    assert again.step(now=5.0) == []  # not stale yet
    stale_ms = int(again.folder.stale_s * 1000) + 1000
    with again.outbox.transaction() as c:
        c.exec_driver_sql(f"UPDATE inbox_seen SET first_seen_ms = first_seen_ms - {stale_ms}")
    again.outbox.close()
    third = Agent(settings)
    (o,) = third.step(now=5.0)  # first sight in this process, yet stale by the stored time
    assert o.status == "failed" and o.error.kind == "corrupt"
    assert third.step(now=6.0) == []
    assert _rows(third.outbox, "SELECT count(*) FROM inbox_seen") == [(0,)]  # forgotten once gone


def test_an_incomplete_file_found_in_work_waits_in_the_inbox(settings, walk_fit):
    agent = Agent(settings)
    (agent.folder.work / "cut.fit").write_bytes(walk_fit.read_bytes()[:7000])
    assert agent.recover() == []
    assert (agent.folder.inbox / "cut.fit").exists() and not list(agent.folder.quarantine.iterdir())
    with open(agent.folder.inbox / "cut.fit", "ab") as f:  # the writer finishes
        f.write(walk_fit.read_bytes()[7000:])
    (o,) = _steps(agent)
    assert o.status == "processed" and o.windows == 59


def test_scratch_and_sync_temp_leftovers_are_cleaned_at_start(settings):
    import fcntl

    scratch = settings.work / ".scratch" / "export-123"
    scratch.mkdir(parents=True)
    (scratch / "x.fit").write_bytes(b"x" * 100)
    sync_tmp = settings.data_dir / ".sync-tmp" / "tmpab12"
    sync_tmp.mkdir(parents=True)
    (sync_tmp / "predictions.csv").write_text("a")
    lock = settings.data_dir / ".sync-push.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a sync push is running: its folder stays
        Agent(settings).recover()
        assert not scratch.exists() and sync_tmp.exists()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    Agent(settings).recover()
    assert not sync_tmp.exists() and (settings.data_dir / ".sync-tmp").is_dir()


# -- a full disk -----------------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MB tmpfs (root here); skipped, with the reason, where mounting is impossible."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 4 MB tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 16, 4096, 512):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == 28  # ENOSPC


def test_a_full_disk_during_the_store_pauses_and_resumes(small_fs, walk_fit):
    settings = load_settings(
        env={},
        data_dir=small_fs / "var",
        agent={"settle_s": 0, "disk_full_retry_s": 30, "min_free_mb": 0},  # reach ENOSPC itself
    )
    agent = Agent(settings)
    shutil.copy(walk_fit, agent.folder.inbox / "walk.fit")
    filler = small_fs / "filler"
    real = agent.processor.on_stage
    filled = []

    def fill_on_store(stage: str, progress: int) -> None:
        real(stage, progress)
        if stage == "store" and not filled:
            filled.append(1)
            _fill(filler)  # the disk fills while the file's transaction is about to be written

    agent.processor.on_stage = fill_on_store
    assert agent.step(now=100.0) == []
    assert agent.waiting_for_disk
    assert (agent.folder.work / "walk.fit").exists()  # left where it was, to retry
    assert _rows(agent.outbox, "SELECT count(*) FROM files") == [(0,)]
    assert _rows(agent.outbox, "SELECT count(*) FROM windows") == [(0,)]
    assert _rows(agent.outbox, "PRAGMA integrity_check") == [("ok",)]
    assert agent.step(now=110.0) == []  # still paused: not retried before disk_full_retry_s
    filler.unlink()  # space returns
    (o,) = agent.step(now=131.0)
    assert o.status == "processed" and o.windows == 59 and not agent.waiting_for_disk
    assert _rows(agent.outbox, "SELECT status, count(*) FROM files GROUP BY status") == [("processed", 1)]
    assert _rows(agent.outbox, "SELECT count(*) FROM attempts") == [(0,)]
    assert list(agent.folder.archive.rglob("walk.fit")) and not (agent.folder.work / "walk.fit").exists()


def test_a_full_disk_fails_a_write_cleanly(small_fs):
    ob = Outbox(small_fs / "o.sqlite")
    _fill(small_fs / "filler")
    import numpy as np

    with pytest.raises(DiskFull, match="disk is full"):
        ob.record_file(
            FileRecord(
                sha256="a" * 64,
                name="x.fit",
                size=1,
                status="processed",
                received_ms=1,
                processed_ms=1,
                agent_version="t",
            ),
            label_names=["a", "b"],
            start_ms=np.arange(5000, dtype=np.int64),
            probs=np.full((5000, 2), 0.5, np.float32),
        )
    assert ob.status_counts()["files"] == {}


# -- power loss: the commit is on disk before the move ----------------------------------------------------

_TRACED = textwrap.dedent(
    """
    import shutil, sys
    from pathlib import Path
    from har_edge.agent.daemon import Agent
    from har_edge.agent.settings import load_settings

    data_dir, src = Path(sys.argv[1]), Path(sys.argv[2])
    agent = Agent(load_settings(env={}, data_dir=data_dir, agent={"settle_s": 0}))
    shutil.copy(src, agent.folder.inbox / "walk.fit")
    print([str(o.status) for o in agent.step(now=1e9)])
    """
)


def _strace() -> str:
    found = shutil.which("strace")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "strace"], capture_output=True, timeout=300)
        found = shutil.which("strace")
    if not found:
        pytest.skip("strace is not installed: apt-get install -y strace")
    return found


def test_the_commit_is_fsynced_before_the_file_is_moved(tmp_path, walk_fit):
    strace = _strace()
    data_dir = tmp_path / "var"
    trace = tmp_path / "trace.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run(
        [
            strace,
            "-f",
            "-y",
            "-o",
            str(trace),
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2",
            sys.executable,
            "-c",
            _TRACED,
            str(data_dir),
            str(walk_fit),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "['processed']" in r.stdout, r.stderr[-2000:]
    lines = trace.read_text().splitlines()

    def first(pred) -> int:
        return next(i for i, s in enumerate(lines) if pred(s))

    claim = first(lambda s: "rename" in s and "inbox/walk.fit" in s and "work/walk.fit" in s)
    archive = first(lambda s: "rename" in s and "work/walk.fit" in s and "archive/" in s)
    wal_syncs = [i for i, s in enumerate(lines) if "sync(" in s and "outbox.sqlite-wal>" in s]
    assert any(claim < i < archive for i in wal_syncs), "no fsync of the outbox between claim and archive"
    # the rename itself is made durable: the archive folder is fsynced after it
    day = Path(lines[archive].split('"')[-2]).parent
    assert any(i > archive and "fsync(" in s and f"{day}>" in s for i, s in enumerate(lines)), lines[archive:]

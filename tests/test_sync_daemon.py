"""The daemon: back-off, the schedule, kill -9 and SIGTERM of `sync run`, and `sync once` as a person runs it."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sync_helpers import (
    RegistryRepo,
    add_file,
    assert_delivered_once,
    release_version,
    restore_mlflow_env,  # noqa: F401 - autouse fixture
    sqlite_ids,
)

from har_edge.agent.outbox import Outbox
from har_edge.agent.settings import load_settings
from har_edge.sync.daemon import SyncDaemon
from har_edge.sync.errors import ServerUnreachable
from har_edge.sync.push import Pusher
from har_edge.sync.retry import Backoff


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets():
    b = Backoff(10, 60, jitter=0.5, rng=random.Random(7))
    delays = [b.failed(1000.0) for _ in range(6)]
    for n, d in enumerate(delays):
        full = min(60, 10 * 2**n)
        assert full / 2 <= d <= full
    assert not b.ready(1000.0) and b.ready(1000.0 + delays[-1])
    b.succeeded()
    assert b.ready(0) and b.failures == 0


def test_backoff_stays_at_the_cap_after_days_of_failures():
    # at the default 600 s cap, 1024 failures are about five days without a server
    b = Backoff(10, 600, jitter=0.5, rng=random.Random(3))
    delays = [b.failed(1000.0) for _ in range(2000)]
    assert all(300 <= d <= 600 for d in delays[-1000:])
    assert b.failures == 2000 and not b.ready(1000.0) and b.ready(1000.0 + delays[-1])


def test_push_job_backs_off_while_the_server_is_unreachable(data_dir):
    settings = load_settings(
        env={},
        data_dir=data_dir,
        device_id="dev-backoff",
        sync={"tracking_uri": f"http://127.0.0.1:{_closed_port()}", "backoff_initial_s": 10},
    )
    ob = Outbox(settings.outbox_path)
    add_file(ob, 1, minutes=2)
    d = SyncDaemon(settings, outbox=ob, rng=random.Random(1))
    now = 1_000_000.0
    first = d.push_job(now)
    assert first.ran and isinstance(first.error, ServerUnreachable) and 5 <= first.retry_in_s <= 10
    assert not d.push_job(now + 1).ran  # waits, whatever the schedule says
    second = d.push_job(now + first.retry_in_s)
    assert second.ran and 10 <= second.retry_in_s <= 20
    assert sqlite_ids(ob, "SELECT count(*) FROM metrics WHERE delivered_ms IS NOT NULL") == [(0,)]


def test_jobs_are_scheduled_one_instance_at_a_time_coalesced_with_jitter(data_dir):
    settings = load_settings(
        env={}, data_dir=data_dir, sync={"push_interval_s": 20, "pull_interval_s": 600, "jitter_s": 3}
    )
    sched = SyncDaemon(settings).scheduler()
    jobs = {j.id: j for j in sched.get_jobs()}
    assert set(jobs) == {"push", "pull", "health"}
    for job in jobs.values():
        assert job.max_instances == 1 and job.coalesce is True
    assert jobs["push"].trigger.interval.total_seconds() == 20 and jobs["push"].trigger.jitter == 3
    assert jobs["pull"].trigger.interval.total_seconds() == 600


# -- the command line in a child process ------------------------------------------------------------------


def _env(data_dir: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HAR_EDGE_", "MLFLOW_TRACKING"))}
    env.update(HAR_EDGE_DATA_DIR=str(data_dir), HAR_EDGE_LOG_LEVEL="INFO")
    env.update({f"HAR_EDGE_{k.upper()}": v for k, v in settings.items()})
    return env


def _cli(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "har_edge.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _start(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "har_edge.cli", *args],
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _delivered(ob: Outbox) -> int:
    return sqlite_ids(ob, "SELECT count(*) FROM metrics WHERE delivered_ms IS NOT NULL")[0][0]


def _wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"sync run exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)


@pytest.mark.server
@pytest.mark.slow
def test_kill_9_mid_push_then_sigterm_then_once_delivers_everything_once(mlflow_server, data_dir, tmp_path):
    device = f"dev-{uuid.uuid4().hex[:6]}"
    experiment = f"test-kill-{uuid.uuid4().hex[:6]}"
    env = _env(
        data_dir,
        device_id=device,
        sync__tracking_uri=mlflow_server.url,
        sync__experiment=experiment,
        sync__request_timeout_s="30",
        sync__push_interval_s="0.5",
        sync__jitter_s="0",
        sync__batch_size="25",
        sync__pull_interval_s="3600",
    )
    ob = Outbox(data_dir / "outbox.sqlite")
    for seed in range(8):
        add_file(ob, seed, minutes=40)
    ob.record_deployment(from_version="0.1.0", to_version="99.0.0", outcome="activated")
    total = sqlite_ids(ob, "SELECT count(*) FROM metrics")[0][0]
    log = tmp_path / "sync.log"

    # 1. kill -9 while it pushes
    proc = _start("sync", "run", env=env, log=log)
    _wait_for(lambda: _delivered(ob) >= 300, proc, log)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    after_kill = _delivered(ob)
    assert after_kill < total

    # 2. restart, then SIGTERM while it pushes: it finishes the request in flight, marks it, exits 0
    proc = _start("sync", "run", env=env, log=log)
    _wait_for(lambda: _delivered(ob) >= after_kill + 300, proc, log)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    stopped_in = time.monotonic() - t0
    text = log.read_text()
    assert "received SIGTERM" in text and "sync daemon stopped" in text
    assert _delivered(ob) < sqlite_ids(ob, "SELECT count(*) FROM metrics")[0][0]  # it did stop early

    # 3. `sync once` (what `make sync` runs) delivers the rest
    res = _cli("sync", "once", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "pushed to http://127.0.0.1" in res.stdout and "still pending: 0 files, 0 points" in res.stdout

    settings = load_settings(
        env={}, data_dir=data_dir, device_id=device, sync={"tracking_uri": mlflow_server.url, "experiment": experiment}
    )
    p = Pusher(settings, ob)
    # one run per file, every history equal to the outbox: nothing twice
    assert_delivered_once(p, mlflow_server.root / "mlflow.db")
    print(f"\n[measure] SIGTERM to exit {stopped_in:.2f} s")


@pytest.mark.slow
def test_sync_once_on_a_fresh_machine_pushes_locally_and_pulls_a_release(data_dir, tmp_path):
    reg = RegistryRepo(tmp_path / "registry")
    reg.release(release_version(0))
    ob = Outbox(data_dir / "outbox.sqlite")
    add_file(ob, 1, minutes=3)
    ob.close()
    env = _env(data_dir, device_id="dev-once", sync__registry=reg.url)
    res = _cli("sync", "once", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"pushed to sqlite:///{data_dir.resolve()}/mlflow/mlflow.db: 1 file run(s) finished" in res.stdout
    assert f"models: activated {release_version(0)}" in res.stdout
    assert os.readlink(data_dir / "models" / "current") == release_version(0)


def test_sync_once_exits_3_when_the_configured_server_cannot_be_reached(data_dir):
    Outbox(data_dir / "outbox.sqlite").close()
    env = _env(
        data_dir,
        sync__tracking_uri=f"http://127.0.0.1:{_closed_port()}",
        sync__registry=str(data_dir / "missing-registry.git"),
    )
    res = _cli("sync", "once", env=env, timeout=120)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "could not be reached" in res.stdout and "could not be listed" in res.stdout

"""``har-edge doctor``: each check's OK and FAIL path, on real files, real processes and real sockets."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sync_helpers import release_version, restore_mlflow_env  # noqa: F401 - an autouse fixture: MLflow's env back

from har_edge import doctor
from har_edge.agent.model import BUNDLED_MODEL_DIR
from har_edge.agent.modelstore import set_pointer
from har_edge.agent.outbox import SCHEMA_VERSION as OUTBOX_SCHEMA
from har_edge.agent.outbox import Outbox
from har_edge.agent.settings import load_settings


def _settings(data_dir: Path, **over):
    return load_settings(env={}, data_dir=data_dir, **over)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str, data_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "har_edge.cli", "doctor", "--data-dir", str(data_dir), *args],
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=300,
    )


# -- settings -------------------------------------------------------------------------------------


def test_settings_ok_and_a_device_id_sync_cannot_use(tmp_path):
    assert doctor.check_settings(_settings(tmp_path)).status == doctor.OK
    r = doctor.check_settings(_settings(tmp_path, device_id='lab "7"'))
    assert r.status == doctor.FAIL and "device_id" in r.fix


# -- data dir -------------------------------------------------------------------------------------


def test_data_dir_writable_and_free_space(tmp_path):
    r = doctor.check_data_dir(tmp_path / "var")
    assert r.status == doctor.OK and "writable" in r.message and (tmp_path / "var").is_dir()
    assert not [p for p in (tmp_path / "var").iterdir()]  # the probe file is gone
    r = doctor.check_data_dir(tmp_path / "var", min_free=1 << 62)
    assert r.status == doctor.FAIL and "free space" in r.fix
    r = doctor.check_data_dir(tmp_path / "var", budget_bytes=float(1 << 62))
    assert r.status == doctor.WARN and "agent.outbox_max_mb" in r.message


def test_data_dir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = doctor.check_data_dir(blocker / "var")  # its parent is a file: nothing can be created there
    assert r.status == doctor.FAIL and "not writable" in r.message and "HAR_EDGE_DATA_DIR" in r.fix
    if os.geteuid() != 0:  # root writes through file modes; a read-only folder stops everyone else
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert doctor.check_data_dir(ro).status == doctor.FAIL


# -- outbox ---------------------------------------------------------------------------------------


def test_outbox_ok_absent_and_schema_mismatch(tmp_path):
    path = tmp_path / "outbox.sqlite"
    r = doctor.check_outbox(path)
    assert r.status == doctor.OK and "does not exist yet" in r.message and not path.exists()
    Outbox(path).close()
    r = doctor.check_outbox(path)
    assert r.status == doctor.OK and f"quick_check ok, schema version {OUTBOX_SCHEMA}" in r.message
    with sqlite3.connect(path) as c:
        c.execute("UPDATE schema_version SET version = 99")
    r = doctor.check_outbox(path)
    assert r.status == doctor.FAIL and "schema version 99" in r.message


def test_a_corrupted_outbox_fails(tmp_path):
    path = tmp_path / "outbox.sqlite"
    ob = Outbox(path)
    from har_edge.agent.outbox import MetricPoint

    ob.add_metrics([MetricPoint(f"k{i}", float(i), 1_700_000_000_000 + i) for i in range(20000)])
    ob.close()
    with sqlite3.connect(path) as c:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = bytearray(path.read_bytes())
    page = 4096
    assert len(raw) > 20 * page
    for p in range(3, 20):  # scribble over b-tree pages, keep the header readable
        raw[p * page : p * page + 200] = b"\xa5" * 200
    path.write_bytes(bytes(raw))
    r = doctor.check_outbox(path)
    assert r.status == doctor.FAIL and "move outbox.sqlite" in r.fix, r
    path.write_bytes(b"definitely not sqlite" * 300)
    r = doctor.check_outbox(path)
    assert r.status == doctor.FAIL


# -- model ----------------------------------------------------------------------------------------


def test_model_bundled_ok_and_broken_folders_fail(tmp_path, model_copy):
    r = doctor.check_model(_settings(tmp_path / "var"))
    assert r.status == doctor.OK and "bundled" in r.message and "golden" in r.message
    broken = model_copy("broken")
    raw = bytearray((broken / "model.tflite").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (broken / "model.tflite").write_bytes(bytes(raw))
    r = doctor.check_model(_settings(tmp_path / "var", agent={"model_dir": broken}))
    assert r.status == doctor.FAIL and "agent.model_dir" in r.message and "sha256" in r.message.lower()
    # models/current -> a folder without a manifest
    models = tmp_path / "var" / "models"
    (models / "7").mkdir(parents=True)
    shutil.copy(BUNDLED_MODEL_DIR / "model.tflite", models / "7" / "model.tflite")
    set_pointer(models, "7")
    r = doctor.check_model(_settings(tmp_path / "var"))
    assert r.status == doctor.FAIL and "models/current" in r.message and "rollback" in r.fix


# -- MLflow ---------------------------------------------------------------------------------------


def test_mlflow_local_store_is_ok(tmp_path):
    r = doctor.check_mlflow(_settings(tmp_path / "var"))
    assert r.status == doctor.OK and r.message.startswith("local store")


def test_mlflow_on_a_closed_port_fails_quickly(tmp_path, monkeypatch):
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    s = _settings(tmp_path / "var", sync={"tracking_uri": f"http://127.0.0.1:{_closed_port()}"})
    t0 = time.monotonic()
    r = doctor.check_mlflow(s)
    assert r.status == doctor.FAIL and "could not be reached" in r.message and "sync.tracking_uri" in r.fix
    assert time.monotonic() - t0 < 30


@pytest.mark.server
@pytest.mark.slow
def test_mlflow_server_reachable_is_ok(tmp_path, mlflow_server, monkeypatch):
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    r = doctor.check_mlflow(_settings(tmp_path / "var", sync={"tracking_uri": mlflow_server.url}))
    assert r.status == doctor.OK and "answers" in r.message


# -- registry ---------------------------------------------------------------------------------------


def test_registry_none_and_unreachable(tmp_path):
    r = doctor.check_registry(_settings(tmp_path / "var"))
    assert r.status == doctor.OK and r.message.startswith("none")
    s = _settings(tmp_path / "var", sync={"registry": str(tmp_path / "no-such-repo.git"), "command_timeout_s": 60})
    (tmp_path / "var").mkdir(exist_ok=True)
    r = doctor.check_registry(s)
    assert r.status == doctor.FAIL and "could not be listed" in r.message and "sync.registry" in r.fix


@pytest.mark.slow
def test_registry_with_a_release_and_a_lost_dvc_remote(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed: apt-get install -y git")
    from sync_helpers import RegistryRepo

    repo = RegistryRepo(tmp_path / "registry")
    version = release_version(1)
    repo.release(version)
    data = tmp_path / "var"
    data.mkdir()
    s = _settings(data, sync={"registry": repo.url, "command_timeout_s": 120})
    r = doctor.check_registry(s)
    assert r.status == doctor.OK and "served the newest" in r.message and f"@v{version}" in r.message, r
    assert not [p for p in data.iterdir() if p.name.startswith(".doctor-")]
    shutil.rmtree(repo.store)  # the DVC remote is gone: listing works, fetching does not
    r = doctor.check_registry(s)
    assert r.status == doctor.FAIL and "DVC remote" in r.message, r


# -- clock ----------------------------------------------------------------------------------------


def test_clock_against_the_build_time(tmp_path):
    assert doctor.check_clock().status == doctor.OK
    stamp = tmp_path / "__init__.py"
    stamp.write_text("")
    future = time.time() + 30 * 86400
    os.utime(stamp, (future, future))  # a package built a month from now: this clock is behind
    built = doctor.build_time(stamp)
    assert built == pytest.approx(future)
    r = doctor.check_clock(built=built)
    assert r.status == doctor.FAIL and "before this har-edge was built" in r.message and "NTP" in r.fix
    assert doctor.build_time() >= Path(doctor.__file__).with_name("__init__.py").stat().st_mtime


# -- inotify --------------------------------------------------------------------------------------


def test_inotify_limits(tmp_path):
    r = doctor.check_inotify()
    assert r.status in (doctor.OK, doctor.WARN) and "max_user_watches" in r.message
    fake = tmp_path / "inotify"
    fake.mkdir()
    (fake / "max_user_watches").write_text("8192\n")
    (fake / "max_user_instances").write_text("128\n")
    assert doctor.check_inotify(fake, used=3).status == doctor.OK
    (fake / "max_user_instances").write_text("4\n")
    r = doctor.check_inotify(fake, used=4)
    assert r.status == doctor.FAIL and "max_user_instances" in r.fix
    assert doctor.check_inotify(fake, used=3).status == doctor.WARN
    (fake / "max_user_watches").write_text("0\n")
    assert doctor.check_inotify(fake, used=0).status == doctor.FAIL
    assert doctor.check_inotify(tmp_path / "none").status == doctor.WARN


# -- the command ------------------------------------------------------------------------------------


def test_doctor_command_ok_then_fail(tmp_path):
    data = tmp_path / "var"
    res = _cli(data_dir=data)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    names = ["settings", "data dir", "outbox", "model", "mlflow", "registry", "clock", "inotify"]
    assert len(lines) == len(names) and all(line.split()[0] in ("OK", "WARN") for line in lines)
    assert [n for n in names if any(n in line for line in lines)] == names
    assert "XNNPACK" not in res.stderr
    (data / "outbox.sqlite").write_bytes(b"garbage" * 1000)
    res = _cli("--json", data_dir=data, env={"HAR_EDGE_SYNC__TRACKING_URI": f"http://127.0.0.1:{_closed_port()}"})
    assert res.returncode == 1, res.stdout + res.stderr
    checks = {c["check"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["outbox"]["status"] == "FAIL" and checks["outbox"]["fix"]
    assert checks["mlflow"]["status"] == "FAIL" and checks["model"]["status"] == "OK"
    human = _cli(data_dir=data)
    assert human.returncode == 1 and any(
        line.startswith("FAIL") and "outbox" in line and "fix:" in line for line in human.stdout.splitlines()
    )

"""The central stack on its real engines: PostgreSQL 15, SeaweedFS's S3 gateway, MLflow with basic-auth over TLS.

One stack for the module (about 30 s to start here), devices as real ``har-edge`` processes or in-process
pushers with their own accounts; the bucket is read with boto3 and the stored metric rows straight from
PostgreSQL. The last test greps every log and every output of the module for every password.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from sync_helpers import (
    add_file,
    outbox_points,
    restore_mlflow_env,  # noqa: F401 - autouse fixture
    sqlite_ids,
)

from har_edge.agent.outbox import Outbox
from har_edge.agent.settings import load_settings
from har_edge.sync import runs
from har_edge.sync.errors import ServerUnreachable
from har_edge.sync.push import Pusher

pytestmark = [pytest.mark.server, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]

#: every output the module's commands printed, for the credentials grep at the end
OUTPUTS: list[str] = []
#: every password handed out during the module
PASSWORDS: list[str] = []


def _need(binary: str, apt: str) -> None:
    from har_edge.central.postgres import pg_bindir

    if binary == "pg_ctl":
        try:
            pg_bindir()
            return
        except Exception:
            pass
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", apt], check=False, capture_output=True)
        return
    pytest.skip(f"{binary} is missing: apt-get install -y {apt}")


@pytest.fixture(scope="module")
def stack():
    """PostgreSQL + SeaweedFS + MLflow (2 workers, basic-auth, HTTPS from a private CA) in a fresh folder.

    The folder is a mkdtemp in /tmp, not pytest's tmp_path: PostgreSQL runs as the ``postgres`` user when
    the tests run as root, and pytest's folders are private to root.
    """
    _need("pg_ctl", "postgresql")
    from har_edge.central.stack import CentralStack, StackOptions

    root = Path(tempfile.mkdtemp(prefix="har-central-test-"))
    os.chmod(root, 0o755)
    st = CentralStack(root / "stack", StackOptions(workers=2, tls=True))
    try:
        st.start()
        PASSWORDS.extend([st.admin_password, st.postgres.password, st.store.secret_key])
        yield st
    finally:  # the data is thrown away: no graceful stops (weed takes 20 s to leave on SIGTERM)
        st.mlflow.stop(timeout_s=5)
        st.store.stop(kill=True)
        st.postgres.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def _device(stack, tmp_path: Path, name: str) -> tuple[Path, object]:
    """A device data dir with its own account and the settings file add-device writes."""
    from har_edge.central.accounts import write_device_config

    account = stack.add_device(name)
    PASSWORDS.append(account.password)
    data = tmp_path / name
    data.mkdir()
    write_device_config(account, stack.url, data / "har-edge.toml", stack.ca_path)
    return data, account


def _device_env() -> dict[str, str]:
    """A device process sees nothing of the server's: no MLflow or AWS variables, only its settings file.

    REQUESTS_CA_BUNDLE, when this machine sets it, stays: server_cert_path must win over it.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "PG"))}
    env.update(PYTHONPATH=str(ROOT), HAR_EDGE_HTTP__ADDRESS="")
    return env


def _har_edge(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    exe = Path(sys.executable).with_name("har-edge")
    return subprocess.Popen(
        [str(exe), *args], env=env or _device_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    OUTPUTS.append(out + err)
    return proc.returncode, out + err


def _stored_points(stack, run_id: str) -> Counter:
    """Every metric row MLflow stored for a run, read from PostgreSQL (duplicates included)."""
    with stack.postgres.connect("mlflow", superuser=False) as conn:
        rows = conn.execute("SELECT key, value, timestamp, step FROM metrics WHERE run_uuid = %s", (run_id,)).fetchall()
    return Counter((k, float(v), int(ts), int(step)) for k, v, ts, step in rows)


def _admin_get(stack, path: str, **params) -> dict:
    r = requests.get(
        stack.url + path, params=params, auth=("admin", stack.admin_password), verify=str(stack.ca_path), timeout=30
    )
    r.raise_for_status()
    return r.json()


def _file_runs(stack, experiment_id: str) -> dict[str, list[dict]]:
    body = requests.post(
        stack.url + "/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment_id], "filter": f"tags.`{runs.KIND}` = 'file'", "max_results": 1000},
        auth=("admin", stack.admin_password),
        verify=str(stack.ca_path),
        timeout=30,
    ).json()
    out: dict[str, list[dict]] = {}
    for r in body.get("runs", []):
        tags = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
        out.setdefault(tags[runs.FILE_SHA], []).append(r)
    return out


def assert_delivered_once(stack, ob: Outbox, experiment_id: str) -> None:
    """One FINISHED run per processed file, its rows in PostgreSQL equal to the outbox's, its CSV in the bucket."""
    by_sha = _file_runs(stack, experiment_id)
    processed = sqlite_ids(ob, "SELECT id, sha256, run_id FROM files WHERE status = 'processed'")
    assert len(by_sha) == len(processed)
    keys = set(stack.artifact_keys())
    for fid, sha, run_id in processed:
        (run,) = by_sha[sha]
        assert run["info"]["run_id"] == run_id and run["info"]["status"] == "FINISHED"
        assert _stored_points(stack, run_id) == outbox_points(ob, fid)
        assert f"{stack.artifact_prefix}/{experiment_id}/{run_id}/artifacts/predictions.csv" in keys
    assert sqlite_ids(ob, "SELECT count(*) FROM metrics WHERE delivered_ms IS NULL") == [(0,)]


# -- tests -------------------------------------------------------------------------------------------------


def test_four_devices_pushing_at_once_give_one_run_per_file_with_its_csv_in_the_bucket(stack, tmp_path):
    devices = []
    for i in range(4):
        data, account = _device(stack, tmp_path, f"watch-{i:02d}")
        ob = Outbox(data / "outbox.sqlite")
        for seed in range(3):
            add_file(ob, 100 * i + seed, minutes=4)
        devices.append((data, account))
    procs = [_har_edge("sync", "once", "--data-dir", str(data)) for data, _ in devices]
    results = [_finish(p) for p in procs]
    for code, out in results:
        assert code == 0, out
        assert "3 file run(s) finished (3 created)" in out and "3 prediction CSV(s)" in out
    for data, account in devices:
        assert_delivered_once(stack, Outbox(data / "outbox.sqlite"), account.experiment_id)
    # the bucket holds exactly these runs' CSVs: 12, one per file
    csvs = [k for k in stack.artifact_keys() if k.endswith("predictions.csv")]
    assert len(csvs) >= 12
    mine = {a.experiment_id for _, a in devices}
    assert len([k for k in csvs if k.split("/")[1] in mine]) == 12


def test_a_device_can_neither_read_nor_write_another_devices_experiment(stack, tmp_path):
    _, a = _device(stack, tmp_path, "box-a")
    _, b = _device(stack, tmp_path, "box-b")
    ca = str(stack.ca_path)

    def call(account, method, path, **kw):
        return requests.request(
            method, stack.url + path, auth=(account.username, account.password), verify=ca, timeout=30, **kw
        )

    api, exp = "/api/2.0/mlflow", b.experiment_id
    # B writes its own run
    r = call(b, "POST", f"{api}/runs/create", json={"experiment_id": exp, "start_time": 1})
    assert r.status_code == 200, r.text
    b_run = r.json()["run"]["info"]["run_id"]
    metric = {"run_id": b_run, "key": "x", "value": 1.0, "timestamp": 1, "step": 0}
    assert call(b, "POST", f"{api}/runs/log-metric", json=metric).status_code == 200

    # A, with its own valid account, is refused every one of these on B's experiment and run
    grant = {"username": "box-a", "resource_type": "experiment", "resource_id": exp, "permission": "MANAGE"}
    refused = {
        "get the experiment": call(a, "GET", f"{api}/experiments/get", params={"experiment_id": exp}),
        "create a run": call(a, "POST", f"{api}/runs/create", json={"experiment_id": exp}),
        "read a run": call(a, "GET", f"{api}/runs/get", params={"run_id": b_run}),
        "log a metric": call(a, "POST", f"{api}/runs/log-metric", json={**metric, "value": 9.0, "timestamp": 2}),
        "set a tag": call(a, "POST", f"{api}/runs/set-tag", json={"run_id": b_run, "key": "k", "value": "v"}),
        "delete the run": call(a, "POST", f"{api}/runs/delete", json={"run_id": b_run}),
        "rename the experiment": call(
            a, "POST", f"{api}/experiments/update", json={"experiment_id": exp, "new_name": "stolen"}
        ),
        "grant itself access": call(a, "POST", "/api/3.0/mlflow/users/permissions/grant", json=grant),
        "create a user": call(a, "POST", f"{api}/users/create", json={"username": "x", "password": "y"}),
        "upload an artifact": call(
            a, "PUT", f"/api/2.0/mlflow-artifacts/artifacts/{exp}/{b_run}/artifacts/evil.txt", data=b"evil"
        ),
    }
    assert {what: r.status_code for what, r in refused.items()} == {what: 403 for what in refused}
    # a search is answered, with B's runs filtered out
    found = call(a, "POST", "/api/2.0/mlflow/runs/search", json={"experiment_ids": [b.experiment_id]})
    assert found.status_code == 200 and not found.json().get("runs")
    # B's run is untouched, and A still works in its own experiment
    got = call(b, "GET", "/api/2.0/mlflow/runs/get", params={"run_id": b_run}).json()["run"]
    assert got["info"]["lifecycle_stage"] == "active" and got["data"]["metrics"][0]["value"] == 1.0
    assert call(a, "POST", "/api/2.0/mlflow/runs/create", json={"experiment_id": a.experiment_id}).status_code == 200
    # a wrong password is 401 and no client without the private CA gets a TLS connection
    assert requests.get(stack.url + "/api/2.0/mlflow/experiments/get", params={"experiment_id": a.experiment_id},
                        auth=("box-a", "not-it"), verify=ca, timeout=30).status_code == 401  # fmt: skip
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(stack.url + "/health", timeout=30, verify=True)
    assert stack.admin().permission("box-a", b.experiment_id) == "NO_PERMISSIONS"
    assert stack.admin().permission("box-a", a.experiment_id) == "MANAGE"


def test_add_device_command_writes_a_private_settings_file(stack, tmp_path):
    out = tmp_path / "edge-07.toml"
    exe = [
        sys.executable,
        "-m",
        "har_edge.central",
        "add-device",
        "edge-07",
        "--root",
        str(stack.root),
        "--out",
        str(out),
    ]
    res = subprocess.run(exe, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    OUTPUTS.append(res.stdout + res.stderr)
    assert res.returncode == 0, res.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    settings = load_settings(config=out, env={}, data_dir=tmp_path / "d")
    PASSWORDS.append(settings.sync.password)
    assert settings.device == "edge-07" and settings.sync.experiment == "har-edge/edge-07"
    assert settings.sync.server_cert_path == stack.ca_path and settings.sync.tracking_uri == stack.url
    # again: refused (the password would silently change), unless --rotate
    again = subprocess.run(
        exe, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120
    )
    OUTPUTS.append(again.stdout + again.stderr)
    assert again.returncode == 1 and "already exists" in again.stderr and "--rotate" in again.stderr


def test_fleet_status_lists_devices_and_exits_1_when_one_is_silent(stack, tmp_path):
    data, _ = _device(stack, tmp_path, "status-01")
    ob = Outbox(data / "outbox.sqlite")
    add_file(ob, 7, minutes=3)
    code, out = _finish(_har_edge("sync", "once", "--data-dir", str(data)))
    assert code == 0, out
    env = {**_device_env(), "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": stack.admin_password}
    env.update(HAR_EDGE_SYNC__TRACKING_URI=stack.url, HAR_EDGE_SYNC__SERVER_CERT_PATH=str(stack.ca_path))
    env["HAR_EDGE_FLEET__SILENT_AFTER_S"] = "0.001"  # every device is silent by the setting ...
    ops = ["--data-dir", str(tmp_path / "ops")]
    # ... and --silent-after overrides it for one call
    code, out = _finish(_har_edge("fleet", "status", *ops, "--json", "--silent-after", "100000", env=env))
    assert code == 0, out
    doc = json.loads(out[: out.rindex("}") + 1])
    me = {d["device"]: d for d in doc["devices"]}["status-01"]
    assert me["experiment"] == "har-edge/status-01" and me["model"] and not me["silent"]
    assert me["backlog"]["backlog_files"] == 1  # as of the heartbeat, taken before the push
    assert me["monitor"] and sum(me["monitor"].values()) == 1
    assert 0 <= me["heartbeat_age_s"] < 300
    code, out = _finish(_har_edge("fleet", "status", *ops, env=env))
    assert code == 1, out
    line = next(ln for ln in out.splitlines() if ln.startswith("status-01 "))
    assert "SILENT" in line and "1 files / " in line
    assert "silent for more than 0 s (fleet.silent_after_s)" in out


def test_backup_command_dumps_both_databases_restorably(stack, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "har_edge.central", "backup", str(tmp_path / "bk"), "--root", str(stack.root)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    OUTPUTS.append(res.stdout + res.stderr)
    assert res.returncode == 0, res.stderr
    dumps = sorted((tmp_path / "bk").glob("*.dump"))
    assert [d.name.split("-")[0] for d in dumps] == ["mlflow", "mlflow_auth"]
    listing = subprocess.run(
        [str(stack.postgres.bindir / "pg_restore"), "--list", str(dumps[0])], capture_output=True, text=True
    )
    assert listing.returncode == 0 and "TABLE DATA public metrics" in listing.stdout
    auth = subprocess.run(
        [str(stack.postgres.bindir / "pg_restore"), "--list", str(dumps[1])], capture_output=True, text=True
    )
    assert "TABLE DATA public users" in auth.stdout


def _push_through_an_outage(stack, tmp_path, name: str, *, started, cut, restore) -> None:
    """Push a backlog in a thread, cut a service once ``started(outbox)``, see the pass fail, restore, push again."""
    data, account = _device(stack, tmp_path, name)
    overrides = stack.device_settings(account)
    overrides["sync"].update(batch_size=100, request_timeout_s=30)
    settings = load_settings(env={}, data_dir=data, **overrides)
    ob = Outbox(settings.outbox_path)
    for seed in range(6):
        add_file(ob, 1000 + seed, minutes=30)
    p = Pusher(settings, ob)
    p.experiment_id()
    result: dict = {}

    def push() -> None:
        try:
            result["report"] = p.push(time.time())
        except Exception as exc:
            result["error"] = exc

    t = threading.Thread(target=push)
    t.start()
    try:
        deadline = time.monotonic() + 120
        while not started(ob):
            assert time.monotonic() < deadline and t.is_alive(), result
            time.sleep(0.02)
        cut()
        t.join(timeout=180)
        assert isinstance(result.get("error"), ServerUnreachable), result
        assert sqlite_ids(ob, "SELECT count(*) FROM files WHERE finished_ms IS NULL AND status='processed'")[0][0] > 0
    finally:
        t.join(timeout=180)
        restore()
    # like the daemon: passes until the backlog is empty (the first may still meet a stale connection)
    for _ in range(5):
        try:
            report = p.push(time.time())
        except ServerUnreachable:
            time.sleep(2)
            continue
        if report.backlog["points"] == 0 and report.backlog["files"] == 0:
            break
    assert_delivered_once(stack, ob, account.experiment_id)


def test_a_postgres_outage_mid_push_loses_nothing_and_doubles_nothing(stack, tmp_path):
    _push_through_an_outage(
        stack,
        tmp_path,
        "pg-outage",
        started=lambda ob: sqlite_ids(ob, "SELECT count(*) FROM files WHERE finished_ms IS NOT NULL")[0][0] >= 2,
        cut=lambda: stack.postgres.stop("immediate"),  # as if the database host lost power
        restore=stack.postgres.start,
    )


def test_an_object_store_outage_mid_push_loses_nothing_and_doubles_nothing(stack, tmp_path):
    _push_through_an_outage(
        stack,
        tmp_path,
        "s3-outage",
        started=lambda ob: (
            sqlite_ids(ob, "SELECT count(*) FROM files WHERE artifact_delivered_ms IS NOT NULL")[0][0] >= 1
        ),
        cut=lambda: stack.store.stop(kill=True),
        restore=stack.store.start,
    )


def test_no_password_appears_in_any_log_or_output(stack, tmp_path_factory, caplog):
    """Runs last: every password of the module, grepped in every server log, device log and command output."""
    assert len(PASSWORDS) >= 8
    texts = {f"output {i}": out for i, out in enumerate(OUTPUTS)}
    logs = [*(stack.root / "logs").rglob("*"), stack.store.log_path]
    base = tmp_path_factory.getbasetemp()
    logs += [p for p in base.rglob("*") if p.is_file() and ("logs" in p.parts or p.suffix == ".log")]
    for path in logs:
        if path.is_file():
            texts[str(path)] = path.read_text(encoding="utf-8", errors="replace")
    assert len(texts) >= 5 and any("mlflow.log" in k for k in texts)
    leaks = [(where, pw[:4] + "...") for where, text in texts.items() for pw in PASSWORDS if pw and pw in text]
    assert not leaks
    # and the command line of every server process carries none either
    import psutil

    for pid in filter(None, stack.pids().values()):
        for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            cmdline = " ".join(proc.cmdline())
            assert not [pw for pw in PASSWORDS if pw in cmdline], proc.pid

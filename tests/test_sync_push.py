"""Push: the outbox delivered to a real MLflow server (and the embedded store), exactly once in effect."""

from __future__ import annotations

import csv
import http.server
import json
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from sync_helpers import (
    BUNDLED,
    add_file,
    assert_delivered_once,
    history,
    outbox_points,
    restore_mlflow_env,  # noqa: F401 - autouse fixture
    sqlite_ids,
)

from har_edge.agent.outbox import Outbox
from har_edge.agent.settings import load_settings
from har_edge.sync import runs
from har_edge.sync.delivery import Delivery
from har_edge.sync.errors import ServerAccessDenied, ServerUnreachable
from har_edge.sync.push import Pusher


def _settings(data_dir: Path, uri: str | None, **sync):
    # each test its own experiment and device: the session server is shared
    sync.setdefault("experiment", f"test-{uuid.uuid4().hex[:8]}")
    return load_settings(
        env={},
        data_dir=data_dir,
        device_id=f"dev-{uuid.uuid4().hex[:6]}",
        sync={"tracking_uri": uri, "request_timeout_s": 30, **sync},
    )


# -- against the session's server ---------------------------------------------------------------------------


@pytest.mark.server
def test_full_delivery_matches_the_outbox_and_a_resend_changes_nothing(mlflow_server, data_dir, tmp_path):
    settings = _settings(data_dir, mlflow_server.url)
    ob = Outbox(settings.outbox_path)
    ids = [add_file(ob, seed, minutes=5 + seed) for seed in range(4)]
    add_file(ob, 99, status="failed", error_kind="too_short")  # no run for a failed file
    ob.record_deployment(from_version=BUNDLED.version, to_version="99.0.0", outcome="activated", reason="test")
    p = Pusher(settings, ob)

    report = p.push(time.time())
    assert report.runs_created == 4 and report.files_finished == 4 and report.artifacts == 4
    assert report.deployments == 1 and report.device_points >= 5 and not report.refused
    assert report.backlog == {"files": 0, "points": 0, "deployments": 0, "oldest_ms": None}
    assert_delivered_once(p, mlflow_server.root / "mlflow.db")

    run = p.client.get_run(ob.file(ids[0]).run_id)
    assert run.data.params == {
        "model_name": BUNDLED.name,
        "model_version": BUNDLED.version,
        "window": str(BUNDLED.window),
        "step": str(BUNDLED.step),
        "sample_rate_hz": f"{BUNDLED.sample_rate_hz:g}",
    }
    assert {runs.MODEL_SHA, runs.AGENT_VERSION, runs.FILE_SHA}.issubset(run.data.tags)
    steps = sorted(m.step for m in p.client.get_metric_history(run.info.run_id, "minute_confidence"))
    assert steps == list(range(len(steps))) and len(steps) >= 5  # step = minute index

    # the predictions CSV equals the stored windows
    dst = p.client.download_artifacts(run.info.run_id, "predictions.csv", str(tmp_path))
    with open(dst, newline="") as f:
        rows = list(csv.DictReader(f))
    names, starts, probs = ob.file_windows(ids[0])
    assert [int(r["start_ms"]) for r in rows] == starts.tolist()
    assert [r["label"] for r in rows] == [names[i] for i in probs.argmax(1)]
    assert rows[0]["start_time"].endswith("Z") and len(rows[0]) == 4 + len(names)

    # the device run holds the heartbeat, the deployment is a finished run nested under it
    dev = p.client.search_runs([p.experiment_id()], f"tags.`{runs.KIND}` = 'device'")
    assert len(dev) == 1 and dev[0].data.tags[runs.ACTIVE_MODEL] == f"{BUNDLED.name} {BUNDLED.version}"
    assert history(p.client, dev[0].info.run_id) == outbox_points(ob, None)  # through the REST API too
    (dep,) = p.client.search_runs([p.experiment_id()], f"tags.`{runs.KIND}` = 'deployment'")
    assert dep.data.tags["mlflow.parentRunId"] == dev[0].info.run_id
    assert dep.data.tags["har.deployment.outcome"] == "activated" and dep.info.status == "FINISHED"

    # a crash after the server acknowledged but before the marks: everything is sent again
    with ob.transaction() as c:
        c.exec_driver_sql("UPDATE metrics SET delivered_ms = NULL")
        c.exec_driver_sql("UPDATE files SET run_id = NULL, finished_ms = NULL, artifact_delivered_ms = NULL")
        c.exec_driver_sql("UPDATE deployments SET delivered_ms = NULL")
    again = Pusher(settings, ob).push(time.time())
    assert again.runs_created == 0 and again.files_finished == 4  # found by tags, not created
    assert_delivered_once(p, mlflow_server.root / "mlflow.db")
    assert len(p.client.search_runs([p.experiment_id()], f"tags.`{runs.KIND}` = 'deployment'")) == 1


@pytest.mark.server
def test_a_rejected_param_is_recorded_not_retried_and_the_rest_goes_on(mlflow_server, data_dir):
    settings = _settings(data_dir, mlflow_server.url)
    ob = Outbox(settings.outbox_path)
    bad, good = add_file(ob, 1), add_file(ob, 2)
    p = Pusher(settings, ob)
    # someone made the run of the first file earlier, with another model version as a param
    f = ob.file(bad)
    run_id, _ = runs.find_or_create_run(p.client, p.experiment_id(), p._file_identity(f))
    p.client.log_param(run_id, "model_version", "something-else")

    report = p.push(time.time())
    assert report.files_finished == 2 and report.runs_created == 1
    assert report.refused == [f"params of {f.name}"]
    refusals = Delivery(ob).refusal_rows()
    assert [(r.kind, r.file_id) for r in refusals] == [("params", bad)]
    assert "INVALID_PARAMETER_VALUE" in refusals[0].error
    assert_delivered_once(p, mlflow_server.root / "mlflow.db")  # its metrics still arrived
    assert p.client.get_run(run_id).data.params["model_version"] == "something-else"
    # not retried: a second pass has nothing to do and records nothing new
    with ob.transaction() as c:
        c.exec_driver_sql(f"UPDATE files SET finished_ms = NULL WHERE id = {bad}")
    assert not p.push(time.time()).refused
    assert len(Delivery(ob).refusal_rows()) == 1
    assert ob.file(good).finished_ms is not None


@pytest.mark.server
def test_a_file_whose_run_was_deleted_on_the_server_is_given_up_and_listed(mlflow_server, data_dir):
    settings = _settings(data_dir, mlflow_server.url)
    ob = Outbox(settings.outbox_path)
    gone, kept = add_file(ob, 1, minutes=2), add_file(ob, 2, minutes=2)
    p = Pusher(settings, ob)
    run_id, _ = runs.find_or_create_run(p.client, p.experiment_id(), p._file_identity(ob.file(gone)))
    Delivery(ob).set_run_id(gone, run_id)  # an earlier pass made it ...
    p.client.delete_run(run_id)  # ... and someone deleted it on the server

    report = p.push(time.time())
    assert report.refused == [f"file {ob.file(gone).name}"] and report.files_finished == 1
    (refusal,) = Delivery(ob).refusal_rows()
    assert refusal.kind == "file" and refusal.file_id == gone and "deleted" in refusal.error
    assert report.backlog["points"] == 0 and ob.file(kept).finished_ms is not None


@pytest.mark.server
@pytest.mark.slow
def test_throughput_against_the_local_server(mlflow_server, data_dir, capsys):
    """points/s of a real push vs one log_metric per point vs raw log_batch of 1000 (figures for the report)."""
    from mlflow.entities import Metric

    settings = _settings(data_dir, mlflow_server.url)
    ob = Outbox(settings.outbox_path)
    for seed in range(6):
        add_file(ob, seed, minutes=120)  # ~870 points and 3600 windows each
    n_points = sqlite_ids(ob, "SELECT count(*) FROM metrics")[0][0]
    p = Pusher(settings, ob)
    p.experiment_id()
    t0 = time.perf_counter()
    report = p.push(time.time())
    push_s = time.perf_counter() - t0
    assert report.files_finished == 6

    run_id = p.client.create_run(p.experiment_id()).info.run_id
    t0 = time.perf_counter()
    for i in range(300):
        p.client.log_metric(run_id, "single", float(i), timestamp=1_000 + i, step=i)
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in range(3):
        p.client.log_batch(run_id, metrics=[Metric("batch", float(i), 1_000 + i, b * 1000 + i) for i in range(1000)])
    batch_s = time.perf_counter() - t0
    figures = {
        "push_points": n_points,
        "push_points_per_s": round(n_points / push_s),
        "push_s_incl_runs_params_csv_finish": round(push_s, 2),
        "log_metric_points_per_s": round(300 / single_s, 1),
        "log_metric_s_for_push_volume": round(n_points / (300 / single_s), 1),
        "raw_log_batch_1000_points_per_s": round(3000 / batch_s),
    }
    with capsys.disabled():
        print("\n[measure] " + json.dumps(figures))
    assert figures["push_points_per_s"] > 5 * figures["log_metric_points_per_s"]


@pytest.mark.server
@pytest.mark.slow
def test_server_stopped_mid_backlog_then_restarted_everything_arrives_once(mlflow_server, data_dir):
    """The session's server is stopped while a push runs (likely mid-request) and started again on its store."""
    settings = _settings(data_dir, mlflow_server.url, batch_size=100)
    ob = Outbox(settings.outbox_path)
    for seed in range(12):
        add_file(ob, seed, minutes=60)
    p = Pusher(settings, ob)
    p.experiment_id()
    result: dict = {}

    def push():
        try:
            result["report"] = p.push(time.time())
        except Exception as exc:
            result["error"] = exc

    t = threading.Thread(target=push)
    t.start()
    try:
        deadline = time.monotonic() + 120
        while sqlite_ids(ob, "SELECT count(*) FROM files WHERE finished_ms IS NOT NULL")[0][0] < 2:
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.02)
        mlflow_server.stop()
        t.join(timeout=120)
        assert isinstance(result.get("error"), ServerUnreachable), result
        assert "could not be reached" in str(result["error"])
        delivered = sqlite_ids(ob, "SELECT count(*) FROM metrics WHERE delivered_ms IS NOT NULL")[0][0]
        total = sqlite_ids(ob, "SELECT count(*) FROM metrics")[0][0]
        assert 0 < delivered < total

        # while it is away: more results, and every attempt fails fast without marking anything
        add_file(ob, 50, minutes=30)
        t0 = time.monotonic()
        with pytest.raises(ServerUnreachable):
            p.push(time.time())
        assert time.monotonic() - t0 < 10
        assert sqlite_ids(ob, "SELECT count(*) FROM metrics WHERE delivered_ms IS NOT NULL")[0][0] == delivered
    finally:
        t.join(timeout=120)
        if mlflow_server.proc is None or mlflow_server.proc.poll() is not None:
            mlflow_server.start()  # same port, same store: the other tests go on with it

    report = p.push(time.time())
    assert report.backlog["points"] == 0 and report.backlog["files"] == 0
    assert_delivered_once(p, mlflow_server.root / "mlflow.db")


# -- no server needed ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_store_under_the_data_dir_when_no_server_is_configured(data_dir):
    settings = load_settings(env={}, data_dir=data_dir, device_id="dev-embedded")
    ob = Outbox(settings.outbox_path)
    add_file(ob, 1, minutes=3)
    p = Pusher(settings, ob)
    assert p.target.uri == f"sqlite:///{data_dir.resolve()}/mlflow/mlflow.db" and not p.target.configured
    report = p.push(time.time())
    assert report.files_finished == 1 and report.artifacts == 1
    assert_delivered_once(p, data_dir / "mlflow" / "mlflow.db")
    assert list((data_dir / "mlflow" / "artifacts").rglob("predictions.csv"))
    # a week later the per-window rows and old device points are reclaimed; the file's record stays
    p.push(time.time() + 8 * 86_400)
    assert sqlite_ids(ob, "SELECT count(*) FROM windows") == [(0,)]
    assert sqlite_ids(ob, "SELECT count(*), min(finished_ms) > 0 FROM files") == [(1, 1)]
    assert sqlite_ids(ob, "SELECT count(*) FROM metrics WHERE file_id IS NULL AND delivered_ms IS NOT NULL") == [(0,)]


def test_an_unreachable_server_fails_fast_and_nothing_is_marked(data_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    settings = _settings(data_dir, f"http://127.0.0.1:{port}")
    ob = Outbox(settings.outbox_path)
    add_file(ob, 1, minutes=2)
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachable, match="could not be reached"):
        Pusher(settings, ob).push(time.time())
    assert time.monotonic() - t0 < 10
    assert sqlite_ids(ob, "SELECT count(*) FROM metrics WHERE delivered_ms IS NOT NULL") == [(0,)]
    assert sqlite_ids(ob, "SELECT run_id FROM files") == [(None,)]


def test_a_hung_server_times_out(data_dir):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)  # accepts (in the backlog) and never answers
    try:
        settings = _settings(data_dir, f"http://127.0.0.1:{srv.getsockname()[1]}", request_timeout_s=1)
        ob = Outbox(settings.outbox_path)
        add_file(ob, 1, minutes=2)
        t0 = time.monotonic()
        with pytest.raises(ServerUnreachable):
            Pusher(settings, ob).push(time.time())
        assert time.monotonic() - t0 < 10
    finally:
        srv.close()


class _Refusing(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        body = json.dumps({"error_code": "UNAUTHENTICATED", "message": "bad credentials"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):  # quiet
        pass


def test_refused_credentials_stop_the_pass_and_are_never_logged(data_dir, caplog):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        settings = _settings(
            data_dir, f"http://127.0.0.1:{httpd.server_address[1]}", username="edge", password="s3cret-pw"
        )
        ob = Outbox(settings.outbox_path)
        add_file(ob, 1, minutes=2)
        from har_edge.sync.daemon import SyncDaemon

        d = SyncDaemon(settings, outbox=ob)
        result = d.push_job(time.time())
        assert isinstance(result.error, ServerAccessDenied) and "credentials" in str(result.error)
        assert sqlite_ids(ob, "SELECT count(*) FROM metrics WHERE delivered_ms IS NOT NULL") == [(0,)]
        assert "s3cret-pw" not in caplog.text and "s3cret-pw" not in str(result.error)
    finally:
        httpd.shutdown()

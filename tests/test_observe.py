"""Prometheus metrics and HTTP health of the agent, on real outboxes, real sockets and a real Prometheus.

The end-to-end test runs ``har-edge agent run`` as a process, drops a FIT file
from tests/fitgen.py into its inbox, runs ``har-edge sync once`` twice (a local
MLflow store, then a closed 127.0.0.1 port), lets Debian's ``prometheus``
scrape the agent every second and runs every PromQL of the shipped Grafana
dashboard through Prometheus's query API: each must return data. Grafana
itself is not run here (no package of it on PyPI or Debian).

Verdicts: ``files.monitor_status`` (outbox schema v2) is set by the monitor; the
tests set one verdict as the monitor would.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fitgen import write_imu_fit
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from har_edge.agent.daemon import Agent
from har_edge.agent.errors import ConfigError, OutboxError
from har_edge.agent.http import agent_checks, agent_registry, parse_address, serve
from har_edge.agent.metrics import OutboxCollector
from har_edge.agent.outbox import Outbox
from har_edge.agent.settings import load_settings
from har_edge.agent.syncpasses import record_pass

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docker" / "monitoring" / "grafana" / "dashboards" / "har-edge.json"
START = datetime(2025, 3, 24, 7, 52, 19, tzinfo=UTC)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _scrape(registry: CollectorRegistry) -> dict:
    from prometheus_client import generate_latest

    return _samples(generate_latest(registry).decode())


def _wait(pred, timeout: float = 60.0, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return False


@pytest.fixture
def walk_fit(tmp_path) -> Path:
    p = tmp_path / "src" / "walk.fit"
    p.parent.mkdir()
    write_imu_fit(p, rate_hz=50, seconds=120, start=START)
    return p


def _process(agent: Agent, src: Path, name: str | None = None) -> None:
    shutil.copy(src, agent.folder.inbox / (name or src.name))
    for i in range(3):
        agent.step(now=1e9 + i * 1000)


# -- settings ----------------------------------------------------------------------------------


def test_http_address_setting(tmp_path):
    assert load_settings(env={}).http.address == "127.0.0.1:9464"
    assert load_settings(env={"HAR_EDGE_HTTP__ADDRESS": "0.0.0.0:9100"}).http.address == "0.0.0.0:9100"
    assert load_settings(env={"HAR_EDGE_HTTP__ADDRESS": ""}).http.address == ""
    assert parse_address("[::1]:9464") == ("::1", 9464) and parse_address("") is None
    with pytest.raises(ConfigError) as err:
        load_settings(env={"HAR_EDGE_HTTP__ADDRESS": "9464"})
    assert "http.address" in str(err.value) and "host:port" in str(err.value)
    with pytest.raises(ConfigError):
        load_settings(env={"HAR_EDGE_HTTP__ADDRESS": "localhost:99999"})


# -- the collector, in process ---------------------------------------------------------------------


def test_metrics_come_from_the_outbox_and_survive_a_restart(settings, walk_fit, tmp_path):
    agent = Agent(settings)
    agent.models.refresh()
    _process(agent, walk_fit)
    bad = tmp_path / "bad.fit"
    bad.write_bytes(b"not a fit file at all")
    _process(agent, bad)
    _process(agent, walk_fit, "again.fit")  # same content: a duplicate
    s = _scrape(agent_registry(agent))
    assert s[("har_edge_files_total", (("status", "processed"),))] == 1
    assert s[("har_edge_files_total", (("status", "failed"),))] == 1
    assert s[("har_edge_files_total", (("status", "duplicate"),))] == 1
    assert s[("har_edge_windows_total", ())] == 59
    assert s[("har_edge_inference_seconds_count", ())] == 1
    assert s[("har_edge_inference_seconds_bucket", (("le", "+Inf"),))] == 1
    assert 0 < s[("har_edge_inference_seconds_sum", ())] < 10
    m = agent.models.model.manifest
    assert s[("har_edge_model_info", (("name", m.name), ("sha256", m.sha256), ("version", m.version)))] == 1
    pending = agent.outbox.status_counts()["metric_points_pending"]
    assert pending > 20 and s[("har_edge_outbox_pending_points", ())] == pending
    assert s[("har_edge_outbox_pending_files", ())] == 1
    assert 0 <= s[("har_edge_outbox_oldest_pending_seconds", ())] < 120
    assert s[("har_edge_outbox_bytes", ())] == pytest.approx(agent.outbox.size_bytes(), rel=0.05)
    assert s[("har_edge_outbox_readable", ())] == 1 and s[("har_edge_ingestion_paused", ())] == 0
    assert ("process_resident_memory_bytes", ()) in s
    with sqlite3.connect(settings.outbox_path) as c:  # the monitor's verdicts, as the outbox holds them
        stored = dict(
            c.execute("SELECT monitor_status, count(*) FROM files WHERE monitor_status IS NOT NULL GROUP BY 1")
        )
    exported = {dict(k[1])["status"]: v for k, v in s.items() if k[0] == "har_edge_monitor_verdicts_total"}
    assert exported == stored and sum(stored.values()) == 1
    assert not any(k[0].startswith("har_edge_sync") for k in s)  # sync never ran
    # a new process (a restarted agent) reads the same totals from the outbox
    again = Agent(load_settings(env={}, data_dir=settings.data_dir))
    s2 = _scrape(agent_registry(again))
    assert s2[("har_edge_files_total", (("status", "processed"),))] == 1 and s2[("har_edge_windows_total", ())] == 59
    assert ("har_edge_model_info", ()) not in s2  # not loaded yet in that process: no info sample


def test_counters_do_not_go_down_when_rows_are_deleted(settings, walk_fit):
    agent = Agent(settings)
    agent.models.refresh()
    _process(agent, walk_fit)
    reg = agent_registry(agent)
    assert _scrape(reg)[("har_edge_windows_total", ())] == 59
    fid = agent.outbox.processed_file(agent.outbox.file(1).sha256).id
    agent.outbox.delete_file_rows(fid)  # what a retention pass does
    s = _scrape(reg)
    assert s[("har_edge_files_total", (("status", "processed"),))] == 1 and s[("har_edge_windows_total", ())] == 59
    _process(agent, walk_fit, "walk2.fit")  # the same content again, processed anew
    assert _scrape(reg)[("har_edge_windows_total", ())] == 118


def test_verdicts_read_the_monitor_column_when_there(settings, walk_fit, tmp_path):
    agent = Agent(settings)
    agent.models.refresh()
    _process(agent, walk_fit)
    other = tmp_path / "other.fit"
    write_imu_fit(other, rate_hz=50, seconds=60, start=START, seed=3)
    _process(agent, other)
    with sqlite3.connect(settings.outbox_path) as c:  # files judged before the monitor existed: no verdict
        c.execute("UPDATE files SET monitor_status = NULL")
    reg = agent_registry(agent)
    assert not any(k[0].startswith("har_edge_monitor_verdicts") for k in _scrape(reg))  # all NULL: no verdict
    with sqlite3.connect(settings.outbox_path) as c:
        c.execute("UPDATE files SET monitor_status = 'drift' WHERE name = 'other.fit'")
    s = _scrape(reg)
    assert s[("har_edge_monitor_verdicts_total", (("status", "drift"),))] == 1
    assert len([k for k in s if k[0] == "har_edge_monitor_verdicts_total"]) == 1


def test_sync_passes_travel_through_the_outbox(settings):
    from har_edge.sync.daemon import JobResult
    from har_edge.sync.errors import LockBusy, ServerUnreachable
    from har_edge.sync.passes import record

    ob = Outbox(settings.outbox_path)
    record(ob, "push", JobResult(True, error=ServerUnreachable("MLflow at http://127.0.0.1:9 could not be reached")))
    record(ob, "push", JobResult(True, error=ServerUnreachable("again")))
    record(ob, "push", JobResult(True, error=RuntimeError("a bug")))
    record(ob, "push", JobResult(False, error=LockBusy("another sync")))  # skipped: not counted
    record(ob, "pull", JobResult(True))
    record_pass(ob, "push", error_kind=None, at_ms=1_700_000_000_000)
    collector = OutboxCollector(settings.outbox_path, model=lambda: None)
    reg = CollectorRegistry()
    reg.register(collector)
    s = _scrape(reg)
    assert s[("har_edge_sync_failures_total", (("kind", "unreachable"), ("task", "push")))] == 2
    assert s[("har_edge_sync_failures_total", (("kind", "unexpected"), ("task", "push")))] == 1
    assert s[("har_edge_sync_last_success_timestamp_seconds", (("task", "push"),))] == 1_700_000_000
    assert abs(s[("har_edge_sync_last_success_timestamp_seconds", (("task", "pull"),))] - time.time()) < 60
    assert len([k for k in s if k[0] == "har_edge_sync_failures_total"]) == 2


def test_an_unreadable_outbox_is_reported_not_raised(tmp_path):
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    reg = CollectorRegistry()
    reg.register(OutboxCollector(path, model=lambda: None))
    s = _scrape(reg)
    assert s[("har_edge_outbox_readable", ())] == 0
    assert not any(k[0] == "har_edge_files_total" for k in s)


# -- the endpoints, in process ----------------------------------------------------------------------


def test_endpoints_serve_metrics_health_and_readiness(tmp_path, walk_fit):
    data = tmp_path / "var"
    settings = load_settings(env={}, data_dir=data, agent={"settle_s": 0.0}, http={"address": "127.0.0.1:0"})
    agent = Agent(settings)
    reg, checks = agent_registry(agent), agent_checks(agent)
    http = serve(settings.http.address, reg, checks)
    assert http is not None
    base = f"http://127.0.0.1:{http.address[1]}"
    try:
        assert _get(base + "/healthz") == (200, "ok\n")
        code, body = _get(base + "/readyz")
        assert code == 503 and "model: not loaded yet" in body  # before the agent loaded its model
        agent.models.refresh()
        assert _get(base + "/readyz") == (200, "ready\n")
        _process(agent, walk_fit)
        code, text = _get(base + "/metrics")
        assert code == 200 and _samples(text)[("har_edge_windows_total", ())] == 59
        req = urllib.request.Request(base + "/metrics", headers={"Accept": "application/openmetrics-text"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            assert r.read().decode().rstrip().endswith("# EOF")
        assert _get(base + "/nothing")[0] == 404
        # a second server on the same port: a clear error naming the setting
        with pytest.raises(ConfigError) as err:
            serve(f"127.0.0.1:{http.address[1]}", reg, checks)
        assert "http.address" in str(err.value) and "already in use" in str(err.value)
        # the write lock held by someone else for longer than the probe waits: not ready, and why
        lock = sqlite3.connect(settings.outbox_path, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            t0 = time.monotonic()
            code, body = _get(base + "/readyz", timeout=30)
            assert code == 503 and "takes no writes" in body and time.monotonic() - t0 < 15
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert _get(base + "/readyz")[0] == 200
    finally:
        http.stop()
    assert serve("", reg, checks) is None


def test_readiness_fails_while_ingestion_is_paused(tmp_path, walk_fit):
    settings = load_settings(env={}, data_dir=tmp_path / "var", agent={"settle_s": 0.0, "outbox_max_mb": 0.01})
    agent = Agent(settings)
    agent.models.refresh()
    _process(agent, walk_fit)
    problems = [p for p in (c() for c in agent_checks(agent)) if p]
    assert problems and "ingestion paused" in problems[0]
    assert _scrape(agent_registry(agent))[("har_edge_ingestion_paused", ())] == 1


def test_readiness_names_a_broken_outbox(tmp_path):
    settings = load_settings(env={}, data_dir=tmp_path / "var")
    agent = Agent(settings)
    agent.models.refresh()
    agent.outbox.close()
    settings.outbox_path.unlink()
    settings.outbox_path.mkdir()  # a folder where the file was: nothing can be written
    problems = [p for p in (c() for c in agent_checks(agent)) if p]
    assert len(problems) == 1 and "outbox" in problems[0] and "takes no writes" in problems[0]
    with pytest.raises(OutboxError):
        Outbox(settings.outbox_path)


# -- the XNNPACK banner ---------------------------------------------------------------------------


def test_health_prints_no_xnnpack_banner(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "har_edge.cli", "health", "--data-dir", str(tmp_path / "var")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "healthy" in res.stdout, res.stdout + res.stderr
    assert "XNNPACK" not in res.stderr and "XNNPACK" not in res.stdout
    assert "model har-cnn" in res.stderr  # the log itself still reaches stderr


def test_filtered_stderr_keeps_other_native_lines():
    code = (
        "import os, sys\n"
        "from har_edge.agent.nativelog import filtered_stderr\n"
        "with filtered_stderr():\n"
        "    os.write(2, b'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n')\n"
        "    os.write(2, b'ERROR: something real\\n')\n"
        "    print('python line', file=sys.stderr)\n"
        "os.write(2, b'after\\n')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "ERROR: something real\npython line\nafter\n"


# -- a real Prometheus scraping a real agent ------------------------------------------------------------


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("prometheus is not installed: as root, apt-get install -y prometheus")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    found = shutil.which("prometheus")
    assert found, f"apt-get install prometheus failed: {res.stderr[-2000:]}"
    return found


class _Prometheus:
    def __init__(self, binary: str, root: Path, target: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cfg = root / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: har-edge\n    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.log = open(root / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def query(self, expr: str) -> list[dict]:
        code, body = _get(f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        doc = json.loads(body)
        assert code == 200 and doc["status"] == "success", f"{expr}: {body[:500]}"
        return doc["data"]["result"]

    def value(self, expr: str) -> float | None:
        res = self.query(expr)
        return float(res[0]["value"][1]) if res else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _dashboard_queries() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for t in panel["targets"]:
            out.append((panel["title"], t["expr"]))
    return out


def _grafana_to_promql(expr: str) -> str:
    """What Grafana would send: its variables replaced (all agents, a rate window of a few scrapes)."""
    return expr.replace("$__rate_interval", "30s").replace('"$instance"', '".*"')


def test_the_dashboard_is_provisioned_and_covers_the_panels():
    doc = json.loads(DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in doc["panels"])
    for word in ("throughput", "backlog", "sync lag", "verdicts", "model version"):
        assert word in titles, word
    assert all(t["datasource"]["uid"] == "prometheus" for p in doc["panels"] for t in p["targets"])
    prov = ROOT / "docker" / "monitoring" / "grafana" / "provisioning"
    assert "uid: prometheus" in (prov / "datasources" / "prometheus.yaml").read_text()
    assert "/var/lib/grafana/dashboards" in (prov / "dashboards" / "har-edge.yaml").read_text()


@pytest.mark.slow
def test_prometheus_scrapes_a_running_agent_and_every_panel_has_data(tmp_path, prometheus_bin, walk_fit):
    data = tmp_path / "var"
    port = _free_port()
    env = dict(
        os.environ,
        HAR_EDGE_DATA_DIR=str(data),
        HAR_EDGE_AGENT__SETTLE_S="0.2",
        HAR_EDGE_HTTP__ADDRESS=f"127.0.0.1:{port}",
    )
    agent = subprocess.Popen(
        [sys.executable, "-m", "har_edge.cli", "agent", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    prom = None
    try:
        assert _wait(lambda: _ready(f"http://127.0.0.1:{port}/readyz"), 90), "the agent never became ready"
        prom = _Prometheus(prometheus_bin, tmp_path, f"127.0.0.1:{port}")
        assert _wait(lambda: _prom_up(prom), 60, every=0.5), "Prometheus never scraped the agent"
        time.sleep(2)  # a few scrapes before the file: rates see the step
        shutil.copy(walk_fit, data / "inbox" / ".walk.fit.part")
        os.rename(data / "inbox" / ".walk.fit.part", data / "inbox" / "walk.fit")
        processed = 'har_edge_files_total{status="processed"}'
        assert _wait(lambda: prom.value(processed) == 1, 90, every=0.5)
        # the monitor's verdict, as the monitor feature stores it
        with sqlite3.connect(data / "outbox.sqlite", timeout=30) as c:
            c.execute("UPDATE files SET monitor_status = 'ok' WHERE name = 'walk.fit'")
        # sync: one pass to a closed port (fails: the file waits), then one to a local MLflow store (succeeds)
        sync_env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}
        closed = _free_port()
        bad = subprocess.run(
            [sys.executable, "-m", "har_edge.cli", "sync", "once"],
            env=dict(sync_env, HAR_EDGE_SYNC__TRACKING_URI=f"http://127.0.0.1:{closed}"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert bad.returncode == 3, bad.stdout + bad.stderr
        failures = 'har_edge_sync_failures_total{task="push",kind="unreachable"}'
        assert _wait(lambda: prom.value(failures) == 1, 30, every=0.5)
        ok = subprocess.run(
            [sys.executable, "-m", "har_edge.cli", "sync", "once"],
            env=sync_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert _wait(lambda: prom.value("har_edge_outbox_pending_files") == 0, 30, every=0.5)
        time.sleep(3)  # rates and increase() need a few samples after the last change
        assert prom.value("har_edge_windows_total") == 59
        assert prom.value('har_edge_model_info{version="1.0.0",name="har-cnn"}') == 1
        assert prom.value('har_edge_monitor_verdicts_total{status="ok"}') == 1
        assert prom.value('time() - har_edge_sync_last_success_timestamp_seconds{task="push"}') < 120
        empty = []
        for title, expr in _dashboard_queries():
            result = prom.query(_grafana_to_promql(expr))
            if not result:
                empty.append(f"{title}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
    finally:
        if prom is not None:
            prom.stop()
        agent.terminate()
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
    err = agent.stderr.read().decode() if agent.stderr else ""
    assert "agent stopped" in err and "XNNPACK" not in err


def _ready(url: str) -> bool:
    try:
        return _get(url, timeout=2)[0] == 200
    except OSError:
        return False


def _prom_up(prom: _Prometheus) -> bool:
    try:
        return prom.value('up{job="har-edge"}') == 1
    except (OSError, AssertionError, ValueError):
        return False

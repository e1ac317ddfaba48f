"""The edge image, built with podman and run the way it is deployed.

``docker/build.sh edge`` makes the image from a debootstrap base (cached under
.cache/podman/) and wheels built on the host; the containers run as the image's
non-root user on a read-only root with one data volume, without a network
unless a test talks to a server on 127.0.0.1. The first build on a fresh
machine takes ~12 minutes (debootstrap ~5, host wheels ~3, image ~4); with
the base and wheels cached and only code changed, ~30 s.

Optional, slow: HAR_EDGE_TEST_TRAINER_IMAGE=1 also builds the TensorFlow
trainer image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "docker" / "build.sh"
CACHE = ROOT / ".cache" / "podman"
IMAGE = "localhost/har-edge:test"
UID = 10001  # the image's user (ARG UID in docker/Dockerfile.edge)

pytestmark = [pytest.mark.podman, pytest.mark.slow, pytest.mark.timeout(2400)]


@dataclass
class Podman:
    env: dict
    image: str
    build_report: str
    names: list[str] = field(default_factory=list)

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:3])} ... exit {res.returncode}: {res.stderr[-3000:]}")
        return res

    def name(self, prefix: str) -> str:
        n = f"har-test-{prefix}-{uuid.uuid4().hex[:8]}"
        self.names.append(n)
        return n

    def run_args(self, data: Path, *, network: str = "none", env: dict | None = None) -> list[str]:
        """The deployment's settings: read-only root (podman adds a /tmp tmpfs), data volume, no network."""
        args = ["--network", network, "--read-only", "-v", f"{data}:/data"]
        for k, v in (env or {}).items():
            args += ["-e", f"{k}={v}"]
        return args

    def logs(self, name: str) -> str:
        res = self("logs", name, check=False)
        return res.stdout + res.stderr

    def wait_for_log(self, name: str, text: str, timeout: float = 90) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if text in self.logs(name):
                return time.monotonic() - t0
            state = self("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
            if state in ("exited", "stopped"):
                break
            time.sleep(0.25)
        raise AssertionError(f"{name} did not log {text!r} within {timeout} s:\n{self.logs(name)[-3000:]}")


@pytest.fixture(scope="module")
def podman() -> Podman:
    """The edge image, built (or found up to date) by docker/build.sh."""
    try:
        res = subprocess.run([str(BUILD), "edge", "--tag", IMAGE], capture_output=True, text=True, timeout=2400)
    except FileNotFoundError as exc:  # pragma: no cover
        pytest.fail(f"{BUILD} cannot run: {exc}")
    if res.returncode == 3:
        pytest.skip(
            "podman is missing and can be installed only as root: "
            f"apt-get install -y podman runc debootstrap zstd uidmap ({res.stderr.strip()[-300:]})"
        )
    assert res.returncode == 0, f"docker/build.sh edge failed:\n{res.stderr[-5000:]}"
    print(res.stdout.strip())
    p = Podman(dict(os.environ, CONTAINERS_CONF=str(CACHE / "containers.conf")), IMAGE, res.stdout.strip())
    yield p
    for n in reversed(p.names):  # a container joined to another's network goes first
        p("rm", "-f", "-t", "0", n, check=False)


def data_volume(path: Path) -> Path:
    """A data folder the image's user can write, as a fresh named volume would be."""
    path.mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(path, UID, UID)
    else:  # rootless podman: the container's user maps to a subordinate id
        path.chmod(0o777)
    return path


def drop_export(data: Path, export: Path) -> float:
    """Drop ``export`` into the container's inbox as a careful copier does (written beside, owned by the image's
    user, renamed in); the monotonic time of the rename."""
    staged = data / "walk.fit.part"
    shutil.copyfile(export, staged)
    if os.geteuid() == 0:
        os.chown(staged, UID, UID)
    t = time.monotonic()
    os.rename(staged, data / "inbox" / "walk.fit")
    return t


def outbox_copy(data: Path, dest: Path):
    """The container's outbox, read on the host through a copy (the host must not leave root-owned -wal/-shm)."""
    from har_edge.agent.outbox import Outbox

    dest.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal"):
        src = data / f"outbox.sqlite{suffix}"
        if src.exists():
            shutil.copy2(src, dest / src.name)
    return Outbox(dest / "outbox.sqlite")


@dataclass
class AgentRun:
    data: Path
    export: Path
    start_s: float
    uid: str
    opt_write: subprocess.CompletedProcess
    tmp_write: subprocess.CompletedProcess
    health: subprocess.CompletedProcess
    process_s: float
    stop: subprocess.CompletedProcess
    stop_s: float
    exit_code: str
    logs: str


@pytest.fixture(scope="module")
def agent_run(podman: Podman, tmp_path_factory) -> AgentRun:
    """`har-edge agent run` in the image: one FIT export dropped into the mounted inbox, then SIGTERM."""
    from fitgen import write_imu_fit

    root = tmp_path_factory.mktemp("edge")
    data = data_volume(root / "data")
    export = root / "walk.fit"
    write_imu_fit(export, rate_hz=50, seconds=60, start=datetime(2025, 3, 24, 7, 52, 19, tzinfo=UTC))

    name = podman.name("agent")
    t0 = time.monotonic()
    podman(
        "run",
        "-d",
        "--name",
        name,
        *podman.run_args(data, env={"HAR_EDGE_AGENT__SETTLE_S": "0.5", "HAR_EDGE_DEVICE_ID": "podman-test"}),
        podman.image,
    )
    podman.wait_for_log(name, "watching /data/inbox")
    start_s = time.monotonic() - t0

    uid = podman("exec", name, "id", "-u").stdout.strip()
    opt_write = podman("exec", name, "touch", "/opt/venv/x", check=False)
    tmp_write = podman("exec", name, "touch", "/tmp/x", check=False)
    health = podman("healthcheck", "run", name, check=False, timeout=60)

    t1 = drop_export(data, export)
    deadline = t1 + 120
    while time.monotonic() < deadline:
        if list((data / "quarantine").glob("*.reason.json")):
            reason = next((data / "quarantine").glob("*.reason.json")).read_text()
            raise AssertionError(f"the export was quarantined: {reason}\n{podman.logs(name)[-3000:]}")
        if not list((data / "inbox").iterdir()) and list((data / "archive").rglob("walk.fit")):
            break
        time.sleep(0.25)
    else:
        raise AssertionError(f"the export was not processed within 120 s:\n{podman.logs(name)[-3000:]}")
    process_s = time.monotonic() - t1

    t2 = time.monotonic()
    stop = podman("stop", "-t", "30", name, check=False, timeout=90)
    stop_s = time.monotonic() - t2
    exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    print(
        f"agent container: started in {start_s:.1f} s, processed the export in {process_s:.1f} s, "
        f"stopped in {stop_s:.1f} s"
    )
    return AgentRun(
        data, export, start_s, uid, opt_write, tmp_write, health, process_s, stop, stop_s, exit_code, podman.logs(name)
    )


# -- the image -----------------------------------------------------------------------------------------


def test_image_configuration(podman: Podman):
    (cfg,) = json.loads(podman("image", "inspect", podman.image).stdout)
    conf = cfg["Config"]
    assert conf["User"] == f"{UID}:{UID}"
    assert conf["Cmd"] == ["har-edge", "agent", "run"]
    assert conf["StopSignal"] == "SIGTERM"
    assert cfg["Healthcheck"]["Test"] == ["CMD", "har-edge", "health"]
    env = dict(e.split("=", 1) for e in conf["Env"])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["HAR_EDGE_DATA_DIR"] == "/data"
    assert env["DVC_SITE_CACHE_DIR"].startswith("/data/") and env["HOME"] == "/data"
    assert "/data" in conf["Volumes"]
    # the image's budget (measured 399.9 MB without git, the default; what each part adds: docs/deploy.md)
    assert cfg["Size"] <= 400e6, f"the edge image grew to {cfg['Size'] / 1e6:.0f} MB, over its 400 MB budget"


def test_image_holds_no_installer_tests_or_trainer(podman: Podman):
    probe = (
        "import importlib.util as u, pathlib, sys, sysconfig; "
        "sp = pathlib.Path(sysconfig.get_paths()['purelib']); "
        "found = [m for m in ('pip', 'setuptools', 'wheel', 'har_edge.trainer', 'tensorflow') if u.find_spec(m)]; "
        "found += [str(p) for p in sp.rglob('tests') if p.is_dir()][:5]; "
        "found += [str(p) for p in sp.glob('ai_edge_litert/*WebGpu*')]; "
        "print('\\n'.join(found)); sys.exit(1 if found else 0)"
    )
    res = podman("run", "--rm", "--network", "none", "--read-only", podman.image, "python3", "-c", probe, check=False)
    assert res.returncode == 0, f"left in the image:\n{res.stdout}{res.stderr[-2000:]}"
    res = podman("run", "--rm", "--network", "none", podman.image, "sh", "-c", "command -v har-train", check=False)
    assert res.returncode != 0, "har-train entry point left in the edge image"


# -- the agent in the image -------------------------------------------------------------------------------


def test_an_export_in_the_mounted_inbox_ends_as_rows_in_the_mounted_outbox(agent_run: AgentRun, tmp_path):
    from har_edge.common.hashing import export_sha256

    with outbox_copy(agent_run.data, tmp_path / "ob") as ob:
        rec = ob.processed_file(export_sha256([agent_run.export]))
        assert rec is not None, ob.status_counts()
        assert rec.name == "walk.fit" and rec.windows > 0
        labels, _starts, probs = ob.file_windows(rec.id)
        assert len(probs) == rec.windows and probs.shape[1] == len(labels)
        assert ob.file_metrics(rec.id), "no metric points recorded for the file"
        assert ob.status_counts()["files"] == {"processed": 1}
    assert list((agent_run.data / "archive").rglob("walk.fit"))


def test_runs_as_the_non_root_user_on_a_read_only_root(agent_run: AgentRun):
    assert agent_run.uid == str(UID)
    assert agent_run.opt_write.returncode != 0 and "Read-only file system" in agent_run.opt_write.stderr
    assert agent_run.tmp_write.returncode == 0, agent_run.tmp_write.stderr  # the tmpfs
    owners = {p.stat().st_uid for p in agent_run.data.rglob("*")}
    assert owners <= {UID, 0}, owners  # 0: the export the test dropped


def test_health_check_passes_while_the_agent_runs(agent_run: AgentRun):
    assert agent_run.health.returncode == 0, agent_run.health.stdout + agent_run.health.stderr


def test_sigterm_stops_the_agent_cleanly(agent_run: AgentRun):
    assert agent_run.stop.returncode == 0, agent_run.stop.stderr
    assert agent_run.exit_code == "0", agent_run.logs[-2000:]
    assert agent_run.stop_s < 25, f"podman stop took {agent_run.stop_s:.1f} s: SIGTERM was not honoured"
    assert "received SIGTERM" in agent_run.logs and "agent stopped" in agent_run.logs
    assert agent_run.start_s < 60


def _broken_current(data: Path) -> None:
    """models/current -> a version whose model.tflite lost bytes (the sha256 no longer matches)."""
    from har_edge.agent.model import BUNDLED_MODEL_DIR

    dest = data / "models" / "9.9.9"
    shutil.copytree(BUNDLED_MODEL_DIR, dest)
    model = dest / "model.tflite"
    model.write_bytes(model.read_bytes()[:-64])
    (data / "models" / "current").symlink_to("9.9.9")
    if os.geteuid() == 0:
        for p in [data / "models", *(data / "models").rglob("*")]:
            os.lchown(p, UID, UID)


@pytest.mark.parametrize("broken", ["model_dir_empty", "current_corrupt"])
def test_health_check_fails_without_a_usable_model(podman: Podman, tmp_path, broken):
    data = data_volume(tmp_path / "data")
    env = {}
    if broken == "model_dir_empty":
        (data / "no-model").mkdir()
        env["HAR_EDGE_AGENT__MODEL_DIR"] = "/data/no-model"
    else:
        _broken_current(data)
    name = podman.name("health")
    # the image's HEALTHCHECK, run by podman in a container kept alive by a sleep
    podman(
        "run",
        "-d",
        "--name",
        name,
        *podman.run_args(data, env=env),
        podman.image,
        "python3",
        "-c",
        "import time; time.sleep(600)",
    )
    res = podman("healthcheck", "run", name, check=False, timeout=60)
    assert res.returncode == 1 and "unhealthy" in res.stdout, res.stdout + res.stderr
    direct = podman("exec", name, "har-edge", "health", check=False)
    assert direct.returncode == 1 and direct.stdout.startswith("unhealthy: model:"), direct.stdout + direct.stderr
    podman("rm", "-f", "-t", "0", name)


# -- the sync daemon in the image --------------------------------------------------------------------------

needs_sync = pytest.mark.skipif(
    not (ROOT / "har_edge" / "sync" / "cli.py").exists(),
    reason="sync/cli.py is not written yet: no `har-edge sync` command",
)


@needs_sync
@pytest.mark.server
def test_sync_once_delivers_the_outbox_to_mlflow_on_the_host_loopback(
    podman: Podman, agent_run: AgentRun, mlflow_server, tmp_path
):
    from mlflow.tracking import MlflowClient

    from har_edge.common.hashing import export_sha256

    experiment = f"docker-{uuid.uuid4().hex[:8]}"
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "HAR_EDGE_SYNC__EXPERIMENT": experiment,
        "HAR_EDGE_DEVICE_ID": "podman-test",
    }
    res = podman(
        "run",
        "--rm",
        *podman.run_args(agent_run.data, network="host", env=env),
        podman.image,
        "har-edge",
        "sync",
        "once",
        check=False,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]

    client = MlflowClient(tracking_uri=mlflow_server.url)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, res.stdout
    sha = export_sha256([agent_run.export])
    (run,) = client.search_runs([exp.experiment_id], f"tags.`har.kind` = 'file' and tags.`har.file_sha256` = '{sha}'")
    assert run.data.tags["har.file_name"] == "walk.fit" and run.data.tags["har.device"] == "podman-test"
    with outbox_copy(agent_run.data, tmp_path / "ob") as ob:
        rec = ob.processed_file(sha)
        sent = {p.key for p in ob.file_metrics(rec.id)}
        st = ob.status_counts()
    assert sent and sent <= set(run.data.metrics), sorted(sent - set(run.data.metrics))
    assert client.list_artifacts(run.info.run_id), "the file run has no artifact"
    assert st["windows_pending_delivery"] == 0 and st["metric_points_pending"] == 0, st


@needs_sync
def test_sync_once_pulls_verifies_and_activates_a_release_inside_the_image(podman: Podman, tmp_path):
    """ls-remote (dulwich) + dvc get in the read-only container, without a git binary, from a registry mounted
    read-only at its own path."""
    from sync_helpers import RegistryRepo

    from har_edge.agent.manifest import read_manifest
    from har_edge.agent.model import BUNDLED_MODEL_DIR

    nogit = podman("run", "--rm", "--network", "none", podman.image, "sh", "-c", "command -v git", check=False)
    assert nogit.returncode != 0, f"git in the edge image ({nogit.stdout.strip()}): the default build leaves it out"
    bundled = read_manifest(BUNDLED_MODEL_DIR).version
    version = f"{int(bundled.split('.')[0]) + 1}.0.0"  # newer than the bundled model, so sync takes it
    reg = RegistryRepo(tmp_path / "registry")
    reg.release(version)
    if os.geteuid() == 0:  # the device's user owns its registry mirror (git refuses "dubious ownership")
        for p in [reg.root, *reg.root.rglob("*")]:
            os.lchown(p, UID, UID)
    data = data_volume(tmp_path / "data")
    env = {"HAR_EDGE_SYNC__REGISTRY": reg.url}
    args = [*podman.run_args(data, env=env), "-v", f"{reg.root}:{reg.root}:ro"]
    res = podman("run", "--rm", *args, podman.image, "har-edge", "sync", "once", check=False, timeout=300)
    from har_edge.agent.modelstore import read_pointer

    assert read_pointer(data / "models") == version, res.stdout + res.stderr[-3000:]
    health = podman("run", "--rm", *args, podman.image, "har-edge", "health", check=False)
    assert health.returncode == 0 and version in health.stdout, health.stdout + health.stderr[-2000:]


# -- the monitoring profile: Prometheus (Debian's package) scraping the agent container -----------------------

PROMETHEUS_IMAGE = "localhost/har-prometheus:test"


@pytest.fixture(scope="module")
def prometheus_image(podman: Podman) -> str:
    """docker/Dockerfile.prometheus on the same debootstrap base, built by docker/build.sh."""
    res = subprocess.run(
        [str(BUILD), "prometheus", "--tag", PROMETHEUS_IMAGE], capture_output=True, text=True, timeout=1200
    )
    assert res.returncode == 0, f"docker/build.sh prometheus failed:\n{res.stderr[-5000:]}"
    print(res.stdout.strip())
    return PROMETHEUS_IMAGE


def _prom_query(podman: Podman, container: str, query: str) -> list[dict]:
    """Prometheus's /api/v1/query, asked from inside `container` (the agent's network namespace)."""
    fetch = (
        "import sys, urllib.parse, urllib.request; "
        "q = urllib.parse.urlencode({'query': sys.argv[1]}); "
        "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:9090/api/v1/query?' + q, timeout=5).read().decode())"
    )
    res = podman("exec", container, "python3", "-c", fetch, query, check=False)
    if res.returncode != 0:
        return []
    body = json.loads(res.stdout)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _wait_for_value(podman: Podman, container: str, query: str, want, timeout: float = 75) -> float:
    t0, last = time.monotonic(), None
    while time.monotonic() - t0 < timeout:
        last = _prom_query(podman, container, query)
        if last and want(float(last[0]["value"][1])):
            return time.monotonic() - t0
        time.sleep(1)
    raise AssertionError(f"Prometheus: {query} never reached the expected value in {timeout} s; last answer {last}")


def test_prometheus_image_configuration(podman: Podman, prometheus_image: str):
    (cfg,) = json.loads(podman("image", "inspect", prometheus_image).stdout)
    assert cfg["Config"]["User"] == "prometheus"
    assert cfg["Healthcheck"]["Test"][:3] == ["CMD", "promtool", "query"]
    assert "/prometheus" in cfg["Config"]["Volumes"]
    version = podman("run", "--rm", "--network", "none", prometheus_image, "prometheus", "--version").stdout
    assert "prometheus, version 2.42" in version, version
    # measured 238 MB (base 128); 450 MB with moment-timezone's raw tz data, which the build removes
    assert cfg["Size"] < 300e6, f"the Prometheus image grew to {cfg['Size'] / 1e6:.0f} MB"


def test_prometheus_container_scrapes_the_agent_container(podman: Podman, prometheus_image: str, tmp_path):
    """The compose monitoring profile's two containers, with the shipped docker/monitoring/prometheus.yml.

    Prometheus joins the agent's network namespace (`--network container:`), itself without a network
    (`--network=none`), and finds the scrape target `agent:9464` through a mounted /etc/hosts naming the
    loopback `agent`: on podman's CNI backend here there is no DNS between containers (compose gives that
    name through its network). Prometheus's query API is asked from inside the agent container.
    """
    from fitgen import write_imu_fit

    from har_edge.common.hashing import export_sha256

    t_start = time.monotonic()
    data = data_volume(tmp_path / "data")
    agent = podman.name("mon-agent")
    env = {"HAR_EDGE_HTTP__ADDRESS": "0.0.0.0:9464", "HAR_EDGE_AGENT__SETTLE_S": "0.5"}
    podman("run", "-d", "--name", agent, *podman.run_args(data, env=env), podman.image)
    podman.wait_for_log(agent, "watching /data/inbox")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost agent\n")
    hosts.chmod(0o644)
    prom = podman.name("prometheus")
    podman(
        "run", "-d", "--name", prom, "--network", f"container:{agent}", "--read-only",
        "-v", f"{hosts}:/etc/hosts:ro", prometheus_image,
    )  # fmt: skip
    first_scrape_s = _wait_for_value(podman, agent, 'up{job="har-edge", instance="agent:9464"}', lambda v: v == 1)
    assert _prom_query(podman, agent, 'har_edge_files_total{status="processed"}')[0]["value"][1] == "0"

    export = tmp_path / "walk.fit"
    write_imu_fit(export, rate_hz=50, seconds=60, start=datetime(2025, 3, 24, 7, 52, 19, tzinfo=UTC))
    drop_export(data, export)
    # the file is counted by the next scrape (every 15 s, docker/monitoring/prometheus.yml)
    processed_s = _wait_for_value(podman, agent, 'har_edge_files_total{status="processed"}', lambda v: v == 1)
    with outbox_copy(data, tmp_path / "ob") as ob:
        rec = ob.processed_file(export_sha256([export]))
        assert rec is not None and rec.windows > 0
    _wait_for_value(podman, agent, "har_edge_windows_total", lambda v: v == rec.windows)
    info = _prom_query(podman, agent, "har_edge_model_info")
    assert info and info[0]["metric"]["version"], info

    # the image's HEALTHCHECK, and the agent's readiness check of docker/compose.yaml (/readyz)
    health = podman("healthcheck", "run", prom, check=False, timeout=60)
    assert health.returncode == 0, health.stdout + health.stderr
    import yaml

    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    check = compose["services"]["agent"]["healthcheck"]["test"]
    assert check[0] == "CMD" and "/readyz" in check[-1], check
    ready = podman("exec", agent, *check[1:], check=False)
    assert ready.returncode == 0, ready.stdout + ready.stderr
    assert compose["services"]["prometheus"]["profiles"] == ["monitoring"]
    # the classic UI still has the moment-timezone file it loads (the build drops only the raw tz data)
    probe = (
        "import urllib.request as u; "
        "[u.urlopen('http://127.0.0.1:9090' + p, timeout=5) for p in "
        "('/graph', '/classic/static/moment-timezone/moment-timezone-with-data.min.js')]"
    )
    assert podman("exec", agent, "python3", "-c", probe, check=False).returncode == 0
    print(
        f"monitoring: first scrape {first_scrape_s:.1f} s after Prometheus started, the processed file counted "
        f"{processed_s:.1f} s after the drop; test {time.monotonic() - t_start:.1f} s"
    )
    podman("rm", "-f", "-t", "0", prom)  # first: it uses the agent's network namespace
    podman("rm", "-f", "-t", "0", agent)


# -- the trainer image (optional: TensorFlow is large) -------------------------------------------------------


@pytest.mark.skipif(
    os.environ.get("HAR_EDGE_TEST_TRAINER_IMAGE") != "1",
    reason="builds the TensorFlow trainer image (~2 GB, several minutes): set HAR_EDGE_TEST_TRAINER_IMAGE=1",
)
def test_trainer_image_builds_and_runs(podman: Podman):
    res = subprocess.run(
        [str(BUILD), "trainer", "--tag", "localhost/har-train:test"], capture_output=True, text=True, timeout=3600
    )
    assert res.returncode == 0, res.stderr[-5000:]
    print(res.stdout.strip())
    out = podman("run", "--rm", "--network", "none", "--read-only", "localhost/har-train:test", "--help")
    assert "release" in out.stdout
    tf = podman(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "python3",
        "localhost/har-train:test",
        "-c",
        "import tensorflow as tf, trainer.cli; print(tf.__version__)",
    )
    assert tf.stdout.strip().startswith("2.")


# -- the compose stack (optional: builds the MLflow server image, ~760 MB) -------------------------------------


def _podman_compose() -> str | None:
    import sys

    beside = Path(sys.executable).with_name("podman-compose")
    return str(beside) if beside.exists() else shutil.which("podman-compose")


@pytest.mark.server
@pytest.mark.skipif(
    os.environ.get("HAR_EDGE_TEST_COMPOSE") != "1" or _podman_compose() is None,
    reason="runs docker/compose.yaml with podman-compose (pip install podman-compose) and builds "
    "the MLflow server image: set HAR_EDGE_TEST_COMPOSE=1",
)
def test_compose_stack_shows_a_dropped_export_in_mlflow(podman: Podman, tmp_path):
    from conftest import free_port
    from fitgen import write_imu_fit
    from mlflow.tracking import MlflowClient

    res = subprocess.run([str(BUILD), "mlflow"], capture_output=True, text=True, timeout=2400)
    assert res.returncode == 0, res.stderr[-5000:]
    port = free_port()
    project = f"har-test-{uuid.uuid4().hex[:6]}"
    env = dict(podman.env, MLFLOW_PORT=str(port), HAR_EDGE_IMAGE=podman.image, HAR_EDGE_DEVICE_ID="compose-test")
    compose = [_podman_compose(), "-p", project, "-f", str(ROOT / "docker" / "compose.yaml")]
    url = f"http://127.0.0.1:{port}"
    try:
        up = subprocess.run([*compose, "up", "-d"], env=env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        client = MlflowClient(tracking_uri=url)
        export = tmp_path / "walk.fit"
        write_imu_fit(export, rate_hz=50, seconds=60, start=datetime(2025, 3, 24, 9, 0, tzinfo=UTC))
        podman.wait_for_log(f"{project}_agent_1", "watching /data/inbox")
        # what a person does: docker compose cp walk.fit agent:/data/inbox/
        podman("cp", str(export), f"{project}_agent_1:/data/inbox/walk.fit")
        deadline, runs = time.monotonic() + 300, []
        while time.monotonic() < deadline and not runs:
            time.sleep(3)
            try:
                exp = client.get_experiment_by_name("har-edge")
                runs = exp and client.search_runs([exp.experiment_id], "tags.`har.file_name` = 'walk.fit'")
            except Exception:
                runs = []
        logs = podman.logs(f"{project}_sync_1")
        assert runs, f"no run for walk.fit in {url} after 300 s; sync said:\n{logs[-3000:]}"
        assert runs[0].data.tags["har.device"] == "compose-test"
        assert [a.path for a in client.list_artifacts(runs[0].info.run_id)]
    finally:
        subprocess.run([*compose, "down", "-v"], env=env, capture_output=True, text=True, timeout=300)

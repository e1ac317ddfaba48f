"""Shared fixtures: data folders, settings, and the session's real MLflow server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "tests"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "var"
    d.mkdir()
    return d


@pytest.fixture
def settings(data_dir: Path):
    from agent.settings import load_settings

    return load_settings(env={}, data_dir=data_dir, agent={"settle_s": 0.0})


@pytest.fixture(scope="session")
def fixture_cache() -> Path:
    """A folder kept between test runs for fixtures that are slow to write."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = root / "server.log"

    def start(self, timeout: float = 180.0) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(mlflow), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        # job execution starts 7 worker processes the tests never use: 62 s -> 26 s to /health here
        env = dict(os.environ, MLFLOW_ENABLE_ARTIFACTS_PROXY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.proc = subprocess.Popen(
            cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=self.root
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer /health within {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1, started once per session (it takes 30-50 s here)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(root)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def model_copy(tmp_path: Path):
    """Copy the bundled model folder somewhere a test may change it."""
    from agent.model import BUNDLED_MODEL_DIR

    def make(name: str = "model") -> Path:
        dest = tmp_path / name
        shutil.copytree(BUNDLED_MODEL_DIR, dest)
        return dest

    return make

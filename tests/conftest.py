"""Shared fixtures: data folders, settings, and the session's real MLflow server on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "tests"


@pytest.fixture(scope="session", autouse=True)
def _agents_serve_no_http_unless_asked():
    """``har-edge agent run`` started by a test serves HTTP only on a port the test gives it (tests run in parallel)."""
    os.environ.setdefault("HAR_EDGE_HTTP__ADDRESS", "")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "var"
    d.mkdir()
    return d


@pytest.fixture
def settings(data_dir: Path):
    from har_edge.agent.settings import load_settings

    return load_settings(env={}, data_dir=data_dir, agent={"settle_s": 0.0})


@pytest.fixture(scope="session")
def fixture_cache() -> Path:
    """A folder kept between test runs for fixtures that are slow to write."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


def _load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: one launcher for the tests and the bench: ``mlflow server`` on 127.0.0.1 without its job workers
_launcher = _load_by_path("har_edge_bench_mlflow_server", ROOT / "bench" / "mlflow_server.py")
MlflowServer, free_port = _launcher.MlflowServer, _launcher.free_port


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
    from har_edge.agent.model import BUNDLED_MODEL_DIR

    def make(name: str = "model") -> Path:
        dest = tmp_path / name
        shutil.copytree(BUNDLED_MODEL_DIR, dest)
        return dest

    return make


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A real SeaweedFS S3 gateway on 127.0.0.1 (about 3 s to start), with one identity; stopped at the end."""
    from har_edge.central.seaweed import SeaweedS3

    store = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    store.start()
    yield store
    store.stop(kill=True)  # weed waits about 20 s on a SIGTERM; the store's data is a temporary folder

"""Models from an S3 DVC remote on a real SeaweedFS: `har-train release --remote s3://...`, a device pulls,
verifies and activates; a corrupted object in the bucket is refused; the keys never reach a log."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import time
from pathlib import Path

import pytest
from sync_helpers import (
    MODEL_NAME,
    make_model_folder,
    release_version,
    restore_mlflow_env,  # noqa: F401 - autouse fixture
    sqlite_ids,
)
from trainer_helpers import git, registry_repo

from har_edge.agent.modelstore import read_pointer
from har_edge.agent.settings import load_settings
from har_edge.common.proc import dvc_command
from har_edge.sync.models import ModelManager

V0, V1, V2 = release_version(0), release_version(1), release_version(2)
AWS_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture
def s3(s3_store):
    """The session's SeaweedFS store (one identity: the trainer and the devices use the same key here)."""
    return s3_store


def _aws_env(monkeypatch, s3, *, endpoint: bool, secret: str | None = None) -> None:
    """Only these standard AWS variables: the store's key (its secret, or ``secret``), and its endpoint if asked."""
    for name in AWS_NAMES:
        monkeypatch.delenv(name, raising=False)
    if endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key if secret is None else secret)


def _bucket(s3, name: str) -> str:
    s3.create_bucket(name)
    return name


@pytest.fixture(autouse=True)
def _no_aws_env(monkeypatch):
    for name in AWS_NAMES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def registry(tmp_path):
    """The trainer's registry working repo (its origin a bare repo the devices read) and trainer settings."""
    from har_edge.trainer.settings import load_settings as trainer_settings

    repo, origin = registry_repo(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(
        f"data:\n  cache_dir: {tmp_path / 'cache'}\nmlflow:\n  tracking_uri: sqlite:///{tmp_path / 'mlflow.db'}\n"
    )
    return repo, origin, trainer_settings(params)


def _release(settings, tmp_path: Path, repo: Path, version: str, remote: str):
    from har_edge.trainer.release import release

    folder = make_model_folder(tmp_path / f"model-{version}", version)
    return release(settings, folder, registry=str(repo), remote=remote), folder


def _device(tmp_path: Path, origin: Path, endpoint: str, name: str = "dev-s3", inside_dvc_project: bool = False):
    data = tmp_path / name
    if inside_dvc_project:  # the registry (a local path) and the data dir inside another DVC project
        subprocess.run([*dvc_command(), "init", "-q", "--no-scm"], cwd=tmp_path, check=True, capture_output=True)
    data.mkdir()
    s = load_settings(
        env={},
        data_dir=data,
        device_id=name,
        sync={"registry": str(origin), "dvc_remote_endpoint": endpoint, "command_timeout_s": 60},
    )
    return ModelManager(s)


def _object_key(prefix: str, data: bytes) -> str:
    md5 = hashlib.md5(data).hexdigest()
    return f"{prefix}/files/md5/{md5[:2]}/{md5[2:]}"


@pytest.mark.slow
def test_a_release_to_s3_is_pulled_verified_and_activated(s3, registry, tmp_path, monkeypatch, caplog):
    repo, origin, ts = registry
    bucket = _bucket(s3, "models")
    remote = f"s3://{bucket}/har"
    # the trainer: endpoint and keys from the standard AWS variables
    _aws_env(monkeypatch, s3, endpoint=True)
    caplog.set_level(logging.DEBUG)
    r0, folder0 = _release(ts, tmp_path, repo, V0, remote)
    assert r0.created and r0.remote == remote and r0.git_pushed
    key = _object_key("har", (folder0 / "model.tflite").read_bytes())
    assert s3.client().get_object(Bucket=bucket, Key=key)["Body"].read() == (folder0 / "model.tflite").read_bytes()
    assert "endpointurl" not in (repo / ".dvc" / "config").read_text()  # the endpoint stays the trainer's

    # the device: the endpoint from sync.dvc_remote_endpoint, the key from the AWS variables
    _aws_env(monkeypatch, s3, endpoint=False)
    mm = _device(tmp_path, origin, s3.endpoint)
    t0 = time.monotonic()
    report = mm.update(time.time())
    assert report.activated == V0, report.summary()
    print(f"\n[measure] pull from S3 to activation {time.monotonic() - t0:.2f} s")
    assert read_pointer(mm.models_dir) == V0
    assert (mm.models_dir / V0 / "model.tflite").read_bytes() == (folder0 / "model.tflite").read_bytes()

    # the trainer again, endpoint and keys in the registry's DVC config (config.local: never committed)
    for name in AWS_NAMES:
        monkeypatch.delenv(name, raising=False)
    dvc = [*dvc_command(), "remote", "modify", "--local", "storage"]
    for opt, value in (
        ("endpointurl", s3.endpoint),
        ("access_key_id", s3.access_key),
        ("secret_access_key", s3.secret_key),
    ):
        subprocess.run([*dvc, opt, value], cwd=repo, check=True, capture_output=True)
    r1, _ = _release(ts, tmp_path, repo, V1, remote)
    assert r1.created
    assert s3.secret_key not in git(repo, "show", "HEAD:.dvc/config")
    _aws_env(monkeypatch, s3, endpoint=False)
    mm = _device(tmp_path, origin, s3.endpoint, "dev-s3-b", inside_dvc_project=True)
    assert mm.update(time.time()).activated == V1

    secret = s3.secret_key
    assert secret not in caplog.text
    assert all(secret not in str(row) for row in sqlite_ids(mm.outbox, "SELECT * FROM deployments"))
    assert secret not in (mm.models_dir / "sync-state.json").read_text()


@pytest.mark.slow
def test_a_corrupted_object_in_the_bucket_is_refused(s3, registry, tmp_path, monkeypatch):
    repo, origin, ts = registry
    bucket = _bucket(s3, "corrupt")
    _aws_env(monkeypatch, s3, endpoint=True)
    _release(ts, tmp_path, repo, V0, f"s3://{bucket}/har")
    mm = _device(tmp_path, origin, s3.endpoint)
    assert mm.update(time.time()).activated == V0
    _, folder = _release(ts, tmp_path, repo, V1, f"s3://{bucket}/har")
    raw = bytearray((folder / "model.tflite").read_bytes())
    key = _object_key("har", bytes(raw))
    raw[len(raw) // 2] ^= 0xFF
    s3.client().put_object(Bucket=bucket, Key=key, Body=bytes(raw))  # one byte flipped in the stored object
    monkeypatch.delenv("AWS_ENDPOINT_URL")

    report = mm.update(time.time())
    assert report.activated is None and [v for v, _ in report.refused] == [V1]
    reason = report.refused[0][1]
    assert "sha256" in reason and "DVC does not verify remote objects" in reason and f"{MODEL_NAME}@v{V1}" in reason
    assert read_pointer(mm.models_dir) == V0 and not (mm.models_dir / V1).exists()
    assert sqlite_ids(mm.outbox, "SELECT to_version, outcome FROM deployments ORDER BY id")[-1] == (V1, "refused")


@pytest.mark.slow
def test_a_wrong_key_fails_the_fetch_without_showing_it(s3, registry, tmp_path, monkeypatch):
    repo, origin, ts = registry
    bucket = _bucket(s3, "wrongkey")
    _aws_env(monkeypatch, s3, endpoint=True)
    _release(ts, tmp_path, repo, V0, f"s3://{bucket}/har")
    wrong = "wrong-secret-" + "x" * 20
    _aws_env(monkeypatch, s3, endpoint=False, secret=wrong)
    mm = _device(tmp_path, origin, s3.endpoint)
    from har_edge.sync.errors import RegistryError

    with pytest.raises(RegistryError) as exc:
        mm.update(time.time())
    assert "dvc get" in str(exc.value) and wrong not in str(exc.value)
    assert read_pointer(mm.models_dir) is None


def test_the_endpoint_setting_refuses_credentials_in_the_url(tmp_path):
    from har_edge.agent.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sync\.dvc_remote_endpoint: .*AWS_ACCESS_KEY_ID"):
        load_settings(env={}, data_dir=tmp_path, sync={"dvc_remote_endpoint": "http://key:secret@127.0.0.1:8333"})
    with pytest.raises(ConfigError, match=r"sync\.dvc_remote_endpoint: .*http"):
        load_settings(env={}, data_dir=tmp_path, sync={"dvc_remote_endpoint": "127.0.0.1:8333"})
    s = load_settings(env={"HAR_EDGE_SYNC__DVC_REMOTE_ENDPOINT": "https://s3.example.org"}, data_dir=tmp_path)
    assert s.sync.dvc_remote_endpoint == "https://s3.example.org"

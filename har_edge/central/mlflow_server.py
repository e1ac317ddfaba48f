"""The central ``mlflow server``: PostgreSQL backend, S3 artifact destination, several workers, basic-auth.

- runs, metrics and the model registry in PostgreSQL (``mlflow`` database);
- artifacts proxied by the server to ``--artifacts-destination s3://bucket/prefix``
  (devices upload through the server: they never hold S3 credentials); the
  server reads the store's endpoint and keys from ``MLFLOW_S3_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (boto3);
- ``--app-name basic-auth`` with its users and permissions in PostgreSQL too
  (``mlflow_auth``), written into an auth config file that ``MLFLOW_AUTH_CONFIG_PATH``
  names. The admin account is made at the first start from
  ``MLFLOW_AUTH_ADMIN_PASSWORD``; ``default_permission = NO_PERMISSIONS``, so a
  device account sees only the experiments it was granted
  (:mod:`har_edge.central.accounts`);
- TLS, when a certificate and key are given, by uvicorn itself (``--ssl-certfile``).

Every password travels in the server's environment, none on its command line.
"""

from __future__ import annotations

import logging
import os
import shlex
import ssl
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from har_edge.central.postgres import Postgres
from har_edge.central.process import Service, free_port
from har_edge.central.secrets_store import secret
from har_edge.common import telemetry

log = logging.getLogger(__name__)

ADMIN = "admin"
#: a device account sees nothing it was not granted (MLflow's own default is READ on everything)
DEFAULT_PERMISSION = "NO_PERMISSIONS"


@dataclass(frozen=True)
class S3Target:
    """Where the server puts artifacts, and how it reaches the store."""

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str
    prefix: str = "mlflow-artifacts"
    region: str = "us-east-1"

    @property
    def destination(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def env(self) -> dict[str, str]:
        return {
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }


@dataclass(frozen=True)
class Tls:
    """The server's certificate chain and key, and the CA that devices trust (``sync.server_cert_path``)."""

    cert: Path
    key: Path
    ca: Path


class MlflowCentral:
    """``mlflow server`` for a fleet; ``url`` is what devices set as ``sync.tracking_uri``."""

    def __init__(
        self,
        root: Path,
        postgres: Postgres,
        s3: S3Target,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        workers: int = 2,
        auth: bool = True,
        auth_cache_ttl_s: int = 300,
        tls: Tls | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.dir = self.root / "mlflow"
        self.postgres = postgres
        self.s3 = s3
        self.host = host
        self.port = port or free_port()
        self.workers = workers
        self.auth = auth
        self.auth_cache_ttl_s = auth_cache_ttl_s
        self.tls = tls
        self.service: Service | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        host = "127.0.0.1" if self.host in {"0.0.0.0", "::"} else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def admin_password(self) -> str:
        return secret(self.root, "mlflow-admin-password")

    @property
    def log_path(self) -> Path:
        return self.root / "logs" / "mlflow.log"

    def auth_config(self) -> Path:
        """The basic-auth config file (no password in it: the admin's comes from the environment)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "basic_auth.ini"
        path.write_text(
            "[mlflow]\n"
            f"default_permission = {DEFAULT_PERMISSION}\n"
            f"database_uri = {self.postgres.sqlalchemy_uri('mlflow_auth')}\n"
            f"admin_username = {ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {self.auth_cache_ttl_s}\n",
            encoding="utf-8",
        )
        return path

    def command(self) -> list[str]:
        mlflow = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(mlflow), "server",
            "--backend-store-uri", self.postgres.sqlalchemy_uri("mlflow"),
            "--artifacts-destination", self.s3.destination,
            "--serve-artifacts",
            "--host", self.host, "--port", str(self.port), "--workers", str(self.workers),
        ]  # fmt: skip
        if self.auth:
            cmd += ["--app-name", "basic-auth"]
        if self.tls:
            opts = f"--ssl-certfile {shlex.quote(str(self.tls.cert))} --ssl-keyfile {shlex.quote(str(self.tls.key))}"
            cmd += ["--uvicorn-opts", opts]
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
            env.pop(name, None)
        env.update(self.postgres.env())
        env.update(self.s3.env())
        env.update(
            {
                # the job runner starts worker processes a fleet server does not use
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secret(self.root, "mlflow-flask-secret"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        telemetry.opt_out(env)
        if self.auth:
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.auth_config())
            env["MLFLOW_AUTH_ADMIN_PASSWORD"] = self.admin_password
        return env

    def start(self, timeout_s: float = 240.0) -> float:
        """Start and wait until ``/health`` answers; returns the seconds it took."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.service = Service("mlflow server", self.command(), self.log_path, self.environment())
        self.service.start(cwd=self.dir)
        seconds = self.service.wait_until(self.healthy, timeout_s, f"/health on {self.url}")
        log.info("MLflow up on %s in %.1f s (%d workers, auth %s)", self.url, seconds, self.workers, self.auth)
        return seconds

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=str(self.tls.ca))

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2, context=self.ssl_context()) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (uvicorn drains open connections), SIGKILL after ``timeout_s``."""
        if self.service is not None:
            self.service.stop(timeout_s)

    def pids(self) -> list[int]:
        """The server's process tree (uvicorn's supervisor and its workers), for CPU accounting."""
        if self.service is None or self.service.pid is None:
            return []
        import psutil

        try:
            top = psutil.Process(self.service.pid)
            return [top.pid, *(c.pid for c in top.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

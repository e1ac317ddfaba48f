"""The whole central stack on one host: PostgreSQL, SeaweedFS (S3) and the MLflow server, started in order.

The Python API that ``make central``, the tests and ``bench/fleet.py`` share::

    with CentralStack(root) as stack:                 # start() ... stop()
        account = stack.add_device("watch-01")        # user + experiment har-edge/watch-01, MANAGE
        env = stack.device_env(account)               # MLFLOW_TRACKING_URI/USERNAME/PASSWORD (+ cert path)
        stack.s3_client().list_objects_v2(Bucket=stack.bucket)
        stack.cpu_seconds()                           # {"mlflow": .., "postgres": .., "s3": ..}

Everything lives under ``root``: ``pg/`` (PostgreSQL's data dir), ``s3/``
(SeaweedFS), ``mlflow/`` (auth config), ``logs/``, ``secrets/`` (generated
passwords, 0600) and ``stack.json`` (ports and URLs, no secrets). Ports are
free ones unless given, and are kept for restarts of the same object (outage
tests stop one service and start it again where clients expect it).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from har_edge.central.accounts import Admin, DeviceAccount
from har_edge.central.mlflow_server import ADMIN, MlflowCentral, S3Target, Tls
from har_edge.central.postgres import Postgres
from har_edge.central.seaweed import SeaweedS3
from har_edge.central.secrets_store import secret

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
DEFAULT_BUCKET = "har-edge"
ARTIFACT_PREFIX = "mlflow-artifacts"


@dataclass(frozen=True)
class StackOptions:
    host: str = "127.0.0.1"
    mlflow_port: int | None = None
    postgres_port: int | None = None
    s3_port: int | None = None
    workers: int = 2
    auth: bool = True
    #: seconds a worker trusts a checked password (MLflow's ``auth_cache_ttl_seconds``; 0: check every request).
    #: Each check is a scrypt hash, measured 0.40 s of CPU here: without the cache every request pays it.
    #: A changed or deleted password may keep working on other workers for this long.
    auth_cache_ttl_s: int = 300
    tls: bool = False
    bucket: str = DEFAULT_BUCKET


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of a process, its live descendants, and the children it already reaped (0: no process)."""
    import psutil

    if not pid:
        return 0.0
    try:
        top = psutil.Process(pid)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class CentralStack:
    def __init__(self, root: Path, options: StackOptions | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.options = o = options or StackOptions()
        self.postgres = Postgres(self.root, port=o.postgres_port)
        self.store = SeaweedS3(self.root / "s3", secret_key=secret(self.root, "s3-secret-key"))
        if o.s3_port:
            self.store.ports["s3.port"] = o.s3_port
        self.tls: Tls | None = None
        if o.tls:
            from har_edge.central.tls import make_ca_and_server_cert

            names = ["127.0.0.1", "localhost"] + ([o.host] if o.host not in {"127.0.0.1", "0.0.0.0", "::"} else [])
            self.tls = make_ca_and_server_cert(self.root / "tls", names)
        self.mlflow = MlflowCentral(
            self.root,
            self.postgres,
            S3Target(self.store.endpoint, o.bucket, self.store.access_key, self.store.secret_key, ARTIFACT_PREFIX),
            port=o.mlflow_port,
            host=o.host,
            workers=o.workers,
            auth=o.auth,
            auth_cache_ttl_s=o.auth_cache_ttl_s,
            tls=self.tls,
        )
        self.timings: dict[str, float] = {}

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> dict[str, float]:
        """Start PostgreSQL, the object store (and its bucket, versioned) and MLflow; seconds each took."""
        t0 = time.monotonic()
        self.timings["postgres_s"] = self.postgres.start()
        t1 = time.monotonic()
        (self.root / "s3").mkdir(parents=True, exist_ok=True)
        self.store.start()
        self.store.create_bucket(self.bucket)
        self._version_bucket()
        self.timings["s3_s"] = time.monotonic() - t1
        self.timings["mlflow_s"] = self.mlflow.start()
        self.timings["total_s"] = time.monotonic() - t0
        self.write_state()
        return dict(self.timings)

    def _version_bucket(self) -> None:
        """Bucket versioning: an overwritten or deleted artifact stays recoverable (docs/deploy.md)."""
        try:
            self.s3_client().put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})
        except Exception as exc:  # a store without versioning still works; the backup section says so
            log.warning("could not turn on versioning of bucket %s: %s", self.bucket, exc)

    def stop(self) -> None:
        """Stop MLflow, then the object store, then PostgreSQL (each one that is running)."""
        for what, stop in (("mlflow", self.mlflow.stop), ("s3", self.store.stop), ("postgres", self.postgres.stop)):
            try:
                stop()
            except Exception as exc:
                log.warning("stopping %s failed: %s", what, exc)

    def __enter__(self) -> CentralStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what clients need ------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The tracking URI devices use."""
        return self.mlflow.url

    @property
    def bucket(self) -> str:
        return self.options.bucket

    @property
    def artifact_prefix(self) -> str:
        """Artifacts of experiment E, run R are under ``s3://<bucket>/<prefix>/E/R/artifacts/``."""
        return ARTIFACT_PREFIX

    @property
    def ca_path(self) -> Path | None:
        """The CA bundle devices trust (``sync.server_cert_path``) when the stack serves TLS."""
        return self.tls.ca if self.tls else None

    @property
    def admin_password(self) -> str:
        return self.mlflow.admin_password

    def admin(self) -> Admin:
        return Admin(self.url, self.admin_password, username=ADMIN, verify=str(self.ca_path) if self.ca_path else True)

    def add_device(self, device: str, password: str | None = None, *, rotate: bool = False) -> DeviceAccount:
        return self.admin().add_device(device, password, rotate=rotate)

    def device_env(self, account: DeviceAccount | None = None) -> dict[str, str]:
        """MLflow's variables for a device (or, without an account, the admin)."""
        env = {"MLFLOW_TRACKING_URI": self.url}
        if self.options.auth:
            if account is None:
                env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = ADMIN, self.admin_password
            else:
                env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = account.username, account.password
        if self.ca_path:
            env["MLFLOW_TRACKING_SERVER_CERT_PATH"] = str(self.ca_path)
        return env

    def device_settings(self, account: DeviceAccount) -> dict[str, Any]:
        """The ``sync`` section of a device's settings, as keyword overrides for ``load_settings``."""
        sync: dict[str, Any] = {"tracking_uri": self.url, "experiment": account.experiment}
        if self.options.auth:
            sync["username"], sync["password"] = account.username, account.password
        if self.ca_path:
            sync["server_cert_path"] = self.ca_path
        return {"device_id": account.device, "sync": sync}

    def s3_client(self) -> Any:
        return self.store.client()

    def artifact_keys(self) -> list[str]:
        """Every object key under the artifact prefix (all pages)."""
        s3 = self.s3_client()
        keys: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=ARTIFACT_PREFIX + "/"):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return keys

    # -- accounting ---------------------------------------------------------------------------

    def pids(self) -> dict[str, int | None]:
        """The root process of each service (uvicorn's supervisor, the postmaster, weed)."""
        pg_pid = None
        pidfile = self.postgres.data_dir / "postmaster.pid"
        if pidfile.exists():
            try:
                pg_pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pg_pid = None
        return {
            "mlflow": self.mlflow.service.pid if self.mlflow.service else None,
            "postgres": pg_pid,
            "s3": self.store.proc.pid if self.store.proc else None,
        }

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by each service's process tree (reaped children included)."""
        return {name: tree_cpu(pid) for name, pid in self.pids().items()}

    def write_state(self) -> Path:
        """``stack.json``: URLs, ports, pids and where the secrets are (none of their values)."""
        state = {
            "url": self.url,
            "admin_user": ADMIN if self.options.auth else None,
            "admin_password_file": str(self.root / "secrets" / "mlflow-admin-password") if self.options.auth else None,
            "ca": str(self.ca_path) if self.ca_path else None,
            "postgres": {"host": "127.0.0.1", "port": self.postgres.port, "databases": ["mlflow", "mlflow_auth"]},
            "s3": {"endpoint": self.store.endpoint, "bucket": self.bucket, "prefix": ARTIFACT_PREFIX},
            "workers": self.options.workers,
            "auth": self.options.auth,
            "pids": self.pids(),
            "logs": str(self.root / "logs"),
        }
        path = self.root / STATE_FILE
        path.write_text(json.dumps(state, indent=2), encoding="utf-8")
        return path

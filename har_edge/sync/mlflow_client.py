"""Where the results go, and an MlflowClient that fails fast.

The target follows MLflow's own conventions: ``har_edge.sync.tracking_uri`` or
``MLFLOW_TRACKING_URI``; without either, an embedded store
``sqlite:///<data_dir>/mlflow/mlflow.db`` with artifacts beside it (the
./mlruns file store is in maintenance mode in MLflow 3.x, and the sqlite
store needs alembic). Credentials come from MLflow's variables
(``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``,
``MLFLOW_TRACKING_SERVER_CERT_PATH``) unless the settings give them; MLflow
reads these from the environment on every request, so settings are applied
there, for this process only. They are never logged: only
:attr:`Target.display` (the URI without user info) is.

MLflow's defaults retry a refused connection for minutes (measured: 247 s);
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` are set
from the settings so a pass fails in about a second and the daemon backs off.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from har_edge.agent.settings import Settings
from har_edge.sync.errors import ServerAccessDenied, ServerRejected
from har_edge.sync.retry import translate

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

EMBEDDED_DIR = "mlflow"

#: the process environment variables :func:`configure_environment` may set
ENV_NAMES = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
)


@dataclass(frozen=True)
class Target:
    uri: str
    #: True when a server was configured (settings or MLFLOW_TRACKING_URI) rather than the embedded store
    configured: bool
    #: artifact location for a newly created experiment (local stores only; a server decides its own)
    artifact_location: str | None

    @property
    def is_server(self) -> bool:
        return self.uri.startswith(("http://", "https://"))

    @property
    def display(self) -> str:
        """The URI without credentials, safe to log."""
        parts = urlsplit(self.uri)
        if parts.username or parts.password:
            host = parts.hostname or ""
            if parts.port:
                host += f":{parts.port}"
            return urlunsplit((parts.scheme, host, parts.path, "", ""))
        return self.uri


def resolve_target(settings: Settings, env: MutableMapping[str, str] | None = None) -> Target:
    env = os.environ if env is None else env
    uri = settings.sync.tracking_uri or env.get("MLFLOW_TRACKING_URI") or ""
    root = Path(settings.data_dir).resolve() / EMBEDDED_DIR
    local_artifacts = (root / "artifacts").as_uri()
    if not uri:
        return Target(f"sqlite:///{root / 'mlflow.db'}", configured=False, artifact_location=local_artifacts)
    is_server = uri.startswith(("http://", "https://"))
    return Target(uri, configured=is_server, artifact_location=None if is_server else local_artifacts)


def configure_environment(settings: Settings, env: MutableMapping[str, str] | None = None) -> None:
    """Bound MLflow's HTTP retries and time-out, and apply credentials given in the settings."""
    env = os.environ if env is None else env
    s = settings.sync
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(s.http_max_retries)
    # MLflow parses it as an int: round up so 0.5 does not become "no time-out"
    env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(s.request_timeout_s)))
    # set_terminated would print run links to stdout (and fetch the run once more to build them)
    env["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    overrides = {
        "MLFLOW_TRACKING_USERNAME": s.username,
        "MLFLOW_TRACKING_PASSWORD": s.password,
        "MLFLOW_TRACKING_TOKEN": s.token,
        "MLFLOW_TRACKING_SERVER_CERT_PATH": str(s.server_cert_path) if s.server_cert_path else None,
    }
    for name, value in overrides.items():
        if value:
            env[name] = value


def make_client(settings: Settings, target: Target | None = None) -> MlflowClient:
    """An MlflowClient for the target (imports mlflow: ~2 s, so only when there is something to do)."""
    target = target or resolve_target(settings)
    configure_environment(settings)
    if not target.is_server:
        Path(settings.data_dir).resolve().joinpath(EMBEDDED_DIR).mkdir(parents=True, exist_ok=True)
    from har_edge.sync.mlflow_import import import_mlflow

    import_mlflow()  # without pandas/pyarrow/scipy: -70 MB resident
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=target.uri)


def ensure_experiment(client: MlflowClient, target: Target, name: str) -> str:
    """The id of the experiment ``name``, created when missing; a deleted one is a configuration error."""
    try:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                exp_id = client.create_experiment(
                    name, artifact_location=target.artifact_location, tags={"har.created_by": "har-edge sync"}
                )
                log.info("created MLflow experiment %r at %s", name, target.display)
                return exp_id
            except Exception as exc:  # another device created it at the same moment
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise exc
    except Exception as exc:
        err = translate(exc, f"looking up experiment {name!r}", target.display)
        if err is None:
            raise
        if isinstance(err, ServerRejected):
            raise ServerAccessDenied(
                f"MLflow at {target.display} refused experiment {name!r}: {err}: set sync.experiment to a usable name"
            ) from exc
        raise err from exc
    if exp.lifecycle_stage == "deleted":
        raise ServerAccessDenied(
            f"experiment {name!r} is deleted on {target.display}: restore it there "
            "(mlflow experiments restore) or set sync.experiment to another name"
        )
    return exp.experiment_id

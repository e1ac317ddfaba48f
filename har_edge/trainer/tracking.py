"""MLflow: one run per trained model, resumed by the later stages; registry versions at release.

Works against a tracking server (``http(s)://``) and a local store
(``sqlite:///...``, artifacts beside it under ``mlartifacts/``). Everything goes
through :class:`mlflow.MlflowClient` (no global active run). Tags:

* ``har.run_kind`` — ``training``, ``fine_tuning``, ``hyperparameter_search``, ``release``...
* ``har.model_name``, ``har.model_version``, ``har.data_source``
* ``har.data_sha256`` (prepared windows), ``har.data_dvc_md5`` (DVC's hash of
  ``build/trainer/prepared.npz``, as in ``dvc.lock``), ``har.source_sha256``
* ``har.sha256`` (model.tflite, after export), ``har.gate`` (passed/failed)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from har_edge.trainer.settings import Settings

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

_MAX_PARAM_CHARS = 6000


def _quiet() -> None:
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking", "mlflow.store"):
        logging.getLogger(name).setLevel(logging.WARNING)


def client(settings: Settings) -> MlflowClient:
    """A client for the configured tracking URI (also the registry URI)."""
    return _client(settings.tracking_uri)


@functools.lru_cache(maxsize=8)
def _client(uri: str) -> MlflowClient:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    _quiet()
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(c: MlflowClient, settings: Settings) -> str:
    name = settings.mlflow.experiment
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if settings.tracking_uri.startswith("sqlite:///"):
        store = Path(settings.tracking_uri[len("sqlite:///") :])
        location = (store.parent / "mlartifacts").resolve().as_uri()
    return c.create_experiment(name, artifact_location=location)


def start_run(settings: Settings, *, kind: str | None = None, extra_tags: Mapping[str, str] | None = None) -> str:
    """Create the run of this model; return its id."""
    c = client(settings)
    tags = {
        "har.run_kind": kind or settings.mlflow.run_kind,
        "har.model_name": settings.export.name,
        "har.model_version": settings.export.version,
        "har.data_source": settings.data.source,
        "har.arch": settings.train.arch,
        **settings.mlflow.tags,
        **(extra_tags or {}),
    }
    run = c.create_run(experiment_id(c, settings), run_name=settings.run_name, tags=tags)
    log.info(
        "MLflow run %s (%s) in experiment %r at %s",
        run.info.run_id,
        settings.run_name,
        settings.mlflow.experiment,
        settings.tracking_uri,
    )
    return run.info.run_id


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def log_params(settings: Settings, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    c = client(settings)
    items = [Param(str(k), str(v)[:_MAX_PARAM_CHARS]) for k, v in sorted(params.items())]
    for part in _chunks(items, 100):
        c.log_batch(run_id, params=part)


def log_metrics(
    settings: Settings, run_id: str, metrics: Mapping[str, float], step: int = 0, timestamp_ms: int | None = None
) -> None:
    from mlflow.entities import Metric

    c = client(settings)
    ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    items = [Metric(str(k), float(v), ts, step) for k, v in sorted(metrics.items())]
    for part in _chunks(items, 1000):
        c.log_batch(run_id, metrics=part)


def set_tags(settings: Settings, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    c = client(settings)
    items = [RunTag(str(k), str(v)) for k, v in tags.items()]
    for part in _chunks(items, 100):
        c.log_batch(run_id, tags=part)


def log_artifacts(settings: Settings, run_id: str, paths: Iterable[Path], artifact_path: str | None = None) -> None:
    c = client(settings)
    for p in paths:
        p = Path(p)
        if p.is_dir():
            c.log_artifacts(run_id, str(p), artifact_path)
        else:
            c.log_artifact(run_id, str(p), artifact_path)


def end_run(settings: Settings, run_id: str, status: str = "FINISHED") -> None:
    client(settings).set_terminated(run_id, status)


def run_exists(settings: Settings, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        client(settings).get_run(run_id)
        return True
    except MlflowException:
        return False


def epoch_logger(settings: Settings, run_id: str) -> Any:
    """A Keras callback sending each epoch's logs (loss, accuracy, val_*) as metrics with step=epoch."""
    import keras

    class _EpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = dict(logs or {})
            lr = getattr(self.model.optimizer, "learning_rate", None)
            if lr is not None:
                with contextlib.suppress(TypeError, ValueError):
                    logs["learning_rate"] = float(keras.ops.convert_to_numpy(lr))
            log_metrics(settings, run_id, {k: float(v) for k, v in logs.items()}, step=epoch)
            log.debug("epoch %d: %s", epoch + 1, ", ".join(f"{k} {float(v):.4f}" for k, v in sorted(logs.items())))

    return _EpochLogger()


# -- registry -------------------------------------------------------------------


def register_version(
    settings: Settings,
    *,
    name: str,
    run_id: str,
    artifact_path: str,
    sha256: str,
    tags: Mapping[str, str],
    description: str = "",
    alias: str | None = None,
) -> tuple[str, bool]:
    """The registry version of ``name`` whose ``sha256`` tag matches, created if missing.

    Returns ``(version, created)``. ``mlflow.register_model`` refuses folders that
    are not MLflow models in 3.x, so the version is made with
    ``create_model_version(source="runs:/<run>/<path>")``. ``alias`` (when given)
    is moved to this version.
    """
    from mlflow.exceptions import MlflowException

    c = client(settings)
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(
            name, tags={"har.kind": "har-edge tflite model"}, description="int8 TFLite HAR models released through DVC"
        )
    existing = c.search_model_versions(f"name = '{name}' and tag.sha256 = '{sha256}'")
    if existing:
        version, created = str(existing[0].version), False
    else:
        mv = c.create_model_version(
            name,
            source=f"runs:/{run_id}/{artifact_path}",
            run_id=run_id,
            tags={"sha256": sha256, **tags},
            description=description,
        )
        version, created = str(mv.version), True
    if alias:
        c.set_registered_model_alias(name, alias, version)
    return version, created


def alias_version(settings: Settings, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client(settings).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None

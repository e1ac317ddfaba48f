"""MLflow runs found by identity tags before they are ever created.

``create_run`` always makes a new run, so a retry after a
crash between "created" and "remembered" would make a second one. Every run
sync creates carries identity tags (set atomically by ``create_run``) and is
looked up by them first:

- file run: ``har.kind=file``, ``har.device``, ``har.file_sha256``
- device run: ``har.kind=device``, ``har.device`` (heartbeat points, current model tag)
- deployment run: ``har.kind=deployment``, ``har.deployment_key`` = ``<device>/<row id>/<time ms>``,
  nested under the device run (``mlflow.parentRunId``)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

KIND = "har.kind"
DEVICE = "har.device"
FILE_SHA = "har.file_sha256"
FILE_NAME = "har.file_name"
FILE_FORMAT = "har.file_format"
MODEL_NAME = "har.model_name"
MODEL_VERSION = "har.model_version"
MODEL_SHA = "har.model_sha256"
AGENT_VERSION = "har.agent_version"
DEPLOYMENT_KEY = "har.deployment_key"
ACTIVE_MODEL = "har.active_model_version"
PARENT = "mlflow.parentRunId"
MONITOR = "har.monitor"  # ok | warn | alert | too_short | no_reference (file runs)
DESCRIPTION = "mlflow.note.content"  # the run description MLflow shows
RETRAIN_REQUESTED = "har.retrain_requested"  # device run: time and number of the last retraining request

#: experiment ids per search_runs call
EXPERIMENT_CHUNK = 100

_SAFE_VALUE = re.compile(r"^[^'`\\]*$")


def identity_filter(identity: Mapping[str, str]) -> str:
    parts = []
    for key, value in identity.items():
        if not _SAFE_VALUE.match(value):
            raise ValueError(f"identity tag {key}={value!r} holds a quote or backslash: it cannot be searched for")
        parts.append(f"tags.`{key}` = '{value}'")
    return " AND ".join(parts)


def find_run(client: MlflowClient, experiment_id: str, identity: Mapping[str, str]) -> str | None:
    """The run carrying all identity tags (the oldest, if a race ever made two), or None."""
    runs = client.search_runs(
        [experiment_id], identity_filter(identity), max_results=5, order_by=["attributes.start_time ASC"]
    )
    if not runs:
        return None
    if len(runs) > 1:
        log.warning(
            "%d runs carry %s; using the oldest, %s",
            len(runs),
            ", ".join(f"{k}={v}" for k, v in identity.items()),
            runs[0].info.run_id,
        )
    run_id: str = runs[0].info.run_id  # RunInfo.run_id is a property subclass: mypy sees Any
    return run_id


def find_or_create_run(
    client: MlflowClient,
    experiment_id: str,
    identity: Mapping[str, str],
    *,
    tags: Mapping[str, str] = {},
    run_name: str | None = None,
    start_time: int | None = None,
) -> tuple[str, bool]:
    """(run id, created) for the run with these identity tags."""
    found = find_run(client, experiment_id, identity)
    if found is not None:
        return found, False
    run = client.create_run(experiment_id, start_time=start_time, tags={**tags, **identity}, run_name=run_name)
    return run.info.run_id, True


def search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Run]:
    """Every active run of these experiments that matches ``filter_string``, all pages of it."""
    found: list[Run] = []
    for i in range(0, len(experiment_ids), EXPERIMENT_CHUNK):
        token: str | None = None
        while True:
            page = client.search_runs(
                experiment_ids[i : i + EXPERIMENT_CHUNK], filter_string, max_results=1000, page_token=token
            )
            found.extend(page)
            token = page.token
            if not token:
                break
    return found

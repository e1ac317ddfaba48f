"""Usage reporting of the libraries har-edge runs, off unless the user turns it on.

MLflow (3.2 and later) reports anonymous usage by default: at import its client starts a thread
that fetches a configuration from the MLflow project's servers and then sends events there. A
device that holds a study's data should talk only to the servers its settings name, so every
har-edge entry point sets ``MLFLOW_DISABLE_TELEMETRY=true`` unless the variable is already set (a
user who wants to share usage data sets it to ``false``). DVC's analytics are off the same way in
every git/dvc call (:func:`har_edge.common.proc.tool_env`).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: variable -> value that turns a library's usage reporting off
OPT_OUT = {"MLFLOW_DISABLE_TELEMETRY": "true"}


def opt_out(env: MutableMapping[str, str] | None = None) -> None:
    """Turn usage reporting off in ``env`` (the process's environment by default), keeping a user's own choice."""
    target = os.environ if env is None else env
    for name, value in OPT_OUT.items():
        target.setdefault(name, value)

"""har-edge turns MLflow's usage reporting off in its own processes, unless the user chose otherwise.

MLflow decides at import whether to start its telemetry client (a thread that fetches a configuration
from the MLflow project's servers and sends usage events there). It also stays silent under pytest and
CI on its own, so each case runs in a fresh interpreter whose environment has none of the variables
MLflow reads as "testing" (PYTEST_CURRENT_TEST, CI, ...): what a device sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, os
from har_edge.sync.mlflow_import import import_mlflow
import_mlflow()
from mlflow.telemetry.client import get_telemetry_client
from mlflow.telemetry.utils import is_telemetry_disabled
print(json.dumps({"var": os.environ.get("MLFLOW_DISABLE_TELEMETRY"), "disabled": is_telemetry_disabled(),
                  "client": get_telemetry_client() is not None}))
"""


def _device_env(**extra: str) -> dict[str, str]:
    """This environment without the telemetry switches and without what MLflow reads as a CI or test run."""
    from mlflow.telemetry import utils

    env = {k: v for k, v in os.environ.items() if k not in {"MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"}}
    for name in [n for n in env if _marks_testing(utils, n)]:  # asked of MLflow itself: a new one is not missed
        env.pop(name)
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _marks_testing(utils: object, name: str) -> bool:
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ[name] = saved[name]
        return bool(utils._is_ci_env_or_testing())  # type: ignore[attr-defined]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _probe(env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sync_imports_mlflow_with_its_usage_reporting_off():
    got = _probe(_device_env())
    assert got == {"var": "true", "disabled": True, "client": False}


def test_a_user_who_opts_in_keeps_the_choice():
    got = _probe(_device_env(MLFLOW_DISABLE_TELEMETRY="false"))
    assert got["var"] == "false"
    assert got["disabled"] is False  # MLflow would report: har-edge did not override the user's setting


@pytest.mark.parametrize("entry", ["har_edge.cli", "har_edge.trainer.cli", "har_edge.central.cli"])
def test_every_entry_point_opts_out_before_it_runs(entry):
    code = (
        f"import os\nimport {entry} as m\ntry:\n    m.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(os.environ.get('MLFLOW_DISABLE_TELEMETRY'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_device_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "true"

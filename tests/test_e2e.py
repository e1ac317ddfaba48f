"""The whole loop on the host: release -> pull + activate -> agent -> push -> MLflow equals the outbox."""

from __future__ import annotations

import pytest
from e2e_loop import VERSION, run_loop


@pytest.mark.slow
@pytest.mark.server
def test_the_whole_loop(mlflow_server, tmp_path):
    result = run_loop(tmp_path / "loop", mlflow_server.url, log=lambda s: None)
    assert result["model_version"] == VERSION
    assert result["windows"] == 89  # 180 s at 50 Hz: 4 s windows every 2 s
    assert result["minutes"] == 4  # 07:52:19 + 180 s touches minutes 52..55, each in MLflow as in the outbox
    assert result["metric_points"] > 4 * 7

"""Sync's memory and pipeline: the predictions CSV streamed from the outbox, points read while a request is in
flight, and a ``sync once`` without the modules it does not use (MLflow's optional data-science stack among
them). Outputs must equal the unstreamed, serial ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from sync_helpers import add_file, assert_delivered_once, restore_mlflow_env, sqlite_ids, sync_senders  # noqa: F401

from har_edge.agent.outbox import Outbox
from har_edge.agent.settings import load_settings
from har_edge.sync.delivery import Delivery
from har_edge.sync.errors import ServerUnreachable
from har_edge.sync.predictions import write_predictions_csv, write_predictions_csv_parts
from har_edge.sync.push import Pusher


def test_the_streamed_csv_equals_the_whole_file_one_byte_for_byte(data_dir, tmp_path):
    ob = Outbox(data_dir / "outbox.sqlite")
    fid = add_file(ob, 3, minutes=30)  # 900 windows
    names, starts, probs = ob.file_windows(fid)
    whole = tmp_path / "whole.csv"
    rows = write_predictions_csv(whole, names, starts, probs)
    parts = list(Delivery(ob).iter_windows(fid, rows=97))  # uneven runs: the last one is short
    assert len(parts) == -(-len(starts) // 97) and all(len(s) <= 97 for s, _ in parts)
    streamed = tmp_path / "streamed.csv"
    n = write_predictions_csv_parts(streamed, names, iter(parts))
    assert n == rows == len(starts) == 900
    assert streamed.read_bytes() == whole.read_bytes()
    np.testing.assert_array_equal(np.concatenate([s for s, _ in parts]), starts)
    ob.close()


def _settings(data_dir, batch: int):
    return load_settings(env={}, data_dir=data_dir, device_id="dev-stream", sync={"batch_size": batch})


def test_pipelined_push_delivers_every_point_once(data_dir):
    settings = _settings(data_dir, 25)  # ~20 requests per file: reads and requests really overlap
    ob = Outbox(settings.outbox_path)
    for seed in (1, 2):
        add_file(ob, seed, minutes=40)
    p = Pusher(settings, ob)
    report = p.push(time.time())
    assert report.files_finished == 2 and report.artifacts == 2 and not report.refused
    assert report.points == sqlite_ids(ob, "SELECT count(*) FROM metrics WHERE file_id IS NOT NULL")[0][0] > 300
    assert_delivered_once(p, data_dir / "mlflow" / "mlflow.db")
    assert not sync_senders()  # the sending threads end with the pass


def test_a_request_failing_mid_file_leaves_the_acknowledged_chunks_marked_and_the_rest_pending(data_dir):
    settings = _settings(data_dir, 20)
    ob = Outbox(settings.outbox_path)
    fid = add_file(ob, 5, minutes=30)
    p = Pusher(settings, ob)
    p.push(time.time() - 10**6)  # heartbeat and run creation out of the way: reset the file's points below
    with ob.engine.begin() as c:
        c.exec_driver_sql("UPDATE metrics SET delivered_ms = NULL WHERE file_id = ?", (fid,))
        c.exec_driver_sql("UPDATE files SET finished_ms = NULL, artifact_delivered_ms = NULL WHERE id = ?", (fid,))
    # the network drops at the 4th request of the file: an exact request cannot be timed with a real outage,
    # so the client's log_batch fails there (the way requests raises a refused connection)
    real, calls = p.client.log_batch, [0]
    file_run = sqlite_ids(ob, f"SELECT run_id FROM files WHERE id = {fid}")[0][0]

    def log_batch(run_id, metrics=(), *a, **k):
        calls[0] += bool(metrics) and run_id == file_run  # the file's point requests only
        if calls[0] == 4 and metrics and run_id == file_run:
            raise ConnectionError("connection refused")
        return real(run_id, metrics, *a, **k)

    p.client.log_batch = log_batch
    with pytest.raises(ServerUnreachable):
        p.push(time.time())
    delivered = sqlite_ids(ob, f"SELECT count(*) FROM metrics WHERE file_id = {fid} AND delivered_ms IS NOT NULL")
    assert delivered == [(3 * 20,)]  # the three acknowledged chunks, not the one that failed nor the one read ahead
    assert not sync_senders()
    p.client.log_batch = real
    p.push(time.time())
    assert_delivered_once(p, data_dir / "mlflow" / "mlflow.db")


#: what a ``sync once`` with nothing to pull and no raw store never needs (docs/benchmarks.md, the memory row):
#: MLflow's optional data-science stack and the optional imports of its libraries (hidden while it imports),
#: the numpy.ma np.unique loads, S3 custody's boto3 and the signature code's cryptography
_UNUSED = ("pandas", "pyarrow", "scipy", "charset_normalizer", "chardet", "psutil", "numpy.ma", "boto3",
           "botocore", "cryptography")  # fmt: skip

_PROBE = """
import json, sys
from har_edge.cli import main
code = main(["--data-dir", sys.argv[1], "sync", "once"])
loaded = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
import pandas, psutil, charset_normalizer  # still importable afterwards: nothing stays hidden
print(json.dumps({"code": code, "loaded": loaded}))
"""


@pytest.mark.parametrize("where", ["embedded", pytest.param("server", marks=pytest.mark.server)])
def test_sync_once_imports_nothing_it_does_not_use_and_delivers(where, data_dir, request, monkeypatch):
    """A real ``sync once`` (points, prediction CSVs, pages) in a fresh interpreter: MLflow works without the
    hidden packages, and none of the unused ones is loaded, whoever would import them first."""
    ob = Outbox(data_dir / "outbox.sqlite")
    for seed in (1, 2):
        add_file(ob, seed, minutes=30)
    ob.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HAR_EDGE_", "MLFLOW_TRACKING"))}
    unused = [m for m in _UNUSED if m != "cryptography"]  # MLflow's own SQL store (the embedded one) imports it
    if where == "server":
        unused = list(_UNUSED)
        env["HAR_EDGE_SYNC__TRACKING_URI"] = request.getfixturevalue("mlflow_server").url
        env["HAR_EDGE_SYNC__EXPERIMENT"] = f"imports-{time.time_ns()}"
    out = subprocess.run([sys.executable, "-c", _PROBE, str(data_dir), json.dumps(unused)],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"code": 0, "loaded": []}
    assert "2 file run(s) finished" in out.stdout and "2 prediction CSV(s)" in out.stdout, out.stdout
    assert "character detection" not in out.stderr  # requests' warning about the missing detector is not shown
    ob = Outbox(data_dir / "outbox.sqlite")
    assert sqlite_ids(ob, "SELECT count(*) FROM metrics WHERE delivered_ms IS NULL") == [(0,)]
    assert sqlite_ids(ob, "SELECT count(*) FROM files WHERE artifact_delivered_ms IS NULL") == [(0,)]
    ob.close()

"""The last file's data time (the clock plausibility reference) survives a restart: two real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fitgen import write_imu_fit

from har_edge.agent.outbox import Outbox
from har_edge.agent.pipeline import latest_window_ms
from har_edge.agent.preprocess import FUTURE_SLACK_S, build_time_ms

ROOT = Path(__file__).resolve().parents[1]


def _process(data_dir: Path, src: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HAR_EDGE_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "har_edge.cli", "agent", "process", str(src)],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_a_restarted_agent_still_believes_times_after_the_last_files(tmp_path):
    # an offline box without RTC: every file is well ahead of "now" and of the build time
    ref = max(time.time() * 1000, build_time_ms()) / 1000
    slack = timedelta(seconds=FUTURE_SLACK_S)
    first = datetime.fromtimestamp(ref, UTC) + slack * 0.8  # believable now
    later = datetime.fromtimestamp(ref, UTC) + slack * 1.5  # believable only after a file 0.8 slack ahead
    a, b = tmp_path / "a.fit", tmp_path / "b.fit"
    write_imu_fit(a, rate_hz=50, seconds=60, start=first, seed=1, engine="fast")
    write_imu_fit(b, rate_hz=50, seconds=60, start=later, seed=2, engine="fast")
    data = tmp_path / "var"

    r = _process(data, a)
    assert r.returncode == 0 and "windows in" in r.stdout, r.stdout + r.stderr
    with Outbox(data / "outbox.sqlite") as ob:
        assert latest_window_ms(ob) is not None and latest_window_ms(ob) >= int(first.timestamp() * 1000)
    r = _process(data, b)  # a new process: the reference comes from the outbox
    assert r.returncode == 0 and "windows in" in r.stdout, r.stdout + r.stderr

    fresh = tmp_path / "fresh"  # the same file on a box that never saw the first one is refused
    r = _process(fresh, b)
    assert r.returncode != 0 and "plausible" in r.stdout, r.stdout + r.stderr

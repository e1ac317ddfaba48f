"""Clock plausibility: the last file's data time survives a restart (two real processes); a short forward
spike costs only its own samples."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fitgen import write_imu_fit

from har_edge.agent.decode.types import Chunk, Recording, SensorBlock
from har_edge.agent.outbox import Outbox
from har_edge.agent.pipeline import latest_window_ms
from har_edge.agent.preprocess import FUTURE_SLACK_S, build_time_ms, recording_windows

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


# -- a forward spike shorter than max_jump_s ---------------------------------------------------------------

T0 = 1_700_000_000_000


def _windows(t: np.ndarray, chunk: int = 10**6):
    s = np.arange(len(t)) / 50.0
    acc = np.stack([300 * np.sin(2 * np.pi * s), 100 * np.cos(s), 1000 + 0 * s], 1).astype(np.float32)
    gyr = np.stack([30 * np.sin(s), 0 * s, 5 * np.cos(s)], 1).astype(np.float32)

    def chunks():
        for i in range(0, len(t), chunk):
            sl = slice(i, i + chunk)
            yield Chunk(SensorBlock(t[sl], acc[sl]), SensorBlock(t[sl], gyr[sl]))

    return recording_windows(Recording("r", "test", chunks, has_gyro=True), rate_hz=50, window=200, step=100)


@pytest.mark.parametrize("ahead_ms", [3_000, 10_000, 3_600_000])
@pytest.mark.parametrize("chunk", [10**6, 333])
def test_a_short_forward_spike_costs_only_its_own_samples(ahead_ms, chunk):
    """One message a few seconds (or an hour) ahead, then the stream goes on: only the spike is dropped.

    Before, the spike was taken as the timeline: a spike under ~20 s ahead lost the next 1024 good samples
    (until the stream caught up with it), a longer one split the recording with a backward clock jump."""
    t = T0 + np.arange(6000, dtype=np.int64) * 20
    clean = _windows(t.copy())
    t[3000:3025] += ahead_ms  # one 25-sample message
    ws = _windows(t, chunk)
    q = ws.quality
    assert q["clock_dropped"] == 2 * 25 and q["clock_jumps"] == 1 and q["segments"] == 1  # accel + gyro
    assert len(ws) >= len(clean) - 2  # the windows over the spike's half second at most
    assert q["duration_s"] == pytest.approx(clean.quality["duration_s"], abs=1)


def test_a_real_gap_is_still_a_gap_not_a_jump():
    t = T0 + np.arange(6000, dtype=np.int64) * 20
    t[3000:] += 30_000  # the watch paused for 30 s
    ws = _windows(t)
    assert ws.quality["clock_jumps"] == 0 and ws.quality["clock_dropped"] == 0 and ws.quality["segments"] == 2
    assert ws.quality["gap_s"] == pytest.approx(30, abs=1)
    starts = np.sort(ws.start_ms)
    assert (np.diff(starts) > 20_000).sum() == 1 and len(ws) >= 2 * 28

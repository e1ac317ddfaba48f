"""The screenshots of docs/observe.md: MLflow's pages of real pushed runs, taken with headless Chromium.

``python -m bench.screenshots [--out docs/img]``: writes three FIT exports with the real encoder
(tests/fitgen.py: two days of a wrist, local time UTC+01:00 stated by each file's activity message),
processes them with the agent's pipeline and the bundled model, pushes them with sync to a real
``mlflow server`` on 127.0.0.1 (full mlflow: it serves the UI), then photographs the pages with
Debian's ``chromium`` (``apt-get install -y chromium``) in headless mode. MLflow 3's UI is a
single-page app: the classic run pages are ``#/experiments/<id>/runs/<run id>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from bench.common import fitgen
from bench.mlflow_server import MlflowServer
from har_edge.agent.model import BUNDLED_MODEL_DIR, load_model
from har_edge.agent.outbox import Outbox
from har_edge.agent.pipeline import Processor
from har_edge.agent.settings import load_settings
from har_edge.sync.push import Pusher

ROOT = Path(__file__).resolve().parents[1]

Signal = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
LOCAL = 3600  # UTC+01:00, as the files' activity messages say


def still(gravity: tuple[float, float, float]) -> Signal:
    """A wrist at rest with gravity (in g) along these axes: what the bundled model calls sitting/standing/lying."""

    def f(t: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return np.array(gravity) * 1000 + rng.normal(0, 6, (len(t), 3)), rng.normal(0, 0.6, (len(t), 3))

    return f


def walking(t: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    f = 1.9
    a = np.stack(
        [
            1000 + 400 * np.sin(2 * np.pi * f * t),
            120 * np.sin(2 * np.pi * f * t + 1),
            -200 + 120 * np.sin(2 * np.pi * f * t + 2),
        ],
        axis=1,
    ) + rng.normal(0, 25, (len(t), 3))
    g = np.stack([20 * np.sin(np.pi * f * t), 30 * np.sin(2 * np.pi * f * t), 15 * np.cos(np.pi * f * t)], axis=1)
    return a, g


SITTING, STANDING, LYING = still((0.98, 0.0, -0.2)), still((0.9, -0.1, -0.4)), still((0.0, 0.0, 1.0))


def schedule(parts: Sequence[tuple[float, Signal]]) -> Signal:
    """A signal that follows ``parts`` (minutes, signal) in turn."""
    edges = np.cumsum([0.0] + [m * 60 for m, _ in parts])

    def f(t: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        acc = np.zeros((len(t), 3))
        gyr = np.zeros((len(t), 3))
        for i, (_, sig) in enumerate(parts):
            on = (t >= edges[i]) & (t < edges[i + 1])
            if on.any():
                a, g = sig(t[on], rng)
                acc[on], gyr[on] = a, g
        return acc, gyr

    return f


def exports(folder: Path) -> list[Path]:
    day1 = datetime(2025, 3, 24, tzinfo=UTC)
    plans = [
        ("2025-03-24_morning.fit", day1 + timedelta(hours=7, minutes=40) - timedelta(seconds=LOCAL),
         [(14, LYING), (22, SITTING), (12, walking), (8, STANDING), (10, walking), (50, SITTING), (14, walking)],
         [(5400, 420)]),
        ("2025-03-24_afternoon.fit", day1 + timedelta(hours=13, minutes=10) - timedelta(seconds=LOCAL),
         [(18, walking), (70, SITTING), (12, STANDING), (25, walking), (35, SITTING)], [(3000, 300)]),
        ("2025-03-25_evening.fit", day1 + timedelta(days=1, hours=21, minutes=30) - timedelta(seconds=LOCAL),
         [(20, walking), (45, SITTING), (10, STANDING), (80, LYING)], []),
    ]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (name, start, parts, gaps) in enumerate(plans):
        seconds = sum(m for m, _ in parts) * 60
        fx = fitgen().write_imu_fit(
            folder / name, seconds=seconds, start=start, signal=schedule(parts), gaps=gaps, engine="fast", seed=i,
            activity_local_offset_s=LOCAL,
        )  # fmt: skip
        out.append(fx.path)
    return out


def shoot(chromium: str, url: str, out: Path, size: str, tz: str = "UTC") -> None:
    """One screenshot; ``tz``: the browser's time zone (MLflow shows run times in it)."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={out}",
           f"--window-size={size}", "--virtual-time-budget=15000", url]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=180, env={**os.environ, "TZ": tz})
    print(f"{out}  <- {url}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    ap.add_argument("--keep", type=Path, help="keep the data dir and server store here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium is not installed: apt-get install -y chromium", file=sys.stderr)
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="har-shots-"))
    work.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(work / "server")
    server.start_background()  # 30-50 s: meanwhile the agent processes the exports
    settings = load_settings(
        env={}, data_dir=work / "data", device_id="watch-0421", timezone="Europe/Berlin",
        sync={"tracking_uri": server.url, "experiment": "har-edge", "request_timeout_s": 30},
    )  # fmt: skip
    try:
        ob = Outbox(settings.outbox_path)
        proc = Processor(settings.agent, ob, settings.work / ".scratch", monitor=settings.monitor)
        model = load_model(BUNDLED_MODEL_DIR)
        ids = [proc.process([p], model).file_id for p in exports(work / "exports")]
        server.wait()
        pusher = Pusher(settings, ob)
        report = pusher.push(time.time())
        print(report.summary())
        exp = pusher.experiment_id()
        file_run = ob.file(ids[0]).run_id
        daily = pusher.client.search_runs([exp], "tags.`har.kind` = 'daily'")[0].info.run_id
        base = f"{server.url}/#/experiments/{exp}"
        args.out.mkdir(parents=True, exist_ok=True)
        tz = settings.timezone
        shots = [
            (f"{base}/runs", "mlflow-runs.png", "1400,700"),
            (f"{base}/runs/{file_run}", "mlflow-file-run.png", "1400,1500"),
            (f"{base}/runs/{file_run}/artifacts/timeline.png", "mlflow-timeline.png", "2200,1100"),
            (f"{base}/runs/{file_run}/artifacts/activity_summary.json", "mlflow-table.png", "1400,800"),
            (f"{base}/runs/{daily}/artifacts/daily_activity.png", "mlflow-daily.png", "1800,900"),
        ]
        for url, name, size in shots:
            shoot(chromium, url, args.out / name, size, tz)
        # the two plots themselves, as the server serves them
        for run_id, artifact, name in ((file_run, "timeline.png", "timeline.png"),
                                       (daily, "daily_activity.png", "daily_activity.png")):  # fmt: skip
            got = pusher.client.download_artifacts(run_id, artifact, str(work / "dl"))
            shutil.copyfile(got, args.out / name)
            print(f"{args.out / name}  <- artifact {artifact} of run {run_id}")
    finally:
        server.stop()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

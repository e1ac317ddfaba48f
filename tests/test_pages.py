"""What a person sees in MLflow: timelines, activity tables, descriptions, run spans, daily runs, local time."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
import urllib.parse
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from fitgen import rest_signal, walk_signal, write_imu_fit
from sync_helpers import add_file, restore_mlflow_env  # noqa: F401 - autouse fixture

from har_edge.agent.decode.fit import decode_fit
from har_edge.agent.errors import ConfigError
from har_edge.agent.model import BUNDLED_MODEL_DIR, load_model
from har_edge.agent.outbox import Outbox
from har_edge.agent.pipeline import Processor
from har_edge.agent.settings import load_settings
from har_edge.sync import renderer, runs
from har_edge.sync.localtime import LocalTime
from har_edge.sync.pagepush import DAILY_KEY, DAILY_VALUE
from har_edge.sync.pages import FileSummary, daily_summaries, summarize
from har_edge.sync.push import Pusher

PNG = b"\x89PNG\r\n\x1a\n"
#: 23:50 local time at UTC-5 is 04:50 UTC of the next day: a night the UTC calendar would cut wrongly
NIGHT = datetime(2025, 3, 24, 4, 50, 0, tzinfo=UTC)
WEST = -5 * 3600


def _walk_then_rest(t: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    wa, wg = walk_signal(t, rng)
    ra, rg = rest_signal(t, rng)
    walking = (t % 1200) < 600
    return np.where(walking[:, None], wa, ra), np.where(walking[:, None], wg, rg)


def _settings(data_dir: Path, uri: str | None = None, **kw):
    return load_settings(
        env={},
        data_dir=data_dir,
        device_id=f"dev-{uuid.uuid4().hex[:6]}",
        sync={"tracking_uri": uri, "request_timeout_s": 30, "experiment": f"pages-{uuid.uuid4().hex[:8]}"},
        **kw,
    )


def _process(settings, paths: list[Path]) -> tuple[Outbox, list[int]]:
    ob = Outbox(settings.outbox_path)
    proc = Processor(settings.agent, ob, settings.work / ".scratch", monitor=settings.monitor)
    model = load_model(BUNDLED_MODEL_DIR)
    ids = []
    for p in paths:
        out = proc.process([p], model)
        assert out.status == "processed", out
        ids.append(out.file_id)
    return ob, ids


def _night_fit(tmp_path: Path, name: str = "night.fit", **kw) -> Path:
    """20 min from 23:50 local (UTC-5, said by the activity message) with a 2 min gap in the middle."""
    kw.setdefault("activity_local_offset_s", WEST)
    return write_imu_fit(
        tmp_path / name, seconds=1200, start=NIGHT, signal=_walk_then_rest, gaps=[(540, 120)], engine="fast", **kw
    ).path


# -- local time from the export ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["fast", "sdk"])
def test_the_decoder_reads_the_offset_from_the_activity_message_first_then_device_settings(tmp_path, engine):
    a = write_imu_fit(tmp_path / "a.fit", seconds=20, activity_local_offset_s=19800, device_time_offset_s=7200)
    d = write_imu_fit(tmp_path / "d.fit", seconds=20, device_time_offset_s=WEST)
    n = write_imu_fit(tmp_path / "n.fit", seconds=20)
    got = [decode_fit(f.path, engine=engine).meta for f in (a, d, n)]
    assert (got[0]["utc_offset_s"], got[0]["utc_offset_source"]) == (19800, "activity.local_timestamp")
    assert (got[1]["utc_offset_s"], got[1]["utc_offset_source"]) == (WEST, "device_settings.time_offset")
    assert "utc_offset_s" not in got[2] and "utc_offset_source" not in got[2]


def test_the_outbox_keeps_the_offset_and_the_times_stay_utc(tmp_path):
    settings = _settings(tmp_path / "data")
    ob, [fid] = _process(settings, [_night_fit(tmp_path)])
    row = ob.file(fid)
    assert (row.utc_offset_s, row.utc_offset_source) == (WEST, "activity.local_timestamp")
    assert row.first_window_ms == int(NIGHT.timestamp() * 1000)  # UTC, not shifted


def test_days_end_at_local_midnight_and_a_zone_follows_daylight_saving():
    step = 2000
    starts = int(NIGHT.timestamp() * 1000) + np.arange(600, dtype=np.int64) * step  # 20 min from 04:50 UTC
    probs = np.zeros((600, 2), np.float32)
    probs[:, 0] = 0.9
    probs[:, 1] = 0.1
    west = summarize(["a", "b"], starts, probs, LocalTime.of(WEST, "activity.local_timestamp", "UTC"), step_ms=step)
    assert west.days == {"2025-03-23": {"a": 10.0}, "2025-03-24": {"a": 10.0}}
    utc = summarize(["a", "b"], starts, probs, LocalTime.of(None, None, "UTC"), step_ms=step)
    assert utc.days == {"2025-03-24": {"a": 20.0}}
    berlin = LocalTime.of(None, None, "Europe/Berlin")
    # 2025-03-30 01:00 UTC: Berlin goes from UTC+1 to UTC+2
    around = np.array([datetime(2025, 3, 30, 0, 59, tzinfo=UTC), datetime(2025, 3, 30, 1, 0, tzinfo=UTC)])
    ms = np.array([int(x.timestamp() * 1000) for x in around], np.int64)
    assert berlin.offsets_ms(ms).tolist() == [3_600_000, 7_200_000]
    assert "Europe/Berlin (UTC+01:00), from the setting timezone" in berlin.describe(int(ms[0]))


def test_the_summary_counts_minutes_shares_confidence_and_gaps():
    starts = np.concatenate([np.arange(30) * 2000, 600_000 + np.arange(60) * 2000]).astype(np.int64)
    probs = np.full((90, 3), 0.1, np.float32)
    probs[:30, 0] = 0.8  # 1 min of a at 0.8
    probs[30:, 2] = 0.6  # 2 min of c at 0.6
    s = summarize(["a", "b", "c"], starts, probs, LocalTime.of(0, "x", "UTC"), step_ms=2000, window_ms=4000)
    by = {a.activity: a for a in s.activities}
    assert (by["a"].minutes, by["a"].share, by["a"].mean_confidence) == (1.0, round(30 / 90, 4), 0.8)
    assert (by["b"].minutes, by["b"].share) == (0.0, 0.0)
    assert (by["c"].minutes, by["c"].mean_confidence) == (2.0, 0.6)
    assert s.gaps == 1 and s.windows == 90
    assert (s.start_ms, s.end_ms) == (0, 600_000 + 59 * 2000 + 4000)
    assert FileSummary.from_json(s.to_json()) == s
    # daily summaries add files up per value of the key
    two = daily_summaries([({"device": "w1"}, s), ({"device": "w1"}, s), ({"device": "w2"}, s)], key="device")
    assert sorted(two) == ["w1", "w2"]
    assert two["w1"].days == {"1970-01-01": {"a": 2.0, "c": 4.0}} and two["w1"].files == 2
    assert daily_summaries([({"device": "w1"}, s)], key="participant") == {}


def test_the_timezone_setting_is_checked(tmp_path):
    assert load_settings(env={"HAR_EDGE_TIMEZONE": "Europe/Berlin"}, data_dir=tmp_path).timezone == "Europe/Berlin"
    with pytest.raises(ConfigError, match="Mars/Olympus"):
        load_settings(env={}, data_dir=tmp_path, timezone="Mars/Olympus")


# -- the pages on the embedded store -----------------------------------------------------------------------------


def _artifact_names(p: Pusher, run_id: str) -> list[str]:
    return sorted(a.path for a in p.client.list_artifacts(run_id))


def _daily_runs(p: Pusher) -> list:
    return p.client.search_runs([p.experiment_id()], f"tags.`{runs.KIND}` = 'daily'")


def test_a_file_run_shows_its_timeline_table_description_and_the_recording_span(tmp_path):
    settings = _settings(tmp_path / "data")
    ob, [fid] = _process(settings, [_night_fit(tmp_path)])
    p = Pusher(settings, ob)
    report = p.push(time.time())
    assert report.files_finished == 1 and report.pages == 1 and not report.refused
    row = ob.file(fid)
    run = p.client.get_run(row.run_id)
    # the run's times are the recording's: first window to the end of the last (4 s windows)
    assert run.info.start_time == row.first_window_ms == int(NIGHT.timestamp() * 1000)
    assert run.info.end_time == row.last_window_ms + 4000
    assert _artifact_names(p, row.run_id) == ["activity_summary.json", "predictions.csv", "timeline.png"]
    dl = Path(p.client.download_artifacts(row.run_id, "timeline.png", str(tmp_path / "dl")))
    assert dl.read_bytes().startswith(PNG)
    table = json.loads(
        Path(p.client.download_artifacts(row.run_id, "activity_summary.json", str(tmp_path))).read_text()
    )
    assert table["columns"] == ["activity", "minutes", "share", "mean_confidence"]
    minutes = sum(r[1] for r in table["data"])
    assert 16 < minutes < 18.1  # 20 min minus the 2 min gap and the windows around it
    assert abs(sum(r[2] for r in table["data"]) - 1) < 1e-3
    tags = run.data.tags
    assert json.loads(tags["mlflow.loggedArtifacts"]) == [{"path": "activity_summary.json", "type": "table"}]
    note = tags[runs.DESCRIPTION]
    for text in ("night.fit", settings.device_id, "2025-03-23 23:50 to 2025-03-24 00:10", "UTC-05:00",
                 "activity.local_timestamp", f"{row.model_name} {row.model_version}", f"**{row.monitor_status}**",
                 "1 gap(s)"):  # fmt: skip
        assert text in note, text
    assert tags["har.recording.start_local"] == "2025-03-23 23:50"
    assert tags["har.utc_offset"] == "UTC-05:00" and tags[runs.MODEL_VERSION] == row.model_version
    assert run.data.params["model_version"] == row.model_version
    assert not [k for k in run.data.metrics if "version" in k]  # never a number
    # the daily run of the device: the night is split at local midnight, not at UTC's
    [daily] = _daily_runs(p)
    assert daily.data.tags[DAILY_KEY] == "device" and daily.data.tags[DAILY_VALUE] == settings.device_id
    assert _artifact_names(p, daily.info.run_id) == ["daily_activity.png", "daily_minutes.json"]
    days = json.loads(
        Path(p.client.download_artifacts(daily.info.run_id, "daily_minutes.json", str(tmp_path))).read_text()
    )
    assert [r[0] for r in days["data"]] == ["2025-03-23", "2025-03-24"]
    assert days["columns"][0] == "day" and days["columns"][-1] == "total"
    assert abs(sum(r[-1] for r in days["data"]) - minutes) < 0.2


def test_pages_are_idempotent_when_a_crash_forgets_that_they_were_delivered(tmp_path):
    settings = _settings(tmp_path / "data", timezone="Europe/Berlin")
    ob = Outbox(settings.outbox_path)
    ids = [add_file(ob, i, minutes=5) for i in range(2)]
    p = Pusher(settings, ob)
    p.push(time.time())
    before = {fid: _artifact_names(p, ob.file(fid).run_id) for fid in ids}
    [daily] = _daily_runs(p)
    # a crash after the uploads, before the marks: the next sync process sends it all again
    con = sqlite3.connect(settings.outbox_path)
    con.execute("UPDATE files SET pages_ms = NULL, daily_ms = NULL, summary_json = NULL")
    con.commit()
    con.close()
    again = Pusher(settings, Outbox(settings.outbox_path))
    report = again.push(time.time())
    assert report.pages == 2 and report.runs_created == 0
    assert {fid: _artifact_names(again, ob.file(fid).run_id) for fid in ids} == before
    assert [r.info.run_id for r in _daily_runs(again)] == [daily.info.run_id]
    tags = again.client.get_run(ob.file(ids[0]).run_id).data.tags
    assert json.loads(tags["mlflow.loggedArtifacts"]) == [{"path": "activity_summary.json", "type": "table"}]
    assert "Europe/Berlin (UTC+01:00), from the setting timezone" in tags[runs.DESCRIPTION]
    # a new file redraws the daily run: one more day, the same run
    add_file(ob, 5, minutes=5)
    again.push(time.time())
    [daily2] = _daily_runs(again)
    assert daily2.info.run_id == daily.info.run_id and daily2.data.tags["har.daily.days"] == "3"


def test_a_plot_that_cannot_be_drawn_blocks_nothing_and_is_drawn_later(tmp_path, monkeypatch):
    settings = _settings(tmp_path / "data")
    ob = Outbox(settings.outbox_path)
    fid = add_file(ob, 1, minutes=3)
    monkeypatch.setattr(renderer, "MODULE", "har_edge.sync.no_such_renderer")  # the real child exits 1
    p = Pusher(settings, ob)
    report = p.push(time.time())
    row = ob.file(fid)
    assert report.files_finished == 1 and row.finished_ms is not None  # results delivered
    assert row.pages_ms is None and row.daily_ms is None  # the plots are still owed
    assert _artifact_names(p, row.run_id) == ["activity_summary.json", "predictions.csv"]
    assert p.pages.last_render is not None and "exited 1" in next(iter(p.pages.last_render.failed.values()))
    # within the retry delay nothing is tried; after it, the plots come
    assert p.push(time.time()).pages == 0
    monkeypatch.setattr(renderer, "MODULE", "har_edge.sync.render")
    p.pages._retry_at = 0.0
    assert p.push(time.time()).pages == 1
    assert _artifact_names(p, row.run_id) == ["activity_summary.json", "predictions.csv", "timeline.png"]
    assert ob.file(fid).daily_ms is not None and p.pages.last_render.peak_rss_kb > 10_000


def test_pages_off_gives_runs_their_span_and_description_only_and_on_again_catches_up(tmp_path):
    def settings_with(pages: bool):
        sync = {"experiment": "pages-off", "pages": pages}
        return load_settings(env={}, data_dir=tmp_path / "data", device_id="watch-off", sync=sync)

    off = settings_with(False)
    ob = Outbox(off.outbox_path)
    fid = add_file(ob, 2, minutes=2)
    p = Pusher(off, ob)
    report = p.push(time.time())
    row = ob.file(fid)
    assert report.files_finished == 1 and report.pages == 0 and p.pages.last_render is None
    assert _artifact_names(p, row.run_id) == ["predictions.csv"] and not _daily_runs(p)
    run = p.client.get_run(row.run_id)
    assert run.info.start_time == row.first_window_ms and "| monitor |" in run.data.tags[runs.DESCRIPTION]
    on = Pusher(settings_with(True), Outbox(off.outbox_path))
    assert on.push(time.time()).pages == 1
    assert _artifact_names(on, row.run_id) == ["activity_summary.json", "predictions.csv", "timeline.png"]
    assert len(_daily_runs(on)) == 1


# -- a real server -----------------------------------------------------------------------------------------------


@pytest.mark.server
def test_a_real_server_serves_the_timeline_and_the_table(mlflow_server, tmp_path):
    settings = _settings(tmp_path / "data", mlflow_server.url)
    ob, [fid] = _process(settings, [_night_fit(tmp_path, device_time_offset_s=WEST, activity_local_offset_s=None)])
    p = Pusher(settings, ob)
    assert p.push(time.time()).pages == 1
    row = ob.file(fid)

    def get(path: str) -> bytes:
        q = urllib.parse.urlencode({"path": path, "run_uuid": row.run_id})
        with urllib.request.urlopen(f"{mlflow_server.url}/get-artifact?{q}", timeout=30) as r:
            assert r.status == 200
            return r.read()

    png = get("timeline.png")
    assert png.startswith(PNG) and len(png) > 10_000
    # the same bytes through the artifact proxy API (what `mlflow-artifacts:` URIs resolve to)
    uri = p.client.get_run(row.run_id).info.artifact_uri
    assert uri.startswith("mlflow-artifacts:/")
    proxied = f"{mlflow_server.url}/api/2.0/mlflow-artifacts/artifacts/{uri.removeprefix('mlflow-artifacts:/')}"
    with urllib.request.urlopen(f"{proxied}/timeline.png", timeout=30) as r:
        assert r.read() == png
    table = json.loads(get("activity_summary.json"))
    assert table["columns"] == ["activity", "minutes", "share", "mean_confidence"] and len(table["data"]) == 6
    q = urllib.parse.urlencode({"run_id": row.run_id})
    with urllib.request.urlopen(f"{mlflow_server.url}/api/2.0/mlflow/runs/get?{q}", timeout=30) as r:
        info = json.loads(r.read())["run"]["info"]
    assert int(info["start_time"]) == row.first_window_ms
    assert int(info["end_time"]) == row.last_window_ms + 4000
    note = p.client.get_run(row.run_id).data.tags[runs.DESCRIPTION]
    assert "device_settings.time_offset" in note and "UTC-05:00" in note


@pytest.mark.server
def test_make_ui_serves_the_local_store_and_says_where_to_click(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    settings = _settings(tmp_path / "data")
    ob = Outbox(settings.outbox_path)
    add_file(ob, 1, minutes=2)
    Pusher(settings, ob).push(time.time())
    venv = Path(sys.executable).parent.parent
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    # -o: the venv is the test's own, not one make should (re)build
    cmd = ["make", "-s", "-o", f"{venv}/bin/.edge", "ui", f"VENV={venv}", f"DATA_DIR={tmp_path / 'data'}",
           f"UI_PORT={port}"]  # fmt: skip
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        body = json.dumps({"max_results": 10})
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            names = [e["name"] for e in json.loads(r.read())["experiments"]]
        assert settings.sync.experiment in names
        text = log.read_text()
        assert f"http://127.0.0.1:{port}" in text and "'Runs' tab" in text
        assert not (root / "mlruns").exists()  # the UI's default experiment stays in the data dir
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

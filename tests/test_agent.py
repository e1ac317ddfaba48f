"""The agent end to end on real FIT files, real SQLite and the real TFLite runtime."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from fitgen import write_activity_fit, write_imu_fit

from har_edge.agent.daemon import Agent
from har_edge.agent.outbox import Outbox
from har_edge.agent.settings import load_settings

START = datetime(2025, 3, 24, 7, 52, 19, tzinfo=UTC)


def _drop(agent: Agent, src: Path, name: str | None = None) -> Path:
    dest = agent.folder.inbox / (name or src.name)
    shutil.copy(src, dest)
    return dest


def _run_until_idle(agent: Agent, passes: int = 3):
    out = []
    for i in range(passes):
        out += agent.step(now=1e9 + i * 1000)  # settle_s is 0 in these settings; far-apart times age files
    return out


@pytest.fixture
def walk_fit(tmp_path) -> Path:
    p = tmp_path / "src" / "walk.fit"
    p.parent.mkdir()
    write_imu_fit(p, rate_hz=50, seconds=120, start=START)
    return p


def test_a_fit_export_becomes_windows_and_metrics(settings, walk_fit):
    agent = Agent(settings)
    _drop(agent, walk_fit)
    (outcome,) = _run_until_idle(agent)
    assert outcome.status == "processed"
    assert outcome.windows == 59  # 120 s at 50 Hz, 4 s windows every 2 s
    names, starts, probs = agent.outbox.file_windows(outcome.file_id)
    assert names == agent.models.model.manifest.labels
    assert starts[0] == int(START.timestamp() * 1000) and np.all(np.diff(starts) == 2000)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=0.05)
    keys = {p.key for p in agent.outbox.file_metrics(outcome.file_id)}
    assert {
        "windows",
        "mean_confidence",
        "low_confidence_share",
        "inference_time_p50_ms",
        "inference_time_p95_ms",
        "decode_time_s",
        "quality_native_rate_hz",
        "quality_gaps",
        "minute_confidence",
    } <= keys
    assert any(k.startswith("seconds_") for k in keys) and any(k.startswith("minute_share_") for k in keys)
    row = agent.outbox.file(outcome.file_id)
    assert row.model_sha256 == agent.models.model.manifest.sha256 and row.format == "fit"
    assert not list(agent.folder.inbox.iterdir())
    assert [p.name for p in agent.folder.work.iterdir()] in ([], [".scratch"])
    assert [p.name for p in agent.folder.archive.rglob("*.fit")] == ["walk.fit"]


def test_metric_timestamps_are_fixed_when_stored(settings, walk_fit):
    agent = Agent(settings)
    _drop(agent, walk_fit)
    (outcome,) = _run_until_idle(agent)
    first = agent.outbox.file_metrics(outcome.file_id)
    time.sleep(0.01)
    assert agent.outbox.file_metrics(outcome.file_id) == first
    minute = [p for p in first if p.key == "minute_confidence"]
    assert [p.step for p in minute] == [0, 1, 2] and minute[0].timestamp_ms % 60_000 == 0


def test_same_content_twice_is_processed_once(settings, walk_fit):
    agent = Agent(settings)
    _drop(agent, walk_fit)
    _run_until_idle(agent)
    _drop(agent, walk_fit, "walk-again.fit")
    (second,) = _run_until_idle(agent)
    assert second.status == "duplicate"
    assert agent.outbox.status_counts()["files"] == {"processed": 1, "duplicate": 1}


def test_a_file_written_slowly_is_taken_once_complete(tmp_path, walk_fit):
    settings = load_settings(env={}, data_dir=tmp_path / "var", agent={"settle_s": 0.5, "scan_interval_s": 0.1})
    agent = Agent(settings)
    data = walk_fit.read_bytes()
    dest = agent.folder.inbox / "slow.fit"
    outcomes: list = []

    def writer():
        with open(dest, "wb") as f:
            for i in range(0, len(data), len(data) // 10):
                f.write(data[i : i + len(data) // 10])
                f.flush()
                time.sleep(0.3)  # pauses shorter than settle time keep the file unsettled

    t = threading.Thread(target=writer)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not outcomes:
        outcomes += agent.step()
        time.sleep(0.05)
    t.join()
    assert len(outcomes) == 1 and outcomes[0].status == "processed" and outcomes[0].windows == 59
    assert agent.outbox.status_counts()["files"] == {"processed": 1}


def test_a_fit_without_crc_yet_waits(settings, walk_fit):
    """Size and mtime settled but the FIT is incomplete: not taken until much later."""
    agent = Agent(settings)
    dest = agent.folder.inbox / "partial.fit"
    dest.write_bytes(walk_fit.read_bytes()[: walk_fit.stat().st_size // 2])
    assert agent.step(now=100.0) == [] and agent.step(now=101.0) == []
    assert dest.exists()
    (outcome,) = agent.step(now=100.0 + agent.folder.stale_s + 1)  # never completed: quarantined with a reason
    assert outcome.status == "failed" and outcome.error.kind == "corrupt"


def test_the_readiness_check_is_handed_to_decoding(settings, walk_fit):
    """ready() keeps the proof of each FIT check; handed through handle() to decoding, the CRC is not read again."""
    agent = Agent(settings)
    dest = _drop(agent, walk_fit)
    (group,) = agent.folder.ready(now=1e9)
    (proof,) = agent.folder.verified(group)
    assert proof.identity is not None and proof.identity.size == walk_fit.stat().st_size
    st = dest.stat()
    data = bytearray(dest.read_bytes())
    data[-1] ^= 0xFF  # a broken stored CRC, written behind the watcher's back with size and mtime kept
    dest.write_bytes(data)
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
    claimed = agent.folder.claim(group)
    assert agent.folder.verified(group) == []  # claimed: the folder forgets it
    outcome = agent.handle(claimed, verified=[proof])
    assert outcome.status == "processed" and outcome.windows == 59  # decoded on the proof alone
    again = _drop(agent, walk_fit, "again.fit")
    data[-2] ^= 0xFF  # (other bytes than the stored file's, or it would be a duplicate of it)
    again.write_bytes(data)  # a broken CRC without a proof: checked, refused
    assert agent.step(now=2e9) == []  # incomplete as far as its own CRC says: it waits
    (outcome,) = agent.step(now=2e9 + agent.folder.stale_s + 1)
    assert outcome.status == "failed" and outcome.error.kind == "corrupt" and "CRC" in str(outcome.error)


def _bad_inputs(tmp: Path, good: Path) -> dict[str, Path]:
    tmp.mkdir(exist_ok=True)
    out = {}
    out["no_imu_data"] = tmp / "ride.fit"
    write_activity_fit(out["no_imu_data"])
    data = good.read_bytes()
    out["corrupt"] = tmp / "flipped.fit"
    out["corrupt"].write_bytes(data[:5000] + bytes([data[5000] ^ 0xFF]) + data[5001:])
    out["unknown_format"] = tmp / "notes.txt"
    out["unknown_format"].write_text("hello")
    out["unsafe_archive"] = tmp / "slip.zip"
    with zipfile.ZipFile(out["unsafe_archive"], "w") as z:
        z.writestr("../../evil.fit", data)
    out["too_short"] = tmp / "short.fit"
    write_imu_fit(out["too_short"], rate_hz=50, seconds=3, start=START)
    return out


def test_each_bad_input_is_quarantined_with_its_reason_and_the_next_file_is_served(settings, walk_fit, tmp_path):
    agent = Agent(settings)
    bad = _bad_inputs(tmp_path / "bad", walk_fit)
    for p in bad.values():
        _drop(agent, p)
    _drop(agent, walk_fit)
    outcomes = _run_until_idle(agent)
    by_name = {o.name: o for o in outcomes}
    assert by_name["walk.fit"].status == "processed"
    for kind, p in bad.items():
        o = by_name[p.name]
        assert o.status == "failed", p.name
        reason = json.loads((agent.folder.quarantine / (p.name + ".reason.json")).read_text())
        assert reason["kind"] == kind, reason
        assert p.name.split(".")[0] in reason["message"] or kind == "unsafe_archive"
        assert reason["agent_version"] and reason["time"].endswith("Z")
        assert (agent.folder.quarantine / p.name).exists()
    assert "IMU logging" in json.loads((agent.folder.quarantine / "ride.fit.reason.json").read_text())["message"]
    assert not (tmp_path / "evil.fit").exists() and not (settings.data_dir / "evil.fit").exists()


def test_replay_puts_quarantined_files_back(settings, tmp_path):
    agent = Agent(settings)
    (agent.folder.inbox / "x.txt").write_text("nope")
    _run_until_idle(agent)
    assert (agent.folder.quarantine / "x.txt.reason.json").exists()
    moved = agent.folder.replay()
    assert [p.name for p in moved] == ["x.txt"] and (agent.folder.inbox / "x.txt").exists()
    assert not (agent.folder.quarantine / "x.txt.reason.json").exists()


def test_zip_export_and_table_pair(settings, walk_fit, tmp_path):
    agent = Agent(settings)
    z = tmp_path / "export.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(walk_fit, "12345_ACTIVITY.fit")
    _drop(agent, z)
    (o,) = _run_until_idle(agent)
    assert o.status == "processed" and o.windows == 59


def test_outbox_budget_pauses_ingestion(tmp_path, walk_fit):
    settings = load_settings(env={}, data_dir=tmp_path / "var", agent={"settle_s": 0, "outbox_max_mb": 0.001})
    agent = Agent(settings)
    _drop(agent, walk_fit)
    assert _run_until_idle(agent) == []
    assert (agent.folder.inbox / "walk.fit").exists()  # waits, nothing dropped


def test_model_pointer_change_is_picked_up_between_files(settings, walk_fit, model_copy, tmp_path):
    from har_edge.agent.modelstore import set_pointer

    agent = Agent(settings)
    _drop(agent, walk_fit)
    (first,) = _run_until_idle(agent)
    new = model_copy("tmp")
    raw = json.loads((new / "manifest.json").read_text())
    raw["version"] = "99.0.0"
    (new / "manifest.json").write_text(json.dumps(raw))
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    shutil.move(new, settings.models_dir / "99.0.0")
    set_pointer(settings.models_dir, "99.0.0")
    _drop(agent, walk_fit, "walk2.fit")
    write_imu_fit(agent.folder.inbox / "other.fit", rate_hz=50, seconds=30, start=START, seed=3)
    outcomes = _run_until_idle(agent)
    assert agent.outbox.file(first.file_id).model_version != "99.0.0"
    assert {agent.outbox.file(o.file_id).model_version for o in outcomes if o.status == "processed"} == {"99.0.0"}


def test_a_model_that_fails_to_load_is_recorded_and_the_old_one_kept(settings, walk_fit, model_copy):
    from har_edge.agent.modelstore import set_pointer

    agent = Agent(settings)
    _drop(agent, walk_fit)
    (first,) = _run_until_idle(agent)
    broken = model_copy("tmp")
    (broken / "model.tflite").write_bytes(b"garbage")
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    shutil.move(broken, settings.models_dir / "7.0.0")
    set_pointer(settings.models_dir, "7.0.0")
    write_imu_fit(agent.folder.inbox / "next.fit", rate_hz=50, seconds=30, start=START, seed=5)
    (o,) = _run_until_idle(agent)
    assert o.status == "processed"
    assert agent.outbox.file(o.file_id).model_version == agent.outbox.file(first.file_id).model_version
    with agent.outbox.engine.connect() as c:
        rows = c.exec_driver_sql("SELECT to_version, outcome, reason FROM deployments").all()
    assert rows[0][:2] == ("7.0.0", "load_failed") and "sha256" in rows[0][2]


# -- the command line, as a person runs it --------------------------------------------------------


def _cli(*args, data_dir: Path, timeout=120, **kw):
    env = dict(os.environ, HAR_EDGE_DATA_DIR=str(data_dir), HAR_EDGE_AGENT__SETTLE_S="0.2")
    return subprocess.run(
        [sys.executable, "-m", "har_edge.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def test_process_command_equals_the_daemon(settings, walk_fit, tmp_path):
    agent = Agent(settings)
    _drop(agent, walk_fit)
    (o,) = _run_until_idle(agent)
    _, _, daemon_probs = agent.outbox.file_windows(o.file_id)
    other = tmp_path / "other-var"
    r = _cli("agent", "process", str(walk_fit), data_dir=other)
    assert r.returncode == 0, r.stderr
    assert "59 windows" in r.stdout
    ob = Outbox(other / "outbox.sqlite")
    fid = ob.processed_file(agent.outbox.file(o.file_id).sha256).id
    np.testing.assert_array_equal(ob.file_windows(fid)[2], daemon_probs)
    assert walk_fit.exists()  # the command works on a copy


def test_process_command_reports_usage_and_duplicates_as_such(walk_fit, tmp_path):
    """A missing file is a usage error (2) and nothing is processed; content processed before is a duplicate."""
    data = tmp_path / "var"
    r = _cli("agent", "process", str(walk_fit), str(tmp_path / "nothere.fit"), data_dir=data)
    assert r.returncode == 2 and "nothere.fit: no such file" in r.stderr
    assert not (data / "outbox.sqlite").exists() or Outbox(data / "outbox.sqlite").status_counts()["files"] == {}
    assert _cli("agent", "process", str(walk_fit), data_dir=data).returncode == 0
    again = _cli("agent", "process", str(walk_fit), data_dir=data)
    assert again.returncode == 0 and "duplicate of an already processed file" in again.stdout, again.stdout
    assert "interruption" not in again.stdout
    assert Outbox(data / "outbox.sqlite").status_counts()["files"] == {"processed": 1, "duplicate": 1}


def test_status_reads_the_manifest_without_loading_tflite(tmp_path):
    probe = (
        "import sys; from har_edge.cli import main; code = main(['status', '--json', '--data-dir', sys.argv[1]]); "
        "loaded = [m for m in ('ai_edge_litert', 'tflite_runtime') if m in sys.modules]; "
        "print('LOADED', loaded, file=sys.stderr); sys.exit(code or (1 if loaded else 0))"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "var")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"]["name"] == "har-cnn"
    assert "LOADED []" in r.stderr


def test_replay_of_names_that_match_nothing_fails(tmp_path):
    r = _cli("agent", "replay", "nothere.fit", data_dir=tmp_path / "var")
    assert r.returncode == 1 and "nothing in quarantine matching those names" in r.stdout
    assert _cli("agent", "replay", data_dir=tmp_path / "var").returncode == 0  # nothing to do is no failure


def test_process_command_exits_nonzero_on_quarantine(tmp_path):
    bad = tmp_path / "ride.fit"
    write_activity_fit(bad)
    r = _cli("agent", "process", str(bad), data_dir=tmp_path / "var")
    assert r.returncode == 1 and "IMU logging" in r.stdout


def test_status_json_and_check_config(tmp_path, walk_fit):
    r = _cli("agent", "process", str(walk_fit), data_dir=tmp_path / "var")
    assert r.returncode == 0, r.stderr
    st = json.loads(_cli("status", "--json", data_dir=tmp_path / "var").stdout)
    assert st["files"] == {"processed": 1} and st["windows_pending_delivery"] == 59
    assert len(st["model"]["sha256"]) == 64 and st["last_file"]["name"] == "walk.fit"
    human = _cli("status", data_dir=tmp_path / "var").stdout
    assert "walk.fit" in human and "59 windows" in human
    ok = _cli("agent", "run", "--check-config", data_dir=tmp_path / "var")
    assert ok.returncode == 0 and "settings OK" in ok.stdout
    (tmp_path / "bad.toml").write_text("[agent]\nthreads = 0\n")
    bad = _cli("--config", str(tmp_path / "bad.toml"), "agent", "run", "--check-config", data_dir=tmp_path / "var")
    assert bad.returncode == 2 and "agent.threads" in bad.stderr


def _wait(pred, timeout=60.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return False


@pytest.mark.slow
def test_kill_9_mid_file_then_restart_processes_it_exactly_once(tmp_path, fixture_cache):
    big = fixture_cache / "walk-30min-50hz.fit"
    if not big.exists():
        write_imu_fit(big, rate_hz=50, seconds=1800, start=START)
    data_dir = tmp_path / "var"
    env = dict(os.environ, HAR_EDGE_DATA_DIR=str(data_dir), HAR_EDGE_AGENT__SETTLE_S="0.2")
    cmd = [sys.executable, "-m", "har_edge.cli", "agent", "run"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _wait(lambda: (data_dir / "inbox").is_dir(), 60)
        shutil.copy(big, data_dir / "inbox" / ".big.fit.part")
        os.rename(data_dir / "inbox" / ".big.fit.part", data_dir / "inbox" / "big.fit")
        assert _wait(lambda: (data_dir / "work" / "big.fit").exists(), 60, every=0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (data_dir / "work" / "big.fit").exists()
    ob = Outbox(data_dir / "outbox.sqlite")
    assert ob.status_counts()["files"].get("processed", 0) == 0  # killed before the commit
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _wait(lambda: ob.status_counts()["files"].get("processed") == 1, 120)
        assert _wait(lambda: list((data_dir / "archive").rglob("big.fit")), 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    st = ob.status_counts()
    assert st["files"] == {"processed": 1}
    assert st["windows_pending_delivery"] == 899
    with ob.engine.connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM windows").scalar() == 899
        assert c.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"


@pytest.mark.slow
def test_sigterm_stops_the_daemon_cleanly(tmp_path, walk_fit):
    data_dir = tmp_path / "var"
    env = dict(os.environ, HAR_EDGE_DATA_DIR=str(data_dir), HAR_EDGE_AGENT__SETTLE_S="0.2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "har_edge.cli", "agent", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait(lambda: (data_dir / "inbox").is_dir(), 60)
    shutil.copy(walk_fit, data_dir / "inbox" / "walk.fit")
    assert _wait(lambda: list((data_dir / "archive").rglob("walk.fit")), 60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "agent stopped" in proc.stderr.read()

"""Retention on real files: FIT exports processed by the agent, real outbox rows, delivery marked by sync's code."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fitgen import write_activity_fit, write_imu_fit

from har_edge.agent import retention
from har_edge.agent.acknowledged import failure_recorded, results_acknowledged
from har_edge.agent.daemon import Agent
from har_edge.agent.errors import ConfigError
from har_edge.agent.logs import log_file_path, setup_logging
from har_edge.agent.settings import load_settings
from har_edge.sync.delivery import Delivery

START = datetime(2025, 3, 24, 7, 0, 0, tzinfo=UTC)


def _settings(data_dir: Path, **agent):
    return load_settings(env={}, data_dir=data_dir, agent={"settle_s": 0.0, **agent})


def _process(agent: Agent, sources: list[Path]) -> list:
    """Drop each file and let the agent take it (one pass per file: distinct archive times, oldest first)."""
    out = []
    for i, src in enumerate(sources):
        (agent.folder.inbox / src.name).write_bytes(src.read_bytes())
        out += agent.step(now=1e9 + i * 1000)
        out += agent.step(now=1e9 + i * 1000 + 500)
        time.sleep(0.02)
    return out


@pytest.fixture
def exports(tmp_path) -> list[Path]:
    src = tmp_path / "src"
    src.mkdir()
    out = []
    for i in range(3):
        p = src / f"walk-{i}.fit"
        write_imu_fit(p, rate_hz=50, seconds=60, start=START.replace(hour=7 + i), seed=i, engine="fast")
        out.append(p)
    return out


def _archived(settings) -> list[str]:
    return sorted(p.name for p in settings.archive_dir.rglob("*") if p.is_file())


def test_archive_over_budget_loses_only_delivered_exports_oldest_first(tmp_path, exports):
    settings = _settings(tmp_path / "var", archive_max_mb=0.2, archive_max_age_days=0, min_free_mb=0)
    agent = Agent(settings)
    outcomes = _process(agent, exports)
    assert [o.status for o in outcomes] == ["processed"] * 3
    each = exports[0].stat().st_size
    assert 0.2e6 / 3 < each < 0.2e6 / 2  # three are over the budget, two would still be
    keeper = retention.Retention(settings, agent.outbox)

    rep = keeper.prune()  # nothing delivered yet: over budget, but every export is kept
    assert rep.deleted["archive"] == 0 and rep.kept["archive"] == 3
    assert _archived(settings) == ["walk-0.fit", "walk-1.fit", "walk-2.fit"]

    delivery = Delivery(agent.outbox)
    delivery.mark_finished(outcomes[1].file_id)  # the middle one is acknowledged first
    row = agent.outbox.file(outcomes[1].file_id)
    assert results_acknowledged(agent.outbox, row.sha256)
    rep = keeper.prune()
    assert rep.deleted["archive"] == 1 and rep.freed_bytes["archive"] == each
    assert _archived(settings) == ["walk-0.fit", "walk-2.fit"]  # walk-0 is older but not delivered

    delivery.mark_finished(outcomes[0].file_id)
    delivery.mark_finished(outcomes[2].file_id)
    assert keeper.prune().deleted["archive"] == 0  # the two left fit the budget
    tighter = retention.Retention(_settings(settings.data_dir, archive_max_mb=0.15, min_free_mb=0), agent.outbox)
    rep = tighter.prune()  # room for one: the oldest goes
    assert rep.deleted["archive"] == 1 and _archived(settings) == ["walk-2.fit"]


def test_archive_by_age_keeps_undelivered_and_removes_empty_day_folders(tmp_path, exports):
    settings = _settings(tmp_path / "var", archive_max_mb=0, archive_max_age_days=7, min_free_mb=0)
    agent = Agent(settings)
    outcomes = _process(agent, exports[:2])
    Delivery(agent.outbox).mark_finished(outcomes[0].file_id)
    keeper = retention.Retention(settings, agent.outbox)
    assert keeper.prune().deleted["archive"] == 0  # young
    rep = keeper.prune(now=time.time() + 8 * 86_400)
    assert rep.deleted["archive"] == 1 and rep.kept["archive"] == 1
    assert _archived(settings) == ["walk-1.fit"]
    Delivery(agent.outbox).mark_finished(outcomes[1].file_id)
    keeper.prune(now=time.time() + 8 * 86_400)
    assert _archived(settings) == [] and list(settings.archive_dir.iterdir()) == []


def test_an_archived_duplicate_goes_with_the_delivery_of_the_original(tmp_path, exports):
    settings = _settings(tmp_path / "var", archive_max_mb=0.001, min_free_mb=0)
    agent = Agent(settings)
    dup = tmp_path / "src" / "copy-of-walk-0.fit"
    dup.write_bytes(exports[0].read_bytes())
    first, second = _process(agent, [exports[0], dup])
    assert (first.status, second.status) == ("processed", "duplicate")
    keeper = retention.Retention(settings, agent.outbox)
    assert keeper.prune().kept["archive"] == 2
    Delivery(agent.outbox).mark_finished(first.file_id)
    assert keeper.prune().deleted["archive"] == 2 and _archived(settings) == []


def test_quarantine_budget_deletes_only_files_whose_reason_is_recorded(tmp_path):
    settings = _settings(tmp_path / "var", quarantine_max_mb=0.000001, min_free_mb=0)
    agent = Agent(settings)
    bad = tmp_path / "ride.fit"
    write_activity_fit(bad)
    other = tmp_path / "notes.txt"
    other.write_text("not an export")
    outcomes = _process(agent, [bad, other])
    assert [o.status for o in outcomes] == ["failed", "failed"]
    q = settings.quarantine
    assert failure_recorded(agent.outbox, "ride.fit")
    (q / "notes.txt.reason.json").unlink()  # its reason is not logged: keep it
    stray = q / "stray.fit"  # a reason JSON but no outbox row: keep it
    stray.write_bytes(bad.read_bytes())
    (q / "stray.fit.reason.json").write_text(
        json.dumps({"file": "stray.fit", "kind": "corrupt", "group": ["stray.fit"]})
    )
    rep = retention.Retention(settings, agent.outbox).prune()
    assert rep.deleted["quarantine"] == 1 and rep.kept["quarantine"] == 2
    assert sorted(p.name for p in q.iterdir()) == ["notes.txt", "stray.fit", "stray.fit.reason.json"]


def test_free_space_floor_pauses_ingestion_and_frees_delivered_archives_first(tmp_path, exports, caplog):
    settings = _settings(tmp_path / "var", min_free_mb=1e12)  # more than any disk here: always under the floor
    agent = Agent(settings)
    assert retention.free_bytes(settings.data_dir) < 1e18
    caplog.set_level(logging.INFO, "har_edge.agent.retention")
    assert agent.step(now=1.0) == []
    (agent.folder.inbox / "walk-0.fit").write_bytes(exports[0].read_bytes())
    assert agent.step(now=2.0) == [] and agent.step(now=3.0) == []
    assert (agent.folder.inbox / "walk-0.fit").exists()  # waits in the inbox, nothing lost
    assert "ingestion paused" in caplog.text and caplog.text.count("ingestion paused") == 1

    # the same data dir under a normal floor: the file is processed, delivered, then the floor comes back
    normal = _settings(tmp_path / "var", min_free_mb=0)
    agent2 = Agent(normal, outbox=agent.outbox)
    (o,) = agent2.step(now=10.0) + agent2.step(now=11.0)
    Delivery(agent.outbox).mark_finished(o.file_id)
    assert _archived(normal) == ["walk-0.fit"]
    keep_all = _settings(tmp_path / "var", min_free_mb=1e12, archive_max_mb=0, archive_max_age_days=0)
    assert retention.Retention(keep_all, agent.outbox).step() is True
    assert _archived(normal) == ["walk-0.fit"]  # an archive kept forever is never touched, even under the floor
    keeper = retention.Retention(settings, agent.outbox)  # archive budgets are far away: only the floor deletes
    assert keeper.step() is True
    assert _archived(normal) == []
    assert retention.ingestion_paused(normal, agent.outbox) is False


def test_usage_and_status_json_show_each_part_of_the_data_dir(tmp_path, exports):
    data_dir = tmp_path / "var"
    settings = _settings(data_dir, min_free_mb=0)
    agent = Agent(settings)
    _process(agent, exports[:1])
    (settings.logs_dir).mkdir()
    (settings.logs_dir / "agent.log").write_text("x" * 1000)
    (settings.inbox / "waiting.fit").write_bytes(b"y" * 500)
    use = retention.data_dir_usage(settings)
    assert set(use) == {"inbox", "work", "archive", "quarantine", "outbox", "models", "logs", "total", "free"}
    assert use["archive"] == exports[0].stat().st_size and use["inbox"] == 500 and use["logs"] == 1000
    assert use["outbox"] > 0 and use["total"] >= sum(v for k, v in use.items() if k not in ("total", "free"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAR_EDGE_")}
    env.update(HAR_EDGE_DATA_DIR=str(data_dir), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run(
        [sys.executable, "-m", "har_edge.cli", "status", "--json"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    disk = json.loads(r.stdout)["disk"]
    assert disk["archive"] == use["archive"] and disk["inbox"] == 500 and disk["logs"] == 1000
    human = subprocess.run(
        [sys.executable, "-m", "har_edge.cli", "status"], env=env, capture_output=True, text=True
    ).stdout
    assert "disk MB:" in human and "archive 0." in human


def test_log_file_is_rotated_by_size(tmp_path):
    logs = tmp_path / "logs"
    path = log_file_path(Path("agent.log"), logs, "agent")
    assert path == logs / "agent.log"
    assert log_file_path(Path("agent.log"), logs, "sync") == logs / "agent-sync.log"
    assert log_file_path(Path("/var/log/har-{command}.log"), logs, "sync") == Path("/var/log/har-sync.log")
    assert log_file_path(Path("agent.log"), logs, None) is None and log_file_path(None, logs, "agent") is None
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO", log_file=path, max_mb=0.002, backups=2)
        for i in range(200):
            logging.getLogger("har_edge.test").info("line %d %s", i, "x" * 40)
        for h in root.handlers:
            h.flush()
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    files = sorted(p.name for p in logs.iterdir())
    assert files == ["agent.log", "agent.log.1", "agent.log.2"]
    assert all(p.stat().st_size <= 2000 + 200 for p in logs.iterdir())
    assert "line 199" in (logs / "agent.log").read_text()


def test_agent_run_logs_to_the_configured_file(tmp_path):
    data_dir = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAR_EDGE_")}
    env.update(HAR_EDGE_DATA_DIR=str(data_dir), HAR_EDGE_LOG_FILE="{command}.log")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    r = subprocess.run(
        [sys.executable, "-m", "har_edge.cli", "agent", "run", "--check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "model har-cnn" in (data_dir / "logs" / "agent.log").read_text()


def test_retention_settings_defaults_env_and_refusals(tmp_path):
    s = load_settings(env={}, data_dir=tmp_path)
    a = s.agent
    assert (a.archive_max_age_days, a.archive_max_mb, a.quarantine_max_age_days, a.quarantine_max_mb) == (
        30.0,
        20480.0,
        90.0,
        2048.0,
    )
    assert a.min_free_mb == 512.0 and a.retention_interval_s == 60.0
    assert s.log_file is None and s.log_max_mb == 10.0 and s.log_backups == 5
    s = load_settings(env={"HAR_EDGE_AGENT__ARCHIVE_MAX_MB": "0", "HAR_EDGE_LOG_FILE": "a.log"}, data_dir=tmp_path)
    assert s.agent.archive_max_mb == 0 and s.log_file == Path("a.log")
    with pytest.raises(ConfigError, match=r"agent\.min_free_mb"):
        load_settings(env={"HAR_EDGE_AGENT__MIN_FREE_MB": "-1"}, data_dir=tmp_path)

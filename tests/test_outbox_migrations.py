"""Outbox schema migrations and integrity on real SQLite files: the committed v1 outbox (written by the
schema-v1 code, tests/fixtures/make_outbox_v1.py) is opened, migrated and delivered by today's code."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from sync_helpers import assert_delivered_once, file_runs, restore_mlflow_env  # noqa: F401 - autouse fixture

from har_edge.agent.errors import OutboxError, SchemaVersionError
from har_edge.agent.outbox import SCHEMA_VERSION, Outbox
from har_edge.agent.settings import load_settings

FIXTURES = Path(__file__).parent / "fixtures"
V1 = FIXTURES / "outbox-v1.sqlite"


def _v1_copy(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(V1, dest)
    return dest


def _shape(path: Path) -> dict[str, object]:
    """Tables with their columns (name, type, notnull, pk) and the index names: what must match after migrating."""
    con = sqlite3.connect(path)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        info = {t: con.execute(f'PRAGMA table_info("{t}")').fetchall() for t in tables}
        cols = {t: sorted((r[1], r[2].upper(), r[3], r[5]) for r in rows) for t, rows in info.items()}
        indexes = sorted(
            r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index' AND sql IS NOT NULL")
        )
    finally:
        con.close()
    return {"columns": cols, "indexes": indexes}


def _version(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT version FROM schema_version").fetchone()[0]
    finally:
        con.close()


def test_the_fixture_is_a_v1_outbox_with_a_backlog():
    con = sqlite3.connect(f"file:{V1}?mode=ro", uri=True)
    try:
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
        pending = "SELECT count(*) FROM files WHERE status='processed' AND finished_ms IS NULL"
        assert con.execute(pending).fetchone() == (3,)
        assert con.execute("SELECT count(*) FROM metrics WHERE delivered_ms IS NULL").fetchone()[0] > 100
        cols = {r[1] for r in con.execute("PRAGMA table_info(files)")}
        assert "error_stage" not in cols
        assert not con.execute("SELECT 1 FROM sqlite_master WHERE name='sync_refusals'").fetchall()
    finally:
        con.close()
    assert V1.stat().st_size < 300_000


def test_a_v1_outbox_migrates_in_place_to_the_fresh_schema(tmp_path):
    path = _v1_copy(tmp_path / "old" / "outbox.sqlite")
    before = sqlite3.connect(path).execute("SELECT count(*) FROM metrics").fetchone()[0]
    ob = Outbox(path)
    assert ob.opened_version == 1 and _version(path) == SCHEMA_VERSION
    counts = ob.status_counts()
    assert counts["files"] == {"processed": 3, "failed": 1, "duplicate": 1}
    assert counts["metric_points_pending"] == before  # nothing had to be drained, nothing was lost
    ob.close()
    fresh = tmp_path / "new" / "outbox.sqlite"
    Outbox(fresh).close()
    assert _shape(path) == _shape(fresh)
    # and opening again changes nothing
    ob = Outbox(path)
    assert ob.opened_version == SCHEMA_VERSION
    ob.close()


def test_sync_refusals_made_by_the_old_sync_are_kept(tmp_path):
    path = _v1_copy(tmp_path / "outbox.sqlite")
    con = sqlite3.connect(path)
    # exactly what sync's create_all made before v2
    con.execute(
        "CREATE TABLE sync_refusals (id INTEGER NOT NULL, time_ms BIGINT NOT NULL, kind VARCHAR(16) NOT NULL, "
        "file_id INTEGER, object TEXT NOT NULL, error TEXT NOT NULL, PRIMARY KEY (id))"
    )
    con.execute("INSERT INTO sync_refusals VALUES (1, 5, 'params', 1, 'params of rec-0000.fit', 'HTTP 400')")
    con.commit()
    con.close()
    from har_edge.sync.delivery import Delivery

    rows = Delivery(Outbox(path)).refusal_rows()
    assert [(r.kind, r.file_id, r.error) for r in rows] == [("params", 1, "HTTP 400")]


def test_a_newer_schema_is_refused_naming_both_versions(tmp_path):
    path = tmp_path / "o.sqlite"
    Outbox(path).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 5,))
    con.commit()
    con.close()
    newer = rf"schema version {SCHEMA_VERSION + 5}, newer than version {SCHEMA_VERSION}"
    with pytest.raises(SchemaVersionError, match=newer) as e:
        Outbox(path)
    assert str(path) in str(e.value)


def test_two_processes_opening_a_v1_outbox_at_once_migrate_it_once(tmp_path):
    path = _v1_copy(tmp_path / "outbox.sqlite")
    script = textwrap.dedent(
        f"""
        from har_edge.agent.outbox import Outbox
        ob = Outbox({str(path)!r})
        print(ob.opened_version)
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert sorted(outs).count("1") >= 1 and set(outs) <= {str(v) for v in range(1, SCHEMA_VERSION + 1)}
    assert _version(path) == SCHEMA_VERSION
    con = sqlite3.connect(path)
    assert [r[1] for r in con.execute("PRAGMA table_info(files)")].count("error_stage") == 1
    con.close()


# -- integrity ------------------------------------------------------------------------------------------


def _damage(path: Path) -> None:
    """Overwrite the middle of the windows table's pages: what a torn write on a bad card leaves."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = con.execute("SELECT rootpage FROM sqlite_master WHERE name='windows'").fetchone()[0]
    size = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    with open(path, "r+b") as f:
        f.seek((page - 1) * size + 8)
        f.write(b"\xa5" * (size - 16))


def test_a_damaged_outbox_is_refused_naming_the_file_and_the_salvage_doc(tmp_path):
    path = _v1_copy(tmp_path / "outbox.sqlite")
    Outbox(path).close()
    _damage(path)
    with pytest.raises(OutboxError) as e:
        Outbox(path)
    msg = str(e.value)
    assert str(path) in msg and "docs/reliability.md" in msg and "salvage" in msg.lower()


#: the salvage command of docs/reliability.md, verbatim (run in the outbox's folder)
SALVAGE = "sqlite3 outbox.sqlite .dump | sed 's/^ROLLBACK; -- due to errors$/COMMIT;/' | sqlite3 salvaged.sqlite"


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the sqlite3 command-line shell is not installed")
def test_the_documented_salvage_gives_an_outbox_that_opens(tmp_path):
    path = _v1_copy(tmp_path / "outbox.sqlite")
    Outbox(path).close()
    _damage(path)
    with pytest.raises(OutboxError):
        Outbox(path)
    Outbox(path, check=False).close()  # a plain open does not notice: quick_check is what refuses it
    r = subprocess.run(["bash", "-o", "pipefail", "-c", SALVAGE], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ob = Outbox(tmp_path / "salvaged.sqlite")
    counts = ob.status_counts()
    assert counts["files"] == {"processed": 3, "failed": 1, "duplicate": 1}  # the files table was not hit
    assert counts["metric_points_pending"] == 154
    assert ob.opened_version == SCHEMA_VERSION
    with ob.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    ob.close()


# -- delivery of a migrated backlog ----------------------------------------------------------------------


@pytest.mark.server
def test_a_v1_backlog_is_delivered_once_after_migrating(mlflow_server, tmp_path):
    from har_edge.sync.push import Pusher

    data_dir = tmp_path / "var"
    _v1_copy(data_dir / "outbox.sqlite")
    settings = load_settings(
        env={},
        data_dir=data_dir,
        device_id=f"dev-{uuid.uuid4().hex[:6]}",
        sync={"tracking_uri": mlflow_server.url, "request_timeout_s": 30, "experiment": f"v1-{uuid.uuid4().hex[:8]}"},
    )
    ob = Outbox(settings.outbox_path)
    assert ob.opened_version == 1
    p = Pusher(settings, ob)
    report = p.push(time.time())
    assert report.runs_created == 3 and report.files_finished == 3 and report.artifacts == 3
    assert report.deployments == 1 and not report.refused
    assert report.backlog == {"files": 0, "points": 0, "deployments": 0, "oldest_ms": None}
    assert_delivered_once(p, mlflow_server.root / "mlflow.db")
    again = p.push(time.time())
    assert again.runs_created == 0 and again.files_finished == 0
    assert all(len(rs) == 1 for rs in file_runs(p).values()) and len(file_runs(p)) == 3

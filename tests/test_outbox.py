"""The SQLite outbox on real files: atomic writes, schema version, concurrent writers."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sqlalchemy.exc import IntegrityError

from har_edge.agent.errors import SchemaVersionError
from har_edge.agent.outbox import FileRecord, MetricPoint, Outbox


def _rec(sha="a" * 64, status="processed", name="x.fit") -> FileRecord:
    return FileRecord(sha256=sha, name=name, size=10, status=status, received_ms=1, processed_ms=2, agent_version="t")


def test_file_with_windows_and_metrics_round_trips(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    probs = np.array([[0.1, 0.9], [0.7, 0.3]], np.float32)
    fid = ob.record_file(
        _rec(),
        label_names=["a", "b"],
        start_ms=np.array([1000, 3000]),
        probs=probs,
        points=[MetricPoint("windows", 2, 5), MetricPoint("minute_confidence", 0.8, 60_000, 1)],
    )
    names, starts, got = ob.file_windows(fid)
    assert names == ["a", "b"] and starts.tolist() == [1000, 3000]
    np.testing.assert_array_equal(got, probs)
    row = ob.file(fid)
    assert (row.windows, row.first_window_ms, row.last_window_ms) == (2, 1000, 3000)
    assert ob.file_metrics(fid) == [MetricPoint("windows", 2.0, 5, 0), MetricPoint("minute_confidence", 0.8, 60_000, 1)]
    assert ob.processed_file("a" * 64).id == fid


def test_pragmas_are_set(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", busy_timeout_s=7)
    with ob.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 7000
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_a_failing_write_leaves_nothing(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        ob.record_file(
            _rec(),
            label_names=["a"],
            start_ms=np.array([1]),
            probs=np.array([[1.0]], np.float32),
            points=[MetricPoint("bad", float("nan"), None)],
        )  # timestamp NOT NULL fails last
    assert ob.status_counts()["files"] == {}
    with ob.engine.connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM windows").scalar() == 0


def test_one_processed_row_per_content(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    ob.record_file(_rec())
    ob.record_file(_rec(status="duplicate"))
    ob.record_file(_rec(status="failed"))
    with pytest.raises(IntegrityError, match="UNIQUE"):
        ob.record_file(_rec())
    assert ob.status_counts()["files"] == {"processed": 1, "duplicate": 1, "failed": 1}


def test_unknown_schema_version_is_refused_clearly(tmp_path):
    path = tmp_path / "o.sqlite"
    Outbox(path).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE schema_version SET version = 99")
    con.commit()
    con.close()
    with pytest.raises(SchemaVersionError, match="schema version 99"):
        Outbox(path)


def test_two_processes_write_at_once(tmp_path):
    """The agent and the sync daemon share the file: concurrent writers wait, never fail."""
    path = tmp_path / "o.sqlite"
    Outbox(path).close()
    script = textwrap.dedent(
        f"""
        import sys
        from har_edge.agent.outbox import Outbox, MetricPoint
        ob = Outbox({str(path)!r})
        for i in range(200):
            ob.add_metrics([MetricPoint("k" + sys.argv[1], i, i)])
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)]) for n in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    ob = Outbox(path)
    assert ob.status_counts()["metric_points_pending"] == 600


def test_a_durable_transaction_is_full_only_for_itself(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    with ob.transaction(durable=True) as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL: the commit is fsynced
    with ob.transaction() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL again on the pooled connection


def test_attempts_and_first_seen_times_are_kept(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    a = ob.start_attempt("x.fit", 10, 123)
    ob.update_attempt(a, "inference", 16)
    assert [(r.stage, r.progress) for r in ob.attempts_of("x.fit", 10, 123)] == [("inference", 16)]
    assert ob.attempts_of("x.fit", 11, 123) == []  # another file under the same name
    ob.start_attempt("gone.fit", 1, 1)
    assert ob.prune_attempts(["x.fit"]) == 1  # gone.fit left work/ without the agent: forgotten at start
    ob.clear_attempts("x.fit")
    assert ob.attempts_of("x.fit", 10, 123) == []
    assert ob.first_seen_ms("p.fit", 5, 1, now=1000) == 1000
    assert ob.first_seen_ms("p.fit", 5, 1, now=9000) == 1000  # unchanged file: the first time stays
    assert ob.first_seen_ms("p.fit", 6, 2, now=9000) == 9000  # it changed: starts again
    assert ob.first_seen_ms("p.fit", 6, 2, now=500) == 500  # the clock went back: starts again
    ob.forget_seen(["p.fit"])
    assert ob.seen_names() == set()

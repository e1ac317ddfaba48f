"""The pipelined file push (har_edge.sync.filepipe): file N+1's run and points go while file N's CSV and FINISHED
are sent, and a failure of either leaves nothing of N marked that the server did not take."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from sync_helpers import (  # noqa: F401
    add_file,
    assert_delivered_once,
    file_runs,
    restore_mlflow_env,
    sqlite_ids,
    sync_senders,
)

from har_edge.agent.outbox import Outbox
from har_edge.agent.settings import load_settings
from har_edge.sync import filepipe
from har_edge.sync.delivery import Delivery
from har_edge.sync.errors import ServerUnreachable
from har_edge.sync.push import Pusher


def _settings(data_dir, uri: str | None, batch: int = 25):
    sync = {"batch_size": batch, "request_timeout_s": 30, "pages": False}  # the files only: no pages after them
    if uri is not None:
        sync |= {"tracking_uri": uri, "experiment": f"test-{uuid.uuid4().hex[:8]}"}
    return load_settings(env={}, data_dir=data_dir, device_id=f"dev-{uuid.uuid4().hex[:6]}", sync=sync)


class _Calls:
    """The client's file requests as the server sees them, in order: (what, run_id), from both sending threads."""

    def __init__(self, p: Pusher) -> None:
        self.p = p
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.real = {name: getattr(p.client, name) for name in ("log_batch", "log_artifact", "set_terminated")}
        p.client.log_batch = self._log_batch
        p.client.log_artifact = self._wrap("csv", "log_artifact")
        p.client.set_terminated = self._wrap("finished", "set_terminated")

    def note(self, what: str, run_id: str) -> None:
        with self.lock:
            self.seen.append((what, run_id))

    def _log_batch(self, run_id, metrics=(), *a, **k):
        if metrics:
            self.note("points", run_id)
        return self.real["log_batch"](run_id, metrics, *a, **k)

    def _wrap(self, what: str, name: str):
        def call(run_id, *a, **k):
            self.before(what, run_id)
            self.note(what, run_id)
            return self.real[name](run_id, *a, **k)

        return call

    def before(self, what: str, run_id: str) -> None:
        """A hook: tests make a request fail here."""

    def points_to_another_run_since(self, run_id: str) -> bool:
        """A point request to another file's run after the first request to this one."""
        with self.lock:
            mine = [i for i, (_, r) in enumerate(self.seen) if r == run_id]
            return bool(mine) and any(w == "points" and r != run_id for w, r in self.seen[mine[0] :])

    def restore(self) -> None:
        for name, fn in self.real.items():
            setattr(self.p.client, name, fn)


def _run_of(ob: Outbox, fid: int) -> str | None:
    return sqlite_ids(ob, f"SELECT run_id FROM files WHERE id = {fid}")[0][0]


def _fail_file_request(mlflow_server, data_dir, failing: str) -> None:
    """The ``failing`` request (csv | finished) of the first file fails as a dropped connection, once the next
    file's points are on their way: the pass ends; the first file is not marked finished (nor its CSV delivered
    when that failed), the next pass delivers everything once, no run made twice."""
    settings = _settings(data_dir, mlflow_server.url)
    ob = Outbox(settings.outbox_path)
    ids = [add_file(ob, seed, minutes=30) for seed in (11, 12, 13)]
    p = Pusher(settings, ob)
    calls = _Calls(p)
    overlapped: list[bool] = []

    def before(what: str, run_id: str) -> None:
        if what == failing and run_id == _run_of(ob, ids[0]):
            deadline = time.monotonic() + 30
            while not calls.points_to_another_run_since(run_id) and time.monotonic() < deadline:
                time.sleep(0.01)
            overlapped.append(calls.points_to_another_run_since(run_id))
            calls.note("failed", run_id)
            raise ConnectionError("connection refused")

    calls.before = before
    with pytest.raises(ServerUnreachable):
        p.push(time.time())
    assert overlapped == [True]  # the second file's points went while the first one's request was pending
    assert not sync_senders()
    first = ob.file(ids[0])
    assert first.finished_ms is None and first.run_id is not None
    assert (first.artifact_delivered_ms is None) == (failing == "csv")
    assert p.client.get_run(first.run_id).info.status == "RUNNING"
    assert sqlite_ids(ob, "SELECT count(*) FROM files WHERE finished_ms IS NOT NULL") == [(0,)]
    # the pass ended at the failure: nothing was sent after it (but for a chunk the points thread may have begun
    # in the instant between the failure and its report)
    after = calls.seen[calls.seen.index(("failed", first.run_id)) + 1 :]
    assert len(after) <= 1 and all(w == "points" for w, _ in after), after
    runs_before = {sha: [r.info.run_id for r in rs] for sha, rs in file_runs(p).items()}
    assert all(len(rs) == 1 for rs in runs_before.values())

    calls.restore()
    again = p.push(time.time())
    assert again.files_finished == 3 and again.runs_created == 3 - len(runs_before) and not again.refused
    assert_delivered_once(p, mlflow_server.root / "mlflow.db")  # one FINISHED run per file, every point once
    for sha, rs in runs_before.items():
        assert [r.info.run_id for r in file_runs(p)[sha]] == rs  # the runs of the failed pass were reused


@pytest.mark.server
def test_finished_of_a_file_failing_while_the_next_streams_marks_nothing_finished(mlflow_server, data_dir):
    _fail_file_request(mlflow_server, data_dir, "finished")


@pytest.mark.server
def test_the_csv_of_a_file_failing_while_the_next_streams_leaves_it_pending(mlflow_server, data_dir):
    _fail_file_request(mlflow_server, data_dir, "csv")


@pytest.mark.server
def test_requests_overlap_but_each_file_is_finished_last_and_in_order(mlflow_server, data_dir):
    settings = _settings(data_dir, mlflow_server.url)
    ob = Outbox(settings.outbox_path)
    ids = [add_file(ob, seed, minutes=20) for seed in (21, 22, 23, 24)]
    p = Pusher(settings, ob)
    calls = _Calls(p)
    report = p.push(time.time())
    assert report.files_finished == 4 and report.artifacts == 4 and report.runs_created == 4
    assert_delivered_once(p, mlflow_server.root / "mlflow.db")
    order = [_run_of(ob, fid) for fid in ids]
    finished = [r for w, r in calls.seen if w == "finished"]
    assert finished == order  # the pass's order
    for run in order:
        mine = [i for i, (_, r) in enumerate(calls.seen) if r == run]
        assert calls.seen[mine[-1]] == ("finished", run)  # after every point request and the CSV of its file
        assert sum(1 for i in mine if calls.seen[i][0] == "csv") == 1
    # and the streams did not wait for the per-file requests: a file's points begin before the previous
    # file is finished, for some file of the pass
    starts = [next(i for i, (w, r) in enumerate(calls.seen) if w == "points" and r == run) for run in order[1:]]
    ends = [calls.seen.index(("finished", run)) for run in order[:-1]]
    assert any(s < e for s, e in zip(starts, ends, strict=True)), calls.seen


def test_no_more_than_a_few_chunks_are_read_ahead_of_the_acknowledgements(data_dir, monkeypatch):
    """Bounded memory: points read from the outbox but not yet marked never exceed POINTS_AHEAD + 1 chunks."""
    settings = _settings(data_dir, None, batch=20)
    ob = Outbox(settings.outbox_path)
    for seed in (31, 32):
        add_file(ob, seed, minutes=30)
    p = Pusher(settings, ob)
    outstanding: set[int] = set()
    peak = [0]
    real_pending, real_mark = Delivery.pending_points, Delivery.mark_points

    def pending_points(self, file_id, limit, after_id=None):
        pts = real_pending(self, file_id, limit, after_id)
        if file_id is not None:
            outstanding.update(x.id for x in pts)
            peak[0] = max(peak[0], len(outstanding))
        return pts

    def mark_points(self, ids, at_ms=None):
        outstanding.difference_update(ids)
        return real_mark(self, ids, at_ms)

    monkeypatch.setattr(Delivery, "pending_points", pending_points)
    monkeypatch.setattr(Delivery, "mark_points", mark_points)
    report = p.push(time.time())
    assert report.files_finished == 2 and report.points > 10 * 20
    assert 20 < peak[0] <= (filepipe.POINTS_AHEAD + 1) * 20
    assert_delivered_once(p, data_dir / "mlflow" / "mlflow.db")


def test_the_windows_are_read_in_short_reads_so_writers_go_on_between_runs(data_dir):
    """The CSV is written a run of windows at a time while marks are made: no read may hold the outbox's lock
    (every transaction begins IMMEDIATE) from one run to the next."""
    ob = Outbox(data_dir / "outbox.sqlite")
    fid = add_file(ob, 3, minutes=30)  # 900 windows
    other = Outbox(data_dir / "outbox.sqlite", busy_timeout_s=0.2, check=False)
    parts = Delivery(ob).iter_windows(fid, rows=200)
    got = [next(parts)]
    for _ in range(3):
        Delivery(other).mark_artifact(fid)  # a writer between two runs: would time out on a held lock
        got.append(next(parts))
    got.extend(parts)
    assert [len(s) for s, _ in got] == [200, 200, 200, 200, 100]
    assert ob.file(fid).artifact_delivered_ms is not None
    other.close()
    ob.close()

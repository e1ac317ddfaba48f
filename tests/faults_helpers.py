"""Fault injection against the real ``har-edge`` processes, on a seeded schedule (tests/test_faults.py, bench/chaos.py).

Black box: the agent (``agent run``) and the sync daemon (``sync run``) are child
processes configured by ``HAR_EDGE_*`` variables; the MLflow server is a real
``mlflow server`` on 127.0.0.1. Faults:

- ``kill9_agent`` / ``kill9_sync``: SIGKILL of the process group, preferably while
  the agent has a file in ``work/`` or sync is marking points delivered, then a restart;
- ``term_agent`` / ``term_sync``: SIGTERM, the exit code must be 0, then a restart;
- ``hung``: the server is SIGSTOPped for a few seconds (connections are accepted by
  the kernel and never answered), then SIGCONTed;
- ``refused``: the :class:`Gate` in front of the server closes its port for a few
  seconds (what a stopped server looks like; restarting the real server costs 30-50 s);
- ``server_restart`` (long run only): the real server is killed and started again;
- ``slow_copy``: a file is written into ``inbox/`` under its final name in chunks, with
  pauses shorter than ``settle_s``;
- ``paused_copy``: a file is created in ``inbox/`` and its first byte comes only after
  ``pause_s`` (longer than ``settle_s``), then the rest.

:func:`check_invariants` compares the end state with what was dropped.
"""

from __future__ import annotations

import contextlib
import csv
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fitgen import write_activity_fit, write_imu_fit

START = datetime(2025, 3, 24, 7, 0, 0, tzinfo=UTC)

SHORT_DECK = {
    "kill9_agent": 10,
    "kill9_sync": 10,
    "term_agent": 3,
    "term_sync": 3,
    "hung": 4,
    "refused": 4,
    "slow_copy": 3,
    "paused_copy": 3,
}
LONG_DECK = {
    "kill9_agent": 110,
    "kill9_sync": 100,
    "term_agent": 10,
    "term_sync": 10,
    "hung": 6,
    "refused": 4,
    "server_restart": 2,
    "slow_copy": 15,
    "paused_copy": 10,
}


# -- the network in front of the server ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gate:
    """A TCP forwarder 127.0.0.1:port -> 127.0.0.1:target. ``close()`` refuses connections and resets open ones."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.open()

    def open(self) -> None:
        if self._listener is not None:
            return
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        s.settimeout(0.1)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True, name="gate-accept").start()

    def close(self) -> None:
        s, self._listener = self._listener, None
        if s is None:
            return
        time.sleep(0.15)  # the accept loop sees the flag and closes the socket itself
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for c in conns:
            try:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                c.close()
            except OSError:
                pass

    @property
    def is_open(self) -> bool:
        return self._listener is not None

    def _accept(self, s: socket.socket) -> None:
        try:
            while self._listener is s:
                try:
                    client, _ = s.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                try:
                    upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                except OSError:
                    client.close()
                    continue
                upstream.settimeout(None)
                client.settimeout(None)
                with self._lock:
                    self._conns.update((client, upstream))
                done: list[int] = []
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(a, b, done), daemon=True).start()
        finally:
            s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, done: list[int]) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            with self._lock:
                done.append(1)
                last = len(done) == 2
                if last:
                    self._conns.discard(src)
                    self._conns.discard(dst)
            if last:
                src.close()
                dst.close()


# -- the daemons ------------------------------------------------------------------------------------


class Daemon:
    """One ``har-edge`` long-running command in its own process group."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path, ready: str) -> None:
        self.name, self.args, self.env, self.log, self.ready_line = name, args, env, log, ready
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.bad_exits: list[str] = []
        self._ready_before = 0

    def _ready_count(self) -> int:
        try:
            return self.log.read_text(errors="replace").count(self.ready_line)
        except FileNotFoundError:
            return 0

    def wait_ready(self, timeout: float = 60) -> bool:
        """Wait until this start logged its ready line (signal handlers are installed by then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready_count() > self._ready_before:
                return True
            time.sleep(0.05)
        return False

    def start(self) -> None:
        self._ready_before = self._ready_count()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "har_edge.cli", *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    def check(self) -> None:
        """Restart the process if it died on its own (and remember that: it is a finding)."""
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is not None:
            self.bad_exits.append(f"{self.name} exited on its own with {rc}")
            self.start()

    def kill9(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def term(self, timeout: float = 90) -> int:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            return -999


def daemon_env(data_dir: Path, tracking_uri: str, device: str, experiment: str, settle_s: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HAR_EDGE_", "MLFLOW_TRACKING"))}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(
        HAR_EDGE_DATA_DIR=str(data_dir),
        HAR_EDGE_DEVICE_ID=device,
        HAR_EDGE_LOG_LEVEL="INFO",
        HAR_EDGE_AGENT__SETTLE_S=str(settle_s),
        HAR_EDGE_AGENT__SCAN_INTERVAL_S="0.1",
        HAR_EDGE_SYNC__TRACKING_URI=tracking_uri,
        HAR_EDGE_SYNC__EXPERIMENT=experiment,
        HAR_EDGE_SYNC__PUSH_INTERVAL_S="0.3",
        HAR_EDGE_SYNC__PULL_INTERVAL_S="3600",
        HAR_EDGE_SYNC__JITTER_S="0",
        HAR_EDGE_SYNC__BACKOFF_INITIAL_S="0.5",
        HAR_EDGE_SYNC__BACKOFF_MAX_S="2",
        HAR_EDGE_SYNC__REQUEST_TIMEOUT_S="3",
        HAR_EDGE_SYNC__BATCH_SIZE="40",
        HAR_EDGE_SYNC__HEARTBEAT_INTERVAL_S="3600",
    )
    return env


# -- the files ----------------------------------------------------------------------------------------


@dataclass
class Export:
    path: Path
    good: bool


def make_corpus(cache: Path, n_good: int, n_bad: int, rng: random.Random) -> list[Export]:
    """Distinct IMU FIT exports of 4-20 minutes (kept in ``cache``), and a few that must be quarantined."""
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n_good):
        minutes = rng.choice((4, 8, 12, 20))
        p = cache / f"good-{i:03d}-{minutes}min.fit"
        if not p.exists():
            tmp = p.with_suffix(".tmp")
            write_imu_fit(
                tmp, rate_hz=50, seconds=minutes * 60, start=START + timedelta(hours=i), seed=i, engine="fast"
            )
            os.replace(tmp, p)
        out.append(Export(p, True))
    for i in range(n_bad):
        p = cache / f"bad-{i:03d}.{'fit' if i % 2 == 0 else 'txt'}"
        if not p.exists():
            if i % 2 == 0:
                write_activity_fit(p)  # an ordinary activity: no IMU data
            else:
                p.write_text(f"not an export {i}\n")
        out.append(Export(p, False))
    return out


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class ChaosReport:
    faults: Counter = field(default_factory=Counter)
    mid_work: Counter = field(default_factory=Counter)
    dropped: list[Export] = field(default_factory=list)
    duration_s: float = 0.0
    settle_s: float = 0.0
    pause_s: float = 0.0
    bad_exits: list[str] = field(default_factory=list)
    term_codes: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    how: dict[str, str] = field(default_factory=dict)  # file name -> drop | slow_copy | paused_copy
    runs: int = 0
    points_compared: int = 0
    windows_compared: int = 0

    def summary(self) -> str:
        total = sum(self.faults.values())
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
        mid = ", ".join(f"{k} {v}" for k, v in sorted(self.mid_work.items()))
        good = sum(e.good for e in self.dropped)
        return (
            f"{total} faults in {self.duration_s:.0f} s ({kinds}); while busy: {mid}; "
            f"{good} good + {len(self.dropped) - good} bad files, {self.runs} MLflow file runs, "
            f"{self.points_compared} metric points and {self.windows_compared} predictions compared; "
            f"settle_s {self.settle_s}, paused copies wait {self.pause_s} s before the first byte"
        )


class Chaos:
    """Runs a seeded deck of faults against an agent and a sync daemon sharing ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        server,
        corpus: list[Export],
        *,
        seed: int,
        settle_s: float = 0.3,
        pause_s: float | None = None,
        log_dir: Path,
    ) -> None:
        self.data_dir = data_dir
        self.server = server
        self.gate = Gate(server.port)
        self.rng = random.Random(seed)
        self.settle_s = settle_s
        self.pause_s = pause_s if pause_s is not None else max(1.0, 3 * settle_s)
        self.device = f"chaos-{uuid.uuid4().hex[:8]}"
        self.experiment = f"faults-{uuid.uuid4().hex[:8]}"
        env = daemon_env(data_dir, self.gate.url, self.device, self.experiment, settle_s)
        self.agent = Daemon("agent", ["agent", "run"], env, log_dir / "agent.log", "har_edge.agent.daemon: watching")
        self.sync = Daemon("sync", ["sync", "run"], env, log_dir / "sync.log", "sync daemon started")
        self.pending = list(corpus)
        self.rng.shuffle(self.pending)
        self.report = ChaosReport(settle_s=settle_s, pause_s=self.pause_s)
        self._copies: list[threading.Thread] = []
        self._outage_until: float | None = None
        self._outage_kind: str | None = None
        self.inbox = data_dir / "inbox"
        self.work = data_dir / "work"
        self.outbox = data_dir / "outbox.sqlite"

    # -- observation --------------------------------------------------------------------------

    def _sql(self, query: str) -> list[tuple]:
        if not self.outbox.exists():
            return []
        con = sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute(query).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            con.close()

    def _delivered_points(self) -> int:
        rows = self._sql("SELECT count(*) FROM metrics WHERE delivered_ms IS NOT NULL")
        return int(rows[0][0]) if rows else 0

    def _undelivered_files(self) -> int:
        rows = self._sql("SELECT count(*) FROM files WHERE status = 'processed' AND finished_ms IS NULL")
        return int(rows[0][0]) if rows else 0

    def _busy_files(self, where: Path) -> list[Path]:
        try:
            return [p for p in where.iterdir() if p.is_file() and not p.name.startswith(".")]
        except FileNotFoundError:
            return []

    # -- dropping -----------------------------------------------------------------------------

    def _next(self, good_only: bool = False) -> Export | None:
        for i, e in enumerate(self.pending):
            if e.good or not good_only:
                return self.pending.pop(i)
        return None

    def drop(self, e: Export) -> None:
        """An ordinary, atomic drop: copy under a hidden name, then rename."""
        self.report.how[e.path.name] = "drop"
        self.inbox.mkdir(parents=True, exist_ok=True)
        tmp = self.inbox / f".{e.path.name}.part"
        shutil.copyfile(e.path, tmp)
        os.replace(tmp, self.inbox / e.path.name)
        self.report.dropped.append(e)

    def _copy_in_thread(self, e: Export, *, first_byte_after: float, chunk_pause: float) -> None:
        self.report.how[e.path.name] = "paused_copy" if first_byte_after > 0 else "slow_copy"
        data = e.path.read_bytes()
        dest = self.inbox / e.path.name
        self.report.dropped.append(e)

        def write() -> None:
            with open(dest, "wb") as f:
                f.flush()
                time.sleep(first_byte_after)
                step = max(1, len(data) // 8)
                for i in range(0, len(data), step):
                    f.write(data[i : i + step])
                    f.flush()
                    time.sleep(chunk_pause)

        t = threading.Thread(target=write, daemon=True, name=f"copy-{e.path.name}")
        t.start()
        self._copies.append(t)

    # -- faults -------------------------------------------------------------------------------

    def _wait(self, cond, timeout: float, every: float = 0.002) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(every)
        return False

    def _kill9_agent(self) -> None:
        if not self._busy_files(self.work):
            e = self._next(good_only=True)
            if e is not None:
                self.drop(e)
        busy = self._wait(lambda: bool(self._busy_files(self.work)), 3.0)
        if busy:
            time.sleep(self.rng.uniform(0, 0.15))  # somewhere inside decode, inference or the store
        self.agent.kill9()
        self.report.mid_work["kill9_agent"] += bool(busy)
        self.agent.start()

    def _kill9_sync(self) -> None:
        if self._undelivered_files() == 0 and (e := self._next(good_only=True)) is not None:
            self.drop(e)
            self._wait(lambda: self._undelivered_files() > 0, 5.0, 0.01)
        before = self._delivered_points()
        busy = self._undelivered_files() > 0 and self._wait(lambda: self._delivered_points() != before, 4.0, 0.005)
        self.sync.kill9()
        self.report.mid_work["kill9_sync"] += bool(busy)
        self.sync.start()

    def _term(self, d: Daemon) -> None:
        # SIGTERM is graceful once the daemon runs (before that, during ~1 s of imports and set-up, the default
        # action kills it: nothing is claimed yet, but the exit code is -15); so wait until it says it runs
        if not d.wait_ready():
            self.report.problems.append(f"{d.name} did not log {d.ready_line!r} within 60 s of its start")
        time.sleep(self.rng.uniform(0, 0.5))
        rc = d.term()
        self.report.term_codes.append(rc)
        if rc != 0:
            self.report.problems.append(f"SIGTERM of {d.name}: exit code {rc} (expected 0)")
        d.start()

    def _outage(self, kind: str) -> None:
        self._end_outage(force=True)  # one outage at a time: the previous one ends now
        self._outage_kind = kind
        self._outage_until = time.monotonic() + self.rng.uniform(2.0, 5.0)
        if kind == "hung":
            os.killpg(self.server.proc.pid, signal.SIGSTOP)
        elif kind == "refused":
            self.gate.close()
        else:  # server_restart: the real server goes away and comes back on its port
            os.killpg(self.server.proc.pid, signal.SIGKILL)
            self.server.proc.wait(timeout=30)
            self.server.start_background()

    def _end_outage(self, force: bool = False) -> None:
        if self._outage_kind is None:
            return
        if not force and self._outage_until is not None and time.monotonic() < self._outage_until:
            return
        if self._outage_kind == "hung":
            os.killpg(self.server.proc.pid, signal.SIGCONT)
        elif self._outage_kind == "refused":
            self.gate.open()
        else:
            self.server.wait()
        self._outage_kind = self._outage_until = None

    def _fault(self, kind: str) -> None:
        if kind == "kill9_agent":
            self._kill9_agent()
        elif kind == "kill9_sync":
            self._kill9_sync()
        elif kind == "term_agent":
            self._term(self.agent)
        elif kind == "term_sync":
            self._term(self.sync)
        elif kind in ("hung", "refused", "server_restart"):
            self._outage(kind)
        elif kind in ("slow_copy", "paused_copy"):
            e = self._next(good_only=True)
            if e is None:
                self.report.faults[kind + "_skipped_no_file_left"] += 1
                return
            if kind == "slow_copy":
                self._copy_in_thread(e, first_byte_after=0.0, chunk_pause=self.settle_s * 0.4)
            else:
                self._copy_in_thread(e, first_byte_after=self.pause_s, chunk_pause=0.01)
        else:
            raise ValueError(kind)
        self.report.faults[kind] += 1

    # -- the whole run ----------------------------------------------------------------------------

    def run(
        self, deck: dict[str, int], *, drop_every: int = 1, settle_timeout_s: float = 180.0, log=None
    ) -> ChaosReport:
        t0 = time.monotonic()
        faults = [k for k, n in deck.items() for _ in range(n)]
        self.rng.shuffle(faults)
        self.agent.start()
        self.sync.start()
        try:
            for i, kind in enumerate(faults):
                if i % drop_every == 0 and (e := self._next()) is not None:
                    self.drop(e)
                self._end_outage()
                self.agent.check()
                self.sync.check()
                self._fault(kind)
                time.sleep(self.rng.uniform(0.05, 0.6))
                if log is not None and (i + 1) % 25 == 0:
                    log(f"{i + 1}/{len(faults)} faults, {time.monotonic() - t0:.0f} s")
            while (e := self._next()) is not None:
                self.drop(e)
            self._end_outage(force=True)
            for t in self._copies:
                t.join(timeout=60)
            if not self._wait(self._quiet, settle_timeout_s, every=0.2):
                self.report.problems.append(f"not quiet {settle_timeout_s:.0f} s after the last fault")
            self.agent.check()
            self.sync.check()
        finally:
            self._end_outage(force=True)
            for d in (self.agent, self.sync):
                if d.proc is not None and d.proc.poll() is None:
                    d.wait_ready()
                    rc = d.term()
                    if rc != 0:
                        self.report.problems.append(f"final SIGTERM of {d.name}: exit code {rc}")
            self.gate.close()
        self.report.duration_s = time.monotonic() - t0
        self.report.bad_exits = self.agent.bad_exits + self.sync.bad_exits
        return self.report

    def _quiet(self) -> bool:
        """Everything dropped has a row, nothing waits in inbox/ or work/, every processed file is finished."""
        rows = self._sql("SELECT count(*) FROM files")
        n_rows = int(rows[0][0]) if rows else 0
        return (
            n_rows >= len(self.report.dropped)
            and not self._busy_files(self.inbox)
            and not self._busy_files(self.work)
            and self._undelivered_files() == 0
        )


# -- the invariants -------------------------------------------------------------------------------------


def _sha256(p: Path) -> str:
    import hashlib

    return hashlib.sha256(p.read_bytes()).hexdigest()


def check_invariants(chaos: Chaos, tmp: Path) -> list[str]:
    """What must hold after any schedule of faults; returns the problems found (empty: all good)."""
    from mlflow import MlflowClient

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from har_edge.agent.outbox import Outbox
    from har_edge.sync import runs as tags

    rep = chaos.report
    problems = list(rep.problems) + list(rep.bad_exits)
    data = chaos.data_dir
    left_in = [p.name for d in ("inbox", "work") for p in chaos._busy_files(data / d)]
    if left_in:
        problems.append(f"left in inbox/ or work/: {left_in}")
    good = {_sha256(e.path): e.path.name for e in rep.dropped if e.good}
    bad = {e.path.name for e in rep.dropped if not e.good}
    quarantined = {
        p.name for p in (data / "quarantine").iterdir() if p.is_file() and not p.name.endswith(".reason.json")
    }
    wrongly = sorted(quarantined - bad)
    if wrongly:
        problems.append(f"good files quarantined: {[f'{n} ({rep.how.get(n)})' for n in wrongly]}")
    if bad - quarantined:
        problems.append(f"bad files not quarantined: {sorted(bad - quarantined)}")

    ob = Outbox(data / "outbox.sqlite")
    try:
        with ob.engine.connect() as c:
            rows = c.exec_driver_sql("SELECT id, sha256, name, status, run_id, finished_ms FROM files").all()
            has_refusals = c.exec_driver_sql(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sync_refusals'"
            ).first()
            refusals = c.exec_driver_sql("SELECT kind, object, error FROM sync_refusals").all() if has_refusals else []
        if refusals:
            problems.append(f"the server refused items: {[tuple(r) for r in refusals][:5]}")
        processed: dict[str, list] = {}
        for r in rows:
            if r.status == "processed":
                processed.setdefault(r.sha256, []).append(r)
            elif r.sha256 in good:
                problems.append(f"{r.name}: a {r.status} row for a good file")
        for sha, name in good.items():
            got = processed.get(sha, [])
            if len(got) != 1:
                problems.append(f"{name} ({rep.how.get(name)}): {len(got)} processed rows (expected 1)")
        for sha in set(processed) - set(good):
            problems.append(f"processed rows for content never dropped as good: {sha[:12]}")

        client = MlflowClient(chaos.server.url)
        exp = client.get_experiment_by_name(chaos.experiment)
        if exp is None:
            return [*problems, f"experiment {chaos.experiment} does not exist on the server"]
        found = client.search_runs(
            [exp.experiment_id], f"tags.`{tags.KIND}` = 'file' and tags.`{tags.DEVICE}` = '{chaos.device}'",
            max_results=5000,
        )  # fmt: skip
        by_sha: dict[str, list] = {}
        for run in found:
            by_sha.setdefault(run.data.tags.get(tags.FILE_SHA, ""), []).append(run)
        rep.runs = len(found)
        for sha, name in good.items():
            got_runs = by_sha.get(sha, [])
            if len(got_runs) != 1:
                problems.append(f"{name} ({rep.how.get(name)}): {len(got_runs)} MLflow runs (expected 1)")
                continue
            (run,) = got_runs
            (row,) = processed.get(sha, [None]) if len(processed.get(sha, [])) == 1 else (None,)
            if row is None:
                continue
            if run.info.run_id != row.run_id or run.info.status != "FINISHED" or row.finished_ms is None:
                problems.append(f"{name}: run {run.info.run_id} {run.info.status}, outbox run {row.run_id}")
                continue
            problems += _compare_file(client, ob, row, run, tmp, rep)
        extra = set(by_sha) - set(good)
        if extra:
            problems.append(f"{len(extra)} MLflow runs for content never dropped as good")
    finally:
        ob.close()
    return problems


def _compare_file(client, ob, row, run, tmp: Path, rep: ChaosReport) -> list[str]:
    """The run's metric histories and predictions.csv against the outbox, through the MLflow client."""
    problems = []
    expected: dict[str, Counter] = {}
    for p in ob.file_metrics(row.id):
        expected.setdefault(p.key, Counter())[(p.value, p.timestamp_ms, p.step)] += 1
    if set(run.data.metrics) != set(expected):
        problems.append(f"{row.name}: metric keys differ: {sorted(set(run.data.metrics) ^ set(expected))[:5]}")
    for key, points in expected.items():
        got = Counter((m.value, m.timestamp, m.step) for m in client.get_metric_history(run.info.run_id, key))
        if got != points:
            problems.append(
                f"{row.name}: history of {key} differs (MLflow {sum(got.values())}, outbox {sum(points.values())})"
            )
        rep.points_compared += sum(points.values())
    names, starts, probs = ob.file_windows(row.id)
    dest = tmp / run.info.run_id
    dest.mkdir(parents=True, exist_ok=True)
    with open(client.download_artifacts(run.info.run_id, "predictions.csv", str(dest)), newline="") as f:
        table = list(csv.DictReader(f))
    if [int(r["start_ms"]) for r in table] != starts.tolist():
        problems.append(f"{row.name}: predictions.csv start times differ from the outbox")
    elif [r["label"] for r in table] != [names[i] for i in probs.argmax(1)]:
        problems.append(f"{row.name}: predictions.csv labels differ from the outbox")
    else:
        for r, pr in zip(table, probs, strict=True):
            if any(abs(float(r[f"p_{n}"]) - float(v)) > 1e-6 for n, v in zip(names, pr, strict=True)):
                problems.append(f"{row.name}: predictions.csv probabilities differ from the outbox")
                break
    rep.windows_compared += len(table)
    return problems

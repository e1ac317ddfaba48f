"""Raw custody on real stores: a folder (a DVC local remote) and a real SeaweedFS S3 gateway on 127.0.0.1.

Resumption is tested with a real sync process killed with SIGKILL in the middle of a 123 MB multipart
upload; corruption with a part overwritten in the store and an object whose bytes differ from its name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fitgen import write_imu_fit

from har_edge.agent import retention
from har_edge.agent.acknowledged import custody_backlog, custody_delivered
from har_edge.agent.errors import ConfigError
from har_edge.agent.outbox import Outbox
from har_edge.agent.settings import load_settings
from har_edge.sync.custody import Custody
from har_edge.sync.daemon import SyncDaemon
from har_edge.sync.errors import ServerUnreachable
from har_edge.sync.passes import record
from har_edge.sync.rawstore import FolderStore, Item, object_key
from har_edge.sync.rawstore_s3 import S3Store

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
START = datetime(2025, 3, 24, 7, 0, 0, tzinfo=UTC)


def _settings(data_dir: Path, store: str, **sync):
    return load_settings(env={}, data_dir=data_dir, agent={"settle_s": 0.0}, sync={"raw_store": store, **sync})


def _folder_settings(tmp_path: Path):
    """A folder store under ``tmp_path`` and the settings of a device that keeps its raw exports there."""
    store = tmp_path / "remote"
    store.mkdir()
    return store, _settings(tmp_path / "var", str(store))


def _archive(settings, name: str, data: bytes, day: str = "2026-12-01") -> Path:
    p = settings.archive_dir / day / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def _rows(settings) -> dict[str, dict]:
    con = sqlite3.connect(settings.outbox_path)
    con.row_factory = sqlite3.Row
    try:
        return {r["path"]: dict(r) for r in con.execute("SELECT * FROM raw_custody")}
    finally:
        con.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- a folder store (a DVC local remote) ----------------------------------------------------------------


def test_folder_store_delivers_content_addressed_and_verified(tmp_path):
    store, settings = _folder_settings(tmp_path)
    a, b = os.urandom(300_000), os.urandom(1000)
    _archive(settings, "walk.fit", a)
    _archive(settings, "copy.fit", a, day="2026-12-02")  # the same bytes under another name: one object
    _archive(settings, "run.fit", b)
    with Outbox(settings.outbox_path) as ob:
        c = Custody(settings, ob)
        assert c.backlog().files == 3
        rep = c.run()
        assert rep.delivered == 3 and rep.hashed == 3 and not rep.failed
        assert rep.bytes_sent == len(a) + len(b) and rep.already_there == 1
        dest = store / "har-edge" / "raw" / "sha256" / _sha(a)[:2] / _sha(a)
        assert dest.read_bytes() == a
        meta = json.loads(dest.with_suffix(".json").read_text())
        assert meta["sha256"] == _sha(a) and meta["size"] == len(a) and meta["name"] in ("walk.fit", "copy.fit")
        assert (store / object_key(_sha(b))).read_bytes() == b
        rows = _rows(settings)
        assert {r["state"] for r in rows.values()} == {"delivered"}
        assert all(r["checksum"].startswith("sha256 ") for r in rows.values())
        assert c.backlog().files == 0 and c.backlog().delivered == 3
        again = c.run()  # nothing left: nothing hashed or sent
        assert again.delivered == 0 and again.hashed == 0 and again.bytes_sent == 0
        assert custody_delivered(ob, settings.archive_dir, settings.archive_dir / "2026-12-01" / "walk.fit", str(store))


def test_folder_store_resumes_a_partial_copy_and_detects_a_damaged_one(tmp_path):
    store = tmp_path / "remote"
    store.mkdir()
    settings = _settings(tmp_path / "var", f"file://{store}", raw_store_part_mb=5)
    data = os.urandom(12 * MIB)
    path = _archive(settings, "long.fit", data)
    fs = FolderStore(f"file://{store}")
    item = Item(
        path,
        "2026-12-01/long.fit",
        len(data),
        _sha(data),
        settings.device,
        key=object_key(_sha(data)),
        part_size=5 * MIB,
    )
    saves = []
    assert fs.upload(item, lambda: len(saves) >= 1, saves.append) is None  # stopped after the first part
    partial = next((store / object_key(_sha(data))).parent.glob("*.partial-*"))
    assert partial.stat().st_size == 5 * MIB and item.bytes_done == 5 * MIB

    with Outbox(settings.outbox_path) as ob:
        rep = Custody(settings, ob).run()
        assert rep.delivered == 1 and rep.bytes_sent == len(data) - 5 * MIB  # resumed, not restarted
        assert (store / object_key(_sha(data))).read_bytes() == data

        # a damaged partial copy (a flipped byte in what was already written) is caught by the read-back
        other = _archive(settings, "other.fit", os.urandom(7 * MIB))
        item2 = Item(
            other, "2026-12-01/other.fit", other.stat().st_size, _sha(other.read_bytes()), settings.device,
            key=object_key(_sha(other.read_bytes())), part_size=5 * MIB,
        )  # fmt: skip
        calls = []
        fs.upload(item2, lambda: len(calls) >= 1, calls.append)
        partial2 = next((store / item2.key).parent.glob("*.partial-*"))
        with open(partial2, "r+b") as f:
            f.seek(1000)
            f.write(b"\x00" if other.read_bytes()[1000] else b"\x01")
        rep = Custody(settings, ob).run()
        assert len(rep.failed) == 1 and "other.fit" in rep.failed[0] and "reads back as sha256" in rep.failed[0]
        row = _rows(settings)["2026-12-01/other.fit"]
        assert row["state"] == "pending" and row["attempts"] == 1 and "reads back" in row["last_error"]
        rep = Custody(settings, ob).run()  # copied again from zero, verified
        assert not rep.failed and rep.delivered == 1 and rep.bytes_sent == 7 * MIB
        assert (store / item2.key).read_bytes() == other.read_bytes()
        assert _rows(settings)["2026-12-01/other.fit"]["state"] == "delivered"


def test_an_object_with_other_bytes_under_the_name_is_not_trusted(tmp_path):
    store, settings = _folder_settings(tmp_path)
    data = os.urandom(50_000)
    _archive(settings, "a.fit", data)
    bad = store / object_key(_sha(data))
    bad.parent.mkdir(parents=True)
    bad.write_bytes(os.urandom(len(data)))  # same size, other bytes
    with Outbox(settings.outbox_path) as ob:
        rep = Custody(settings, ob).run()
    assert rep.delivered == 1 and rep.already_there == 0 and rep.bytes_sent == len(data)
    assert bad.read_bytes() == data


# -- retention waits for custody -------------------------------------------------------------------------


def test_retention_keeps_an_acknowledged_export_until_custody_verified_it(tmp_path):
    from har_edge.agent.daemon import Agent
    from har_edge.sync.delivery import Delivery

    store = tmp_path / "remote"
    store.mkdir()
    settings = load_settings(
        env={},
        data_dir=tmp_path / "var",
        agent={"settle_s": 0.0, "archive_max_age_days": 0, "archive_max_mb": 0.01, "min_free_mb": 0},
        sync={"raw_store": str(store)},
    )
    src = tmp_path / "walk.fit"
    write_imu_fit(src, rate_hz=50, seconds=60, start=START, seed=1, engine="fast")
    agent = Agent(settings)
    (agent.folder.inbox / src.name).write_bytes(src.read_bytes())
    outcomes = agent.step(now=1e9) + agent.step(now=1e9 + 500)
    assert [o.status for o in outcomes] == ["processed"]
    Delivery(agent.outbox).mark_finished(outcomes[0].file_id)  # the server has its results
    keeper = retention.Retention(settings, agent.outbox)
    rep = keeper.prune()
    assert rep.deleted["archive"] == 0 and rep.kept["archive"] == 1  # not yet in the raw store
    archived = next(settings.archive_dir.rglob("walk.fit"))

    Custody(settings, agent.outbox).run()
    archived.touch()  # the file changed after custody verified it: that copy no longer counts
    assert keeper.prune().kept["archive"] == 1
    rep = Custody(settings, agent.outbox).run()
    assert rep.hashed == 1 and rep.delivered == 1 and rep.already_there == 1  # same bytes: nothing sent again
    rep = keeper.prune()
    assert rep.deleted["archive"] == 1 and not archived.exists()
    assert (store / object_key(_sha(src.read_bytes()))).read_bytes() == src.read_bytes()
    agent.outbox.close()


# -- S3: a real SeaweedFS ------------------------------------------------------------------------------


@pytest.fixture
def s3(s3_store, request):
    bucket = "custody-" + hashlib.sha1(request.node.name.encode()).hexdigest()[:10]
    s3_store.create_bucket(bucket)
    return s3_store, bucket


def _s3_settings(tmp_path, s3, **sync):
    store, bucket = s3
    return _settings(
        tmp_path / "var",
        f"s3://{bucket}/study-7",
        raw_store_endpoint_url=store.endpoint,
        raw_store_region="us-east-1",
        raw_store_access_key_id=store.access_key,
        raw_store_secret_access_key=store.secret_key,
        **sync,
    )


def _get(s3, key: str) -> bytes:
    store, bucket = s3
    return store.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def test_s3_single_and_multipart_uploads_are_verified_by_the_stores_checksums(tmp_path, s3):
    settings = _s3_settings(tmp_path, s3, raw_store_part_mb=5)
    small, big = os.urandom(200_000), os.urandom(12 * MIB)
    _archive(settings, "small.fit", small)
    _archive(settings, "big.fit", big)
    with Outbox(settings.outbox_path) as ob:
        rep = Custody(settings, ob).run()
    assert rep.delivered == 2 and not rep.failed and rep.parts_sent == 1 + 3
    rows = _rows(settings)
    big_row, small_row = rows["2026-12-01/big.fit"], rows["2026-12-01/small.fit"]
    # SeaweedFS 4.48 returns both an MD5 multipart ETag and a composite ChecksumSHA256: both compared
    assert "ETag " in big_row["checksum"] and "-3" in big_row["checksum"] and "ChecksumSHA256" in big_row["checksum"]
    assert "ETag " in small_row["checksum"] and "ChecksumSHA256" in small_row["checksum"]
    key = f"study-7/{object_key(_sha(big))}"
    assert _get(s3, key) == big
    head = s3[0].client().head_object(Bucket=s3[1], Key=key)
    assert head["Metadata"]["sha256"] == _sha(big) and head["Metadata"]["name"] == "big.fit"


_CHILD = """
import sys
from har_edge.agent.outbox import Outbox
from har_edge.agent.settings import load_settings
from har_edge.sync.custody import Custody
settings = load_settings()
with Outbox(settings.outbox_path) as ob:
    Custody(settings, ob).run()
"""


def _env(settings, s3) -> dict[str, str]:
    store = s3[0]
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HAR_EDGE_DATA_DIR": str(settings.data_dir),
        "HAR_EDGE_SYNC__RAW_STORE": settings.sync.raw_store,
        "HAR_EDGE_SYNC__RAW_STORE_ENDPOINT_URL": store.endpoint,
        "HAR_EDGE_SYNC__RAW_STORE_REGION": "us-east-1",
        "HAR_EDGE_SYNC__RAW_STORE_ACCESS_KEY_ID": store.access_key,
        "HAR_EDGE_SYNC__RAW_STORE_SECRET_ACCESS_KEY": store.secret_key,
    }


def test_s3_upload_killed_with_sigkill_resumes_where_it_stopped(tmp_path, s3):
    settings = _s3_settings(tmp_path, s3)  # 8 MiB parts: 15 for a day's 123 MB export
    data = os.urandom(123 * 1_000_000)
    n = -(-len(data) // (8 * MIB))
    _archive(settings, "day.fit", data)
    Outbox(settings.outbox_path).close()
    child = subprocess.Popen([sys.executable, "-c", _CHILD], env=_env(settings, s3), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        done = 0
        while time.monotonic() < deadline and child.poll() is None:
            row = _rows(settings).get("2026-12-01/day.fit") if settings.outbox_path.exists() else None
            done = len(json.loads(row["parts_json"])) if row and row["parts_json"] else 0
            if done >= 4:
                os.killpg(child.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        child.wait(30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == -signal.SIGKILL, "the upload finished before it could be killed"
    row = _rows(settings)["2026-12-01/day.fit"]
    assert row["state"] == "uploading" and row["upload_id"] and 4 <= len(json.loads(row["parts_json"])) < n
    upload_id = row["upload_id"]

    with Outbox(settings.outbox_path) as ob:
        rep = Custody(settings, ob).run()
    assert rep.delivered == 1 and not rep.failed
    # the parts the store held were not sent again (a part in flight at the kill may be)
    assert rep.parts_sent <= n - 4 and rep.bytes_sent <= len(data) - 4 * 8 * MIB
    row = _rows(settings)["2026-12-01/day.fit"]
    assert row["state"] == "delivered" and row["upload_id"] is None and f"-{n}" in row["checksum"]
    assert _sha(_get(s3, f"study-7/{object_key(_sha(data))}")) == _sha(data)
    print(f"resumed upload {upload_id[:12]}…: {rep.parts_sent} of {n} parts, {rep.bytes_sent / 1e6:.0f} MB sent")


def test_s3_a_file_damaged_during_its_upload_is_detected_and_never_delivered(tmp_path, s3):
    settings = _s3_settings(tmp_path, s3, raw_store_part_mb=5)
    data = bytearray(os.urandom(17 * MIB))  # 4 parts
    path = _archive(settings, "d.fit", bytes(data))
    store, bucket = s3
    with Outbox(settings.outbox_path) as ob:
        c = Custody(settings, ob)
        stop = threading.Event()
        real_save = c._save

        def save_then_stop(item):
            real_save(item)
            if len(item.parts) >= 3:
                stop.set()

        c._save = save_then_stop  # the pass stops (as on SIGTERM) with 3 parts in the store
        assert c.run(stop).delivered == 0
        row = _rows(settings)["2026-12-01/d.fit"]
        assert row["state"] == "uploading" and len(json.loads(row["parts_json"])) == 3
        # bit rot in part 1 of the archived file, size and mtime unchanged
        st = path.stat()
        data[1000] ^= 0xFF
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

        rep = Custody(settings, ob).run()
        assert rep.delivered == 0 and len(rep.failed) == 1 and "changed since it was hashed" in rep.failed[0]
        assert rep.parts_sent == 2  # part 1 (its MD5 no longer the one the store holds) and part 4
        old_key = f"study-7/{object_key(row['sha256'])}"
        with pytest.raises(Exception, match=r"NoSuchKey|Not Found|404"):
            store.client().head_object(Bucket=bucket, Key=old_key)  # never completed under the old name
        with pytest.raises(Exception, match="NoSuchUpload"):
            store.client().list_parts(Bucket=bucket, Key=old_key, UploadId=row["upload_id"])  # aborted
        assert not custody_delivered(ob, settings.archive_dir, path, settings.sync.raw_store)

        rep = Custody(settings, ob).run()  # hashed again: the bytes as they are now, under their own name
        assert rep.hashed == 1 and rep.delivered == 1 and rep.parts_sent == 4 and not rep.failed
    assert _get(s3, f"study-7/{object_key(_sha(bytes(data)))}") == bytes(data)


def test_s3_an_object_whose_bytes_differ_from_its_metadata_is_replaced(tmp_path, s3):
    settings = _s3_settings(tmp_path, s3)
    data = os.urandom(100_000)
    _archive(settings, "x.fit", data)
    store, bucket = s3
    key = f"study-7/{object_key(_sha(data))}"
    store.client().put_object(Bucket=bucket, Key=key, Body=os.urandom(len(data)), Metadata={"sha256": _sha(data)})
    with Outbox(settings.outbox_path) as ob:
        c = Custody(settings, ob)
        rep = c.run()
        assert rep.already_there == 0 and rep.delivered == 1 and rep.bytes_sent == len(data)
        assert _get(s3, key) == data
        # and a delivered object damaged later fails the same comparison
        store.client().put_object(Bucket=bucket, Key=key, Body=os.urandom(len(data)), Metadata={"sha256": _sha(data)})
        s3store = c.store
        assert isinstance(s3store, S3Store)
        item = c._item(settings.archive_dir / "2026-12-01" / "x.fit", _rows(settings)["2026-12-01/x.fit"])
        assert s3store.present(item) is None


def test_an_unreachable_store_is_a_recorded_failure_with_back_off_and_no_secret_in_the_log(tmp_path, caplog):
    from conftest import free_port

    settings = _settings(
        tmp_path / "var",
        "s3://bucket/p",
        raw_store_endpoint_url=f"http://127.0.0.1:{free_port()}",
        raw_store_access_key_id="AKIDSECRETLOOKING",
        raw_store_secret_access_key="s3cr3t-never-logged",
        request_timeout_s=1,
    )
    _archive(settings, "a.fit", os.urandom(1000))
    assert "s3cr3t" not in repr(settings)
    daemon = SyncDaemon(settings)
    with caplog.at_level(logging.DEBUG):
        result = record(daemon.outbox, "custody", daemon.custody_job(1e9))
    assert isinstance(result.error, ServerUnreachable) and result.retry_in_s
    assert not daemon.custody_job(1e9 + 1).ran  # backing off
    con = sqlite3.connect(settings.outbox_path)
    assert con.execute("SELECT count FROM sync_failures WHERE task='custody' AND kind='unreachable'").fetchone() == (1,)
    con.close()
    row = _rows(settings)["2026-12-01/a.fit"]
    assert row["state"] == "pending" and row["attempts"] == 1 and "could not be reached" in row["last_error"]
    assert "s3cr3t-never-logged" not in caplog.text and "s3cr3t-never-logged" not in row["last_error"]
    daemon.outbox.close()


# -- settings, status, heartbeat -------------------------------------------------------------------------


def test_raw_store_settings_are_checked(tmp_path):
    s = load_settings(env={"HAR_EDGE_SYNC__RAW_STORE": "s3://bkt/a/b/"}, data_dir=tmp_path)
    assert s.sync.raw_store == "s3://bkt/a/b" and s.sync.raw_store_part_mb == 8 and s.sync.raw_store_pass_s == 120
    assert load_settings(env={}, data_dir=tmp_path).sync.raw_store is None
    for bad in ("relative/folder", "s3://", "gs://bucket"):
        with pytest.raises(ConfigError, match=r"sync\.raw_store"):
            load_settings(env={"HAR_EDGE_SYNC__RAW_STORE": bad}, data_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"needs agent\.archive = true"):
        load_settings(
            env={"HAR_EDGE_SYNC__RAW_STORE": "/srv/raw", "HAR_EDGE_AGENT__ARCHIVE": "false"}, data_dir=tmp_path
        )
    with pytest.raises(ConfigError, match="raw_store_part_mb"):
        load_settings(env={"HAR_EDGE_SYNC__RAW_STORE_PART_MB": "4"}, data_dir=tmp_path)


def test_status_and_heartbeat_show_the_custody_backlog(tmp_path):
    from har_edge.sync.push import Pusher

    store, settings = _folder_settings(tmp_path)
    _archive(settings, "a.fit", os.urandom(2_000_000))
    _archive(settings, "b.fit", os.urandom(1_000_000))
    with Outbox(settings.outbox_path) as ob:
        assert custody_backlog(ob, settings.archive_dir, str(store)).files == 2
        pusher = Pusher(settings, ob)
        assert pusher.maybe_heartbeat(1e9, force=True)
        points = {k: v for k, v in _device_points(settings)}
        assert points["custody_backlog_files"] == 2 and points["custody_backlog_mb"] == pytest.approx(3.0)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HAR_EDGE_DATA_DIR": str(settings.data_dir),
           "HAR_EDGE_SYNC__RAW_STORE": str(store)}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "har_edge.cli", "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["custody"]["files"] == 2 and st["custody"]["bytes"] == 3_000_000 and st["custody"]["delivered"] == 0
    with Outbox(settings.outbox_path) as ob:
        Custody(settings, ob).run()
    out = subprocess.run([sys.executable, "-m", "har_edge.cli", "status"], env=env, capture_output=True, text=True)
    assert (
        "custody:   0 file(s), 0.0 MB not yet verified" in out.stdout
        and "2 archived file(s) in the store" in out.stdout
    )


def _device_points(settings) -> list[tuple[str, float]]:
    con = sqlite3.connect(settings.outbox_path)
    try:
        return list(con.execute("SELECT key, value FROM metrics WHERE file_id IS NULL"))
    finally:
        con.close()


def test_sync_run_delivers_the_archive_on_its_schedule(tmp_path):
    store, settings = _folder_settings(tmp_path)
    data = os.urandom(3 * MIB)
    _archive(settings, "a.fit", data)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HAR_EDGE_DATA_DIR": str(settings.data_dir),
        "HAR_EDGE_SYNC__RAW_STORE": str(store),
        "HAR_EDGE_SYNC__JITTER_S": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "har_edge.cli", "sync", "run"], env=env, stderr=subprocess.PIPE, text=True
    )
    dest = store / object_key(_sha(data))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not dest.exists() and proc.poll() is None:
            time.sleep(0.2)
        assert dest.exists(), "sync run did not deliver the archived file"
        while time.monotonic() < deadline and _rows(settings)["2026-12-01/a.fit"]["state"] != "delivered":
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert dest.read_bytes() == data and _rows(settings)["2026-12-01/a.fit"]["state"] == "delivered"
    assert "raw custody: archived exports to" in err
    con = sqlite3.connect(settings.outbox_path)
    assert con.execute("SELECT last_success_ms FROM sync_passes WHERE task = 'custody'").fetchone()[0] > 0
    con.close()


def test_a_mismatch_is_a_counted_sync_failure_and_the_next_pass_delivers(tmp_path):
    store, settings = _folder_settings(tmp_path)
    data = os.urandom(100_000)
    _archive(settings, "a.fit", data)
    dest = store / object_key(_sha(data))
    dest.parent.mkdir(parents=True)
    # a partial copy left by an earlier run, complete in size but with other bytes
    dest.with_name(f"{dest.name}.partial-{settings.device}").write_bytes(os.urandom(len(data)))
    daemon = SyncDaemon(settings)
    result = record(daemon.outbox, "custody", daemon.custody_job(1e9))
    assert result.report is not None and len(result.report.failed) == 1 and result.error is not None
    assert result.error.kind == "custody_mismatch" and not dest.exists()
    con = sqlite3.connect(settings.outbox_path)
    count = "SELECT count FROM sync_failures WHERE task = 'custody' AND kind = 'custody_mismatch'"
    assert con.execute(count).fetchone() == (1,)
    result = record(daemon.outbox, "custody", daemon.custody_job(1e9 + 60))  # no back-off for a file's mismatch
    assert result.error is None and result.report is not None and result.report.delivered == 1
    assert dest.read_bytes() == data
    assert con.execute("SELECT last_success_ms FROM sync_passes WHERE task = 'custody'").fetchone()[0] > 0
    con.close()
    daemon.outbox.close()


def _as_if_killed_before_the_delivered_commit(settings, rel: str, upload_id: str | None, bytes_done: int) -> None:
    con = sqlite3.connect(settings.outbox_path)
    con.execute(
        "UPDATE raw_custody SET state = 'uploading', upload_id = ?, bytes_done = ?, delivered_ms = NULL, "
        "checksum = NULL WHERE path = ?",
        (upload_id, bytes_done, rel),
    )
    con.commit()
    con.close()


def test_s3_an_upload_completed_just_before_a_kill_is_not_sent_again(tmp_path, s3):
    settings = _s3_settings(tmp_path, s3, raw_store_part_mb=5)
    data = os.urandom(11 * MIB)
    _archive(settings, "k.fit", data)
    with Outbox(settings.outbox_path) as ob:
        c = Custody(settings, ob)
        ids = []
        real_save = c._save
        c._save = lambda item: (ids.append(item.upload_id), real_save(item))
        assert c.run().delivered == 1
        _as_if_killed_before_the_delivered_commit(settings, "2026-12-01/k.fit", ids[-1], len(data))
        assert not custody_delivered(ob, settings.archive_dir, settings.archive_dir / "2026-12-01/k.fit", c.store.url)
        rep = Custody(settings, ob).run()
    assert rep.delivered == 1 and rep.parts_sent == 0 and rep.bytes_sent == 0
    assert _rows(settings)["2026-12-01/k.fit"]["state"] == "delivered"


def test_folder_a_copy_renamed_just_before_a_kill_is_not_copied_again(tmp_path):
    _, settings = _folder_settings(tmp_path)
    data = os.urandom(300_000)
    _archive(settings, "k.fit", data)
    with Outbox(settings.outbox_path) as ob:
        assert Custody(settings, ob).run().delivered == 1
        _as_if_killed_before_the_delivered_commit(settings, "2026-12-01/k.fit", None, len(data))
        rep = Custody(settings, ob).run()
    assert rep.delivered == 1 and rep.bytes_sent == 0

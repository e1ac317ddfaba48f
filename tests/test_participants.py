"""Participants: the watch in every row, mapping and folder layout, keyed pseudonyms, per-participant views, erasure.

Real FIT exports written with the garmin-fit-sdk encoder (tests/fitgen.py) with distinct serials, the real
agent and sync (in process and as daemons), and the session's real MLflow server.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fitgen import write_imu_fit
from sync_helpers import restore_mlflow_env  # noqa: F401 - autouse fixture

from har_edge.agent.daemon import Agent
from har_edge.agent.errors import ConfigError
from har_edge.agent.forget import forget, honour, withheld
from har_edge.agent.identity import Identities, read_mapping
from har_edge.agent.outbox import Outbox
from har_edge.agent.pseudonym import SECRET_NAME, participant_pseudonym, watch_pseudonym
from har_edge.agent.settings import load_settings
from har_edge.agent.watch import Watch

START = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
SECRET = "study-secret-0123456789abcdef"
#: distinctive serials: a raw serial found anywhere it must not be is found by a plain text search
SERIALS = {"alice": 3987650001, "bob": 3987650002, "carol": 3987650003}


def _fit(path: Path, serial: int, *, seconds: float = 40, seed: int = 0) -> Path:
    """A real IMU FIT export whose file_id and device_info name the watch ``serial`` (firmware 12.5)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_imu_fit(
        path,
        seconds=seconds,
        seed=seed,
        start=START,
        extra_messages=True,
        preamble_fields={0: {"serial_number": serial}, 23: {"serial_number": serial}},
    )
    return path


def _settings(data_dir: Path, **participants):
    participants.setdefault("secret", SECRET)
    return load_settings(env={}, data_dir=data_dir, agent={"settle_s": 0.0}, participants=participants)


def _drop(data_dir: Path, src: Path, rel: str) -> Path:
    dest = data_dir / "inbox" / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dest.with_name("." + dest.name + ".part"))
    os.rename(dest.with_name("." + dest.name + ".part"), dest)
    return dest


def _rows(ob: Outbox) -> list:
    with ob.engine.connect() as c:
        return list(c.exec_driver_sql("SELECT * FROM files ORDER BY id").mappings().all())


def _run_agent(settings, rounds: int = 6) -> Agent:
    agent = Agent(settings)
    for _ in range(rounds):
        agent.step(time.monotonic() + 3600)
    return agent


@pytest.fixture(scope="module")
def fits(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fits")
    return {who: _fit(root / f"{who}.fit", serial, seed=i) for i, (who, serial) in enumerate(SERIALS.items())}


# -- identity -------------------------------------------------------------------------------------------


def test_every_row_carries_the_watch_and_a_pseudonymous_participant(tmp_path, fits):
    s = _settings(tmp_path / "var")
    _drop(s.data_dir, fits["alice"], "alice.fit")
    agent = _run_agent(s)
    (row,) = _rows(agent.outbox)
    assert row["status"] == "processed"
    assert (row["watch_manufacturer"], row["watch_product"], row["watch_serial"], row["watch_firmware"]) == (
        "garmin",
        "fr945",
        str(SERIALS["alice"]),
        "12.5",
    )
    secret = SECRET.encode()
    assert row["watch_pseudonym"] == watch_pseudonym(secret, str(SERIALS["alice"]))
    assert row["participant"] == participant_pseudonym(secret, str(SERIALS["alice"]))
    assert row["participant_source"] == "pseudonym"
    assert row["participant"].startswith("p-") and str(SERIALS["alice"]) not in row["participant"]


def test_the_study_mapping_assigns_participants_csv_and_toml(tmp_path, fits):
    csv_map = tmp_path / "map.csv"
    csv_map.write_text(f"serial,participant\n{SERIALS['alice']},P01\n{SERIALS['bob']},P02\n", encoding="utf-8")
    toml_map = tmp_path / "map.toml"
    toml_map.write_text(f'[serials]\n"{SERIALS["alice"]}" = "S-A"\n"{SERIALS["bob"]}" = "S-B"\n', encoding="utf-8")
    for mapping, expected in ((csv_map, {"P01", "P02"}), (toml_map, {"S-A", "S-B"})):
        s = _settings(tmp_path / f"var-{mapping.suffix[1:]}", mapping=mapping)
        for who in ("alice", "bob", "carol"):
            _drop(s.data_dir, fits[who], f"{who}.fit")
        rows = {r["name"]: r for r in _rows(_run_agent(s).outbox)}
        assert {rows["alice.fit"]["participant"], rows["bob.fit"]["participant"]} == expected
        assert rows["alice.fit"]["participant_source"] == "mapping"
        # a watch the study did not map: its pseudonym
        assert rows["carol.fit"]["participant"] == participant_pseudonym(SECRET.encode(), str(SERIALS["carol"]))


def test_a_bad_mapping_is_refused_naming_the_row(tmp_path):
    bad = tmp_path / "map.csv"
    bad.write_text("serial,participant\n1,P01\n2,has space\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"map.csv: row 3: participant id 'has space'"):
        read_mapping(bad)
    bad.write_text("watch,who\n1,P01\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="needs a serial column"):
        read_mapping(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        Agent(_settings(tmp_path / "var", mapping=tmp_path / "missing.csv"))


def test_folder_layout_assigns_participants_and_beats_the_mapping(tmp_path, fits):
    mapping = tmp_path / "map.csv"
    mapping.write_text(f"serial,participant\n{SERIALS['alice']},P01\n", encoding="utf-8")
    s = _settings(tmp_path / "var", mapping=mapping)
    _drop(s.data_dir, fits["alice"], "P07/a.fit")
    _drop(s.data_dir, fits["bob"], "P08/a.fit")  # the same name in two participants' folders
    _drop(s.data_dir, fits["carol"], "carol.fit")
    bad = s.data_dir / "inbox" / "P08" / "broken.fit"
    bad.write_bytes(fits["carol"].read_bytes()[:3000])  # truncated: quarantined after the stale time
    agent = Agent(s)
    agent.folder.stale_s = 0.0
    for _ in range(6):
        agent.step(time.monotonic() + 3600)
    rows = _rows(agent.outbox)
    got = {(r["participant"], r["participant_source"]) for r in rows if r["status"] == "processed"}
    pseudo = participant_pseudonym(SECRET.encode(), str(SERIALS["carol"]))
    assert got == {("P07", "folder"), ("P08", "folder"), (pseudo, "pseudonym")}
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["name"], r["participant"]) for r in failed] == [("broken.fit", "P08")]
    day = next((s.data_dir / "archive").iterdir())
    assert (day / "P07" / "a.fit").is_file() and (day / "P08" / "a.fit").is_file() and (day / "carol.fit").is_file()
    assert (s.data_dir / "quarantine" / "P08" / "broken.fit").is_file()
    assert (s.data_dir / "quarantine" / "P08" / "broken.fit.reason.json").is_file()
    assert not list((s.data_dir / "work").rglob("*.fit"))
    # replay puts it back into its participant's folder
    assert agent.folder.replay() == [s.data_dir / "inbox" / "P08" / "broken.fit"]


def test_study_table_pairs_pair_within_a_participant_folder(tmp_path):
    from har_edge.agent.watcher import DropFolder

    d = DropFolder(tmp_path / "var", settle_s=0.0)
    for who in ("P01", "P02"):
        for sensor in ("accelerometer", "gyroscope"):
            p = d.inbox / who / f"rec_{sensor}.csv"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("timestamp,x,y,z\n1,2,3,4\n", encoding="utf-8")
    d.ready(0.0)
    groups = d.ready(100.0)
    assert sorted(sorted(p.relative_to(d.inbox).as_posix() for p in g) for g in groups) == [
        ["P01/rec_accelerometer.csv", "P01/rec_gyroscope.csv"],
        ["P02/rec_accelerometer.csv", "P02/rec_gyroscope.csv"],
    ]
    claimed = d.claim(groups[0])
    assert claimed is not None and all(p.parent.parent == d.work for p in claimed)
    assert [sorted(p.name for p in g) for g in d.leftovers()] == [["rec_accelerometer.csv", "rec_gyroscope.csv"]]


# -- pseudonyms -------------------------------------------------------------------------------------------


def test_pseudonyms_are_stable_under_one_secret_and_change_under_another(tmp_path):
    watch = Watch("garmin", "fr945", "3987650001", "12.5")
    a1 = Identities(_settings(tmp_path / "a1", secret="first-secret-of-the-study")).assign(watch)
    a2 = Identities(_settings(tmp_path / "a2", secret="first-secret-of-the-study")).assign(watch)
    b = Identities(_settings(tmp_path / "b", secret="second-secret-of-another")).assign(watch)
    assert a1 == a2 and a1.participant and a1.watch_pseudonym
    assert b.participant != a1.participant and b.watch_pseudonym != a1.watch_pseudonym
    other = Identities(_settings(tmp_path / "a1", secret="first-secret-of-the-study")).assign(
        Watch(serial="3987650002")
    )
    assert other.participant != a1.participant


def test_without_a_secret_one_is_generated_0600_and_kept(tmp_path, caplog):
    data = tmp_path / "var"
    s = load_settings(env={}, data_dir=data)
    with caplog.at_level(logging.DEBUG):
        first = Identities(s).assign(Watch(serial="3987650001"))
    secret_file = data / SECRET_NAME
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = secret_file.read_text().strip()
    assert len(secret) == 64 and secret not in caplog.text and "generated one" in caplog.text
    assert Identities(load_settings(env={}, data_dir=data)).assign(Watch(serial="3987650001")) == first
    # from a file the study gives, and from the environment
    given = tmp_path / "study.secret"
    given.write_text(SECRET + "\n")
    from_file = Identities(load_settings(env={}, data_dir=data, participants={"secret_file": given}))
    from_env = Identities(load_settings(env={"HAR_EDGE_PARTICIPANTS__SECRET": SECRET}, data_dir=data))
    w = Watch(serial="3987650001")
    assert from_file.assign(w) == from_env.assign(w) != first
    with pytest.raises(ConfigError, match="does not exist"):
        _ = Identities(load_settings(env={}, data_dir=data, participants={"secret_file": tmp_path / "nope"})).secret
    with pytest.raises(ConfigError, match="fewer than 16"):
        _ = Identities(load_settings(env={}, data_dir=data, participants={"secret": "short"})).secret
    assert "short" not in repr(load_settings(env={}, data_dir=data, participants={"secret": "short"}))


def test_the_raw_serial_and_the_secret_appear_in_no_log(tmp_path, fits, caplog):
    s = _settings(tmp_path / "var")
    with caplog.at_level(logging.DEBUG):
        for who in SERIALS:
            _drop(s.data_dir, fits[who], f"{who}.fit")
        _drop(s.data_dir, fits["alice"], "P01/dup.fit")  # a duplicate in a participant folder
        agent = _run_agent(s)
        with Outbox(s.outbox_path) as ob:
            forget(s, ob, "P01", wait_s=0)
    assert len(_rows(agent.outbox)) == 3
    text = caplog.text
    assert text  # the agent did log
    for serial in SERIALS.values():
        assert str(serial) not in text
    assert SECRET not in text


# -- views ------------------------------------------------------------------------------------------------


def test_participants_and_status_filter_by_participant(tmp_path, fits):
    s = _settings(tmp_path / "var")
    _drop(s.data_dir, fits["alice"], "P01/a.fit")
    _drop(s.data_dir, fits["bob"], "P01/b.fit")
    _drop(s.data_dir, fits["carol"], "P02/c.fit")
    (s.data_dir / "inbox" / "P02" / "junk.fit").write_bytes(b"not a fit file at all")
    _run_agent(s)
    env = dict(os.environ, HAR_EDGE_DATA_DIR=str(s.data_dir), HAR_EDGE_PARTICIPANTS__SECRET=SECRET)

    def cli(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "har_edge.cli", *args], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    listed = {p["participant"]: p for p in json.loads(cli("participants", "--json"))}
    assert set(listed) == {"P01", "P02"}
    assert (listed["P01"]["files"], listed["P01"]["processed"], listed["P01"]["watches"]) == (2, 2, 2)
    assert (listed["P02"]["files"], listed["P02"]["failed"]) == (2, 1)
    assert listed["P01"]["windows"] > 0 and listed["P01"]["delivery"] == "pending"
    assert listed["P01"]["last_seen_ms"] > 0
    table = cli("participants")
    assert "P01" in table and "P02" in table and str(SERIALS["alice"]) not in table
    st = json.loads(cli("status", "--json", "--participant", "P01"))
    assert st["files"] == {"processed": 2} and {f["name"] for f in st["recent_files"]} == {"a.fit", "b.fit"}
    assert st["windows_pending_delivery"] == listed["P01"]["windows"]
    assert "participant: P02" in cli("status", "--participant", "P02")


# -- erasure (on the device) -----------------------------------------------------------------------------


def _mentions(root: Path, needles: list[str]) -> list[str]:
    """Files under ``root`` whose path or bytes hold one of the needles (the generated secret file excepted)."""
    found = []
    for p in root.rglob("*"):
        if p.name == SECRET_NAME:
            continue
        if any(n in str(p.relative_to(root)) for n in needles):
            found.append(str(p))
        elif p.is_file():
            data = p.read_bytes()
            found += [f"{p}: {n}" for n in needles if n.encode() in data]
    return found


def test_forget_erases_the_participant_from_outbox_and_data_dir_and_is_idempotent(tmp_path, fits):
    s = _settings(tmp_path / "var")
    _drop(s.data_dir, fits["alice"], "P01/a.fit")
    _drop(s.data_dir, fits["bob"], "P02/b.fit")
    _drop(s.data_dir, fits["carol"], "carol.fit")  # flat, a pseudonym participant
    (s.data_dir / "inbox" / "P01" / "junk.fit").write_bytes(b"junk that is no FIT")
    agent = _run_agent(s)
    carol = participant_pseudonym(SECRET.encode(), str(SERIALS["carol"]))
    carol_watch = watch_pseudonym(SECRET.encode(), str(SERIALS["carol"]))
    assert {r["participant"] for r in _rows(agent.outbox)} == {"P01", "P02", carol}
    waiting = _drop(s.data_dir, fits["alice"], "P01/later.fit")  # not taken yet: erased from the inbox too
    agent.outbox.record_retrain_request(
        json.dumps([{"file_id": r["id"], "name": r["name"]} for r in _rows(agent.outbox)])
    )

    with Outbox(s.outbox_path) as ob:
        rep = forget(s, ob, "P01", wait_s=0)
        rep2 = forget(s, ob, carol, wait_s=0)
    assert rep.outbox["files"] == 2 and rep.outbox["windows"] > 0 and rep.outbox["metric_points"] > 0
    assert rep.outbox["retrain_entries"] == 2
    assert len(rep.archive) == 1 and rep.quarantine == ["quarantine/P01/junk.fit"]
    assert rep.inbox == ["inbox/P01/later.fit"] and not waiting.exists()
    assert rep2.outbox["files"] == 1 and rep2.archive and rep2.archive[0].endswith("/carol.fit")
    assert not rep.request_open and "participant P01:" in "\n".join(rep.lines())

    rows = _rows(agent.outbox)
    assert {r["participant"] for r in rows} == {"P02"}
    with agent.outbox.engine.connect() as c:
        ids = {r["id"] for r in rows}
        for table in ("windows", "labels", "metrics"):
            left = {x for (x,) in c.exec_driver_sql(f"SELECT DISTINCT file_id FROM {table} WHERE file_id IS NOT NULL")}
            assert left <= ids, table
        assert c.exec_driver_sql("SELECT count(*) FROM forget_requests").scalar() == 0
        assert "P01" not in c.exec_driver_sql("SELECT files_json FROM retrain_requests").scalar()
    agent.outbox.close()
    needles = ["P01", carol, carol_watch, str(SERIALS["alice"]), str(SERIALS["carol"])]
    assert _mentions(s.data_dir, needles) == []
    assert list((s.data_dir / "archive").rglob("b.fit"))  # the other participant keeps theirs

    with Outbox(s.outbox_path) as ob:  # again: nothing more to remove
        again = forget(s, ob, "P01", wait_s=0)
    assert again.outbox == {} and again.archive == again.quarantine == again.inbox == []


def test_a_file_in_flight_is_finished_then_forgotten_and_never_pushed(tmp_path, fits):
    import threading

    s = _settings(tmp_path / "var")
    _drop(s.data_dir, fits["alice"], "P01/a.fit")
    agent = Agent(s)
    decoding, go_on = threading.Event(), threading.Event()
    on_stage = agent.processor.on_stage

    def slow_stage(stage: str, progress: int) -> None:  # the agent is held in its decode stage
        if on_stage is not None:
            on_stage(stage, progress)
        if stage == "decode" and not go_on.is_set():
            decoding.set()
            go_on.wait(30)

    agent.processor.on_stage = slow_stage
    seen: list[bool] = []
    real_done = agent.folder.done

    def spy(group):  # stored, covered by the request while it is moved: sync would skip it
        seen.append(withheld(agent.outbox, _rows(agent.outbox)[0]["id"]))
        real_done(group)

    agent.folder.done = spy  # type: ignore[method-assign]
    worker = threading.Thread(target=agent.step, args=(time.monotonic() + 3600,))
    worker.start()
    try:
        assert decoding.wait(30)
        with Outbox(s.outbox_path) as ob:
            rep = forget(s, ob, "P01", wait_s=0.3)
        assert rep.request_open and rep.in_flight == 1 and rep.outbox == {}
        assert "the agent erases them" in "\n".join(rep.lines())
    finally:
        go_on.set()
        worker.join(60)
    # the agent finished it (stored, archived) and at once erased it
    assert seen == [True]
    assert _rows(agent.outbox) == []
    assert not list((s.data_dir / "archive").rglob("a.fit"))
    with agent.outbox.engine.connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM forget_requests").scalar() == 0
    # files received after the request are new data: kept
    _drop(s.data_dir, fits["alice"], "P01/new.fit")
    agent.folder.done = real_done  # type: ignore[method-assign]
    for _ in range(3):
        agent.step(time.monotonic() + 3600)
    assert [r["name"] for r in _rows(agent.outbox)] == ["new.fit"]
    assert honour(s, agent.outbox) == 0


# -- the server --------------------------------------------------------------------------------------------


def _server_settings(data_dir: Path, uri: str, **participants):
    participants.setdefault("secret", SECRET)
    return load_settings(
        env={},
        data_dir=data_dir,
        device_id=f"dev-{uuid.uuid4().hex[:6]}",
        agent={"settle_s": 0.0},
        participants=participants,
        sync={"tracking_uri": uri, "experiment": f"part-{uuid.uuid4().hex[:8]}", "request_timeout_s": 30},
    )


def _all_fields(client, experiment_id: str) -> tuple[list, str]:
    """Every run of the experiment (deleted ones too) and all their tags, params and metric keys as one text."""
    from mlflow.entities import ViewType

    found = client.search_runs([experiment_id], "", run_view_type=ViewType.ALL, max_results=1000)
    parts = []
    for r in found:
        parts += [f"{k}={v}" for k, v in r.data.tags.items()]
        parts += [f"{k}={v}" for k, v in r.data.params.items()]
        parts += list(r.data.metrics)
        parts.append(r.info.run_name or "")
    return found, "\n".join(parts)


@pytest.mark.server
def test_runs_are_tagged_with_participant_and_watch_pseudonym_and_the_serial_only_when_asked(
    mlflow_server, tmp_path, fits
):
    from mlflow.tracking import MlflowClient

    from har_edge.sync.push import Pusher

    client = MlflowClient(mlflow_server.url)
    for share in (False, True):
        s = _server_settings(tmp_path / f"var-{share}", mlflow_server.url, share_serial=share)
        _drop(s.data_dir, fits["alice"], "P01/a.fit")
        _drop(s.data_dir, fits["bob"], "b.fit")
        agent = _run_agent(s)
        Pusher(s, agent.outbox).push(time.time())
        exp = client.get_experiment_by_name(s.sync.experiment)
        found, text = _all_fields(client, exp.experiment_id)
        file_runs = [r for r in found if r.data.tags.get("har.kind") == "file"]
        tags = {r.data.tags["har.file_name"]: r.data.tags for r in file_runs}
        assert tags["a.fit"]["har.participant"] == "P01"
        assert tags["a.fit"]["har.watch"] == watch_pseudonym(SECRET.encode(), str(SERIALS["alice"]))
        assert tags["b.fit"]["har.participant"] == participant_pseudonym(SECRET.encode(), str(SERIALS["bob"]))
        assert tags["a.fit"]["har.watch_firmware"] == "12.5"
        for who in ("alice", "bob"):
            assert (str(SERIALS[who]) in text) is share
        if share:
            assert tags["a.fit"]["har.watch_serial"] == str(SERIALS["alice"])


@pytest.mark.server
def test_forget_deletes_the_participants_runs_and_gc_purges_them(mlflow_server, tmp_path, fits):
    """File runs, the participant's daily run and the raw exports in custody go; the other participant's stay."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from har_edge.sync.custody import Custody
    from har_edge.sync.forget import erase_participant_remote
    from har_edge.sync.push import Pusher

    store = tmp_path / "raw-store"
    store.mkdir()
    s = _server_settings(tmp_path / "var", mlflow_server.url)
    s = s.model_copy(update={"sync": s.sync.model_copy(update={"raw_store": str(store)})})
    _drop(s.data_dir, fits["alice"], "P01/a.fit")
    _drop(s.data_dir, fits["carol"], "P01/c.fit")
    _drop(s.data_dir, fits["bob"], "P02/b.fit")
    agent = _run_agent(s)
    Pusher(s, agent.outbox).push(time.time())
    assert Custody(s, agent.outbox).run().delivered == 3
    stored = sorted(p.name for p in store.rglob("*") if p.is_file() and p.suffix != ".json")
    assert len(stored) == 3
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name(s.sync.experiment).experiment_id
    dailies = client.search_runs([exp], "tags.`har.kind` = 'daily'")
    assert sorted(r.data.tags["har.daily.value"] for r in dailies if r.data.tags["har.daily.key"] == "participant") == [
        "P01",
        "P02",
    ]
    with Outbox(s.outbox_path) as ob:
        rep = forget(s, ob, "P01", server=lambda p, shas: erase_participant_remote(s, p, shas), wait_s=0)
    assert rep.server["runs_deleted"] == 3 and not rep.server["purged"]  # two file runs and the daily run
    assert rep.server["raw_store"]["exports_erased"] == 2
    left = sorted(p.name for p in store.rglob("*") if p.is_file() and p.suffix != ".json")
    assert len(left) == 1 and left[0] in stored
    assert any("2 raw exports erased" in line for line in rep.lines())
    active = client.search_runs([exp], "tags.`har.participant` = 'P01'")
    assert active == []
    deleted = client.search_runs([exp], "tags.`har.participant` = 'P01'", run_view_type=ViewType.DELETED_ONLY)
    assert {r.info.run_id for r in deleted} == set(rep.server["run_ids"])
    assert [r.data.tags["har.participant"] for r in client.search_runs([exp], "tags.`har.kind` = 'file'")] == ["P02"]
    with Outbox(s.outbox_path) as ob, ob.engine.connect() as c:  # the device's daily pages: drawn again, without
        assert c.exec_driver_sql("SELECT count(*) FROM files WHERE daily_ms IS NULL").scalar() == 1
    # idempotent: nothing more to delete
    with Outbox(s.outbox_path) as ob:
        assert (
            forget(s, ob, "P01", server=lambda p, shas: erase_participant_remote(s, p, shas), wait_s=0).server[
                "runs_deleted"
            ]
            == 0
        )
    # the operator's purge on the server (docs/privacy.md): afterwards the store holds nothing of them
    db = mlflow_server.root / "mlflow.db"
    r = subprocess.run(
        [sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", f"sqlite:///{db}",
         "--tracking-uri", mlflow_server.url, "--run-ids", ",".join(rep.server["run_ids"])],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0 and "permanently deleted" in r.stdout, r.stderr + r.stdout
    con = sqlite3.connect(db)
    try:
        ids = rep.server["run_ids"]
        marks = ",".join("?" * len(ids))
        assert con.execute(f"SELECT count(*) FROM runs WHERE run_uuid IN ({marks})", ids).fetchone()[0] == 0
        assert con.execute(f"SELECT count(*) FROM tags WHERE run_uuid IN ({marks})", ids).fetchone()[0] == 0
        assert con.execute(f"SELECT count(*) FROM metrics WHERE run_uuid IN ({marks})", ids).fetchone()[0] == 0
    finally:
        con.close()


@pytest.mark.server
@pytest.mark.slow
def test_erasure_holds_while_the_agent_and_sync_daemons_run(mlflow_server, tmp_path, fits, fixture_cache):
    """Real `agent run` and `sync run`; P01 files keep arriving, one is in flight (a long file) when forget runs."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    # 3 hours: several seconds of processing, so the file is in flight while forget runs
    long_fit = fixture_cache / "participants-3h-3987650001.fit"
    if not long_fit.exists():
        _fit(long_fit, SERIALS["alice"], seconds=3 * 3600, seed=7)
    drops = tmp_path / "drops"
    own = {f"{who}{i}": _fit(drops / f"{who}{i}.fit", SERIALS[who], seed=20 + 3 * i + k)
           for i in range(4) for k, who in enumerate(("alice", "bob", "carol"))}  # fmt: skip
    data = tmp_path / "var"
    experiment = f"part-{uuid.uuid4().hex[:8]}"
    env = dict(
        os.environ,
        HAR_EDGE_DATA_DIR=str(data),
        HAR_EDGE_DEVICE_ID=f"dev-{uuid.uuid4().hex[:6]}",
        HAR_EDGE_AGENT__SETTLE_S="0.2",
        HAR_EDGE_PARTICIPANTS__SECRET=SECRET,
        HAR_EDGE_SYNC__TRACKING_URI=mlflow_server.url,
        HAR_EDGE_SYNC__EXPERIMENT=experiment,
        HAR_EDGE_SYNC__PUSH_INTERVAL_S="1",
        HAR_EDGE_SYNC__JITTER_S="0",
        HAR_EDGE_SYNC__REQUEST_TIMEOUT_S="30",
        HAR_EDGE_LOG_FILE="{command}.log",
    )
    data.mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-m", "har_edge.cli", cmd, "run"], env=env, stderr=subprocess.DEVNULL)
        for cmd in ("agent", "sync")
    ]
    client = MlflowClient(mlflow_server.url)

    def file_runs(view=ViewType.ACTIVE_ONLY) -> list:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], "tags.`har.kind` = 'file'", run_view_type=view)

    def wait(pred, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            time.sleep(0.2)
        return False

    try:
        assert wait(lambda: (data / "inbox").is_dir(), 60)
        for i in range(3):
            _drop(data, own[f"alice{i}"] if i != 1 else own[f"carol{i}"], f"P01/a{i}.fit")
            _drop(data, own[f"bob{i}"], f"P02/b{i}.fit")
            time.sleep(0.3)
        # everything delivered (P01's results are on the server), so sync's passes are short again
        assert wait(lambda: len([x for x in file_runs() if x.info.status == "FINISHED"]) == 6, 120)
        _drop(data, long_fit, "P01/long.fit")

        def in_flight() -> int:
            con = sqlite3.connect(data / "outbox.sqlite", timeout=30)
            try:
                return con.execute("SELECT count(*) FROM attempts").fetchone()[0]
            finally:
                con.close()

        def requests() -> int:
            con = sqlite3.connect(data / "outbox.sqlite", timeout=30)
            try:
                return con.execute("SELECT count(*) FROM forget_requests").fetchone()[0]
            finally:
                con.close()

        # the agent is held (SIGSTOP) with long.fit in work/ until forget has asked: it is in flight for sure
        assert wait(lambda: (data / "work" / "P01" / "long.fit").exists() and in_flight() == 1, 60)

        def stop_outside_a_write() -> None:
            """SIGSTOP the agent, but not inside one of its (short) outbox commits: a process frozen while it
            holds the write lock would block every writer, which no real agent does for long."""
            for _ in range(100):
                procs[0].send_signal(signal.SIGSTOP)
                con = sqlite3.connect(data / "outbox.sqlite", timeout=0.2)
                try:
                    con.execute("BEGIN IMMEDIATE")
                    con.rollback()
                    return
                except sqlite3.OperationalError:
                    procs[0].send_signal(signal.SIGCONT)
                    time.sleep(0.05)
                finally:
                    con.close()
            raise AssertionError("the agent held the outbox's write lock at every one of 100 tries")

        stop_outside_a_write()
        assert in_flight() == 1 and (data / "work" / "P01" / "long.fit").exists()
        fg = subprocess.Popen(
            [sys.executable, "-m", "har_edge.cli", "forget", "P01", "--json", "--wait", "120"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert wait(lambda: requests() == 1, 120)
        finally:
            procs[0].send_signal(signal.SIGCONT)
        out, err = fg.communicate(timeout=400)
        assert fg.returncode == 0, err + out
        r = subprocess.CompletedProcess(fg.args, fg.returncode, out, err)
        report = json.loads(r.stdout)
        assert report["participant"] == "P01" and not report["request_open"]
        assert report["outbox"]["files"] >= 4 and report["server"]["runs_deleted"] >= 2
        assert "P01/long.fit" in " ".join(report["archive"])
        assert report["finished_in_flight"] == 1  # long.fit: in work/ when asked, finished, then erased
        # P02 goes on: later files are still processed and delivered
        _drop(data, own["bob3"], "P02/late.fit")
        assert wait(lambda: any(x.data.tags.get("har.file_name") == "late.fit" for x in file_runs()), 120)
        time.sleep(3)  # a few more sync passes: nothing of P01 may come back
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
    assert [p.returncode for p in procs] == [0, 0]
    assert all(x.data.tags["har.participant"] == "P02" for x in file_runs())
    p01 = [x for x in file_runs(ViewType.ALL) if x.data.tags.get("har.participant") == "P01"]
    assert p01 and all(x.info.lifecycle_stage == "deleted" for x in p01)
    assert {x.info.run_id for x in p01} <= set(report["server"]["run_ids"])
    with Outbox(data / "outbox.sqlite") as ob:
        rows = _rows(ob)
        with ob.engine.connect() as c:
            assert c.exec_driver_sql("SELECT count(*) FROM forget_requests").scalar() == 0
    assert rows and {r["participant"] for r in rows} == {"P02"}
    assert all(r["finished_ms"] for r in rows if r["status"] == "processed")
    needles = ["P01", str(SERIALS["alice"]), str(SERIALS["carol"])]
    needles += [watch_pseudonym(SECRET.encode(), str(SERIALS[w])) for w in ("alice", "carol")]
    assert _mentions(data, needles) == []


def test_a_fitcsv_export_names_its_watch_too(tmp_path):
    """FitCSVTool -b rows: file_id and device_info give manufacturer, product, serial and firmware."""
    import csv

    from har_edge.agent.decode.tables import decode_fitcsv
    from har_edge.agent.watch import watch_of

    head = ["Type", "Local Number", "Message"] + [f"{k} {i}" for i in range(1, 7) for k in ("Field", "Value", "Units")]
    rows = [
        ["Data", "0", "file_id", "type", "4", "", "manufacturer", "garmin", "", "garmin_product", "fr945", "",
         "serial_number", "3987650009", ""],
        ["Data", "1", "device_info", "manufacturer", "garmin", "", "serial_number", "3987650009", "",
         "software_version", "12.5", ""],
    ]  # fmt: skip
    for k in range(300):
        row = ["Data", "2", "accelerometer_data", "timestamp", str(1_111_111_111 + k), "s", "timestamp_ms", "0", "ms"]
        row += ["sample_time_offset", "|".join(str(i * 40) for i in range(25)), "ms"]
        for axis in ("x", "y", "z"):
            row += [f"calibrated_accel_{axis}", "|".join("1000" if axis == "z" else "0" for _ in range(25)), "mg"]
        rows.append(row)
    path = tmp_path / "export.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([head, *rows])
    rec = decode_fitcsv(path, path.name)
    assert watch_of([rec]) == Watch("garmin", "fr945", "3987650009", "12.5")


def test_participant_folders_can_be_turned_off(tmp_path, fits):
    s = _settings(tmp_path / "var", folders=False)
    _drop(s.data_dir, fits["alice"], "P07/a.fit")
    (row,) = _rows(_run_agent(s).outbox)
    assert row["participant"] == participant_pseudonym(SECRET.encode(), str(SERIALS["alice"]))
    assert row["participant_source"] == "pseudonym"


def test_raw_custody_waits_while_an_erasure_request_is_open(tmp_path, fits):
    from har_edge.agent.forget import open_request
    from har_edge.sync.custody import Custody

    store = tmp_path / "raw-store"
    store.mkdir()
    s = load_settings(
        env={},
        data_dir=tmp_path / "var",
        agent={"settle_s": 0.0},
        participants={"secret": SECRET},
        sync={"raw_store": str(store)},
    )
    _drop(s.data_dir, fits["alice"], "P01/a.fit")
    agent = _run_agent(s)
    open_request(agent.outbox, "P01")
    held = Custody(s, agent.outbox).run()
    assert held.deferred and held.delivered == 0 and not any(store.rglob("*"))
    with agent.outbox.transaction() as conn:  # the request closed: the export (in its participant folder) goes
        conn.exec_driver_sql("DELETE FROM forget_requests")
    assert Custody(s, agent.outbox).run().delivered == 1

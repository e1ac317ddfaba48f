"""Pull: a real git + DVC registry -> fetch -> verify -> validate -> activate; refusals, health gate, rollback, pin."""

from __future__ import annotations

import argparse
import contextlib
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from sync_helpers import (
    BUNDLED,
    MODEL_NAME,
    RegistryRepo,
    add_file,
    install_local,
    release_version,
    restore_mlflow_env,  # noqa: F401 - autouse fixture
    sqlite_ids,
)

from har_edge.agent.modelstore import read_pointer
from har_edge.agent.outbox import Outbox
from har_edge.agent.settings import load_settings
from har_edge.common.versions import parse_version
from har_edge.sync.errors import RegistryError, RegistryUnreachable
from har_edge.sync.models import ModelManager
from har_edge.sync.registry import parse_ls_remote
from har_edge.sync.state import ModelState

V0, V1, V2 = release_version(0), release_version(1), release_version(2)

#: one pre-release per way of being wrong: never "the newest", reached by pinning
BAD = {
    "0.0.0-badsha": "bad_sha",
    "0.0.0-window": "window",
    "0.0.0-labels": "labels",
    "0.0.0-golden": "golden",
    "0.0.0-corrupt": "corrupt",  # good bytes released, then a byte of the DVC remote object flipped
}


def _settings(data_dir: Path, registry: RegistryRepo | str | None, **sync):
    url = registry.url if isinstance(registry, RegistryRepo) else registry
    return load_settings(
        env={}, data_dir=data_dir, device_id="dev-models", agent={"settle_s": 0.0}, sync={"registry": url, **sync}
    )


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> RegistryRepo:
    """Two good releases (V0, V1) and one release per way of being wrong (pinned by the tests)."""
    reg = RegistryRepo(tmp_path_factory.mktemp("registry"))
    reg.release_many(
        [(v, "good" if kind == "corrupt" else kind) for v, kind in BAD.items()] + [(V0, "good"), (V1, "good")]
    )
    for version, kind in BAD.items():
        if kind == "corrupt":
            reg.corrupt(version)
    return reg


def _deployments(ob: Outbox) -> list[tuple]:
    return sqlite_ids(ob, "SELECT from_version, to_version, outcome FROM deployments ORDER BY id")


# -- versions -------------------------------------------------------------------------------------------


def test_versions_order_like_semver():
    order = ["0.9.0", "1.0.0-rc.1", "1.0.0-rc.2", "1.0.0-rc.10", "1.0.0", "1.2", "1.9.9", "1.10.0"]
    keys = [parse_version(v) for v in order]
    assert keys == sorted(keys)
    assert parse_version("1.2") == parse_version("1.2.0")
    assert parse_version("latest") is None


def test_ls_remote_output_is_parsed_with_peeled_commits():
    out = "\n".join(
        [
            "aaa\trefs/tags/har-cnn@v1.10.0",
            "bbb\trefs/tags/har-cnn@v1.10.0^{}",
            "ccc\trefs/tags/har-cnn@v1.9.0",
            "ddd\trefs/tags/other@v9.0.0",
            "eee\trefs/tags/har-cnn@vnext",
        ]
    )
    rel = parse_ls_remote(out, "har-cnn")
    assert [(r.version, r.commit) for r in rel] == [("1.9.0", "ccc"), ("1.10.0", "bbb")]


# -- release -> activation ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_new_release_is_fetched_verified_activated_and_used_by_the_agent(tmp_path, data_dir, capsys):
    from fitgen import write_imu_fit

    from har_edge.agent.daemon import Agent

    reg = RegistryRepo(tmp_path / "registry")
    reg.release(V0)
    settings = _settings(data_dir, reg)
    agent = Agent(settings)
    mm = ModelManager(settings, agent.outbox)

    first = mm.update(time.time())
    assert first.activated == V0 and read_pointer(settings.models_dir) == V0
    assert mm.update(time.time()).note == f"{V0} is the newest usable release"

    t_release = time.monotonic()
    reg.release(V1)
    t_tagged = time.monotonic()
    report = mm.update(time.time())
    t_active = time.monotonic()
    assert report.activated == V1 and report.replaced == V0
    assert read_pointer(settings.models_dir) == V1 and read_pointer(settings.models_dir, "previous") == V0
    with capsys.disabled():
        print(
            f"\n[measure] release {V1} (dvc add+push, commit, tag, push) {t_tagged - t_release:.2f} s; "
            f"pull pass to activation {t_active - t_tagged:.2f} s"
        )

    write_imu_fit(agent.folder.inbox / "walk.fit", rate_hz=50, seconds=60, seed=11)
    (outcome,) = agent.step(now=1e9)
    assert outcome.status == "processed"
    row = agent.outbox.file(outcome.file_id)
    assert (row.model_name, row.model_version) == (MODEL_NAME, V1)

    reg.release(V2)
    assert mm.update(time.time()).activated == V2
    kept = sorted(
        p.name
        for p in settings.models_dir.iterdir()
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
    )
    assert kept == [V1, V2]  # active + previous; V0 was removed
    assert [d[1:] for d in _deployments(agent.outbox)] == [(V0, "activated"), (V1, "activated"), (V2, "activated")]


@pytest.mark.slow
@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_bad_release_is_refused_and_the_old_model_stays_active(variants, tmp_path, data_dir, bad):
    install_local(data_dir / "models", V0)
    settings = _settings(data_dir, variants, pin=bad)
    mm = ModelManager(settings)
    report = mm.update(time.time())
    assert report.activated is None and [v for v, _ in report.refused] == [bad]
    reason = report.refused[0][1]
    w, c, n = BUNDLED.window, BUNDLED.n_channels, len(BUNDLED.labels)
    expected = {
        "bad_sha": "sha256",
        "window": f"input takes windows of {w}x{c}, the manifest says {w + 50}x{c}",
        "labels": f"output has {n} classes, the manifest lists {n + 1} labels",
        "golden": "does not reproduce its golden windows",
        "corrupt": "DVC does not verify remote objects",
    }[BAD[bad]]
    assert expected in reason and f"har-cnn@v{bad}" in reason
    assert read_pointer(settings.models_dir) == V0
    assert not (settings.models_dir / bad).exists()
    assert ModelState.load(settings.models_dir).refused[bad].reason == reason
    assert _deployments(mm.outbox) == [(V0, bad, "refused")]
    # not fetched again: the same release stays refused
    again = mm.update(time.time())
    assert not again.refused and "was refused" in again.note
    assert len(_deployments(mm.outbox)) == 1


@pytest.mark.slow
def test_a_refused_newest_falls_back_to_the_next_and_is_tried_again_when_re_released(tmp_path, data_dir):
    reg = RegistryRepo(tmp_path / "registry")
    reg.release_many([(V0, "good"), (V1, "bad_sha")])
    mm = ModelManager(_settings(data_dir, reg))
    first = mm.update(time.time())
    assert [v for v, _ in first.refused] == [V1] and first.activated == V0  # in the same pass
    assert mm.update(time.time()).note == f"{V0} is the newest usable release"
    reg.release(V1)  # fixed and tagged again: the tag names another commit
    assert mm.update(time.time()).activated == V1
    assert V1 not in ModelState.load(mm.models_dir).refused


def test_an_unreachable_registry_fails_fast(data_dir):
    mm = ModelManager(_settings(data_dir, str(data_dir / "no-such-registry.git")))
    t0 = time.monotonic()
    with pytest.raises(RegistryUnreachable, match=re.escape("no-such-registry.git could not be listed")):
        mm.update(time.time())
    assert time.monotonic() - t0 < 10


def test_a_hung_registry_is_bounded_by_the_command_timeout(data_dir):
    """An HTTP git remote that accepts the connection and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(srv.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/registry.git"
        mm = ModelManager(_settings(data_dir, url, command_timeout_s=1.5))
        t0 = time.monotonic()
        with pytest.raises(RegistryUnreachable, match="did not finish within 2 s"):
            mm.update(time.time())
        assert time.monotonic() - t0 < 6
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        srv.close()


# -- health gate ---------------------------------------------------------------------------------------


def _activate_on_probation(variants, tmp_path, data_dir, before=None, **sync):
    """V0 active with a history of files, then V1 activated from the registry (on probation)."""
    install_local(data_dir / "models", V0)
    settings = _settings(data_dir, variants, pin=V1, **sync)
    mm = ModelManager(settings)
    if before is not None:
        before(settings, mm)
    old = ModelState.load(mm.models_dir)
    from har_edge.agent.manifest import read_manifest

    old_m = read_manifest(mm.models_dir / V0)
    for seed in range(3):
        add_file(
            mm.outbox,
            100 + seed,
            minutes=2,
            model_name=MODEL_NAME,
            model_version=V0,
            model_sha256=old_m.sha256,
            confidence=0.9,
        )
    assert mm.update(time.time()).activated == V1
    p = ModelState.load(mm.models_dir).probation
    assert p is not None and p.version == V1 and p.previous_version == V0 and not old.probation
    return settings, mm, p


@pytest.mark.slow
def test_health_gate_passes_a_model_that_behaves(variants, tmp_path, data_dir):
    settings, mm, p = _activate_on_probation(variants, tmp_path, data_dir)
    add_file(
        mm.outbox, 1, minutes=2, model_name=MODEL_NAME, model_version=p.version, model_sha256=p.sha256, confidence=0.85
    )
    assert mm.check_health(time.time()).health == "pending"
    for seed in (2, 3):
        add_file(
            mm.outbox,
            seed,
            minutes=2,
            model_name=MODEL_NAME,
            model_version=p.version,
            model_sha256=p.sha256,
            confidence=0.85,
        )
    assert mm.check_health(time.time()).health == "healthy"
    assert ModelState.load(mm.models_dir).probation is None
    assert read_pointer(settings.models_dir) == p.folder


@pytest.mark.slow
def test_health_gate_rolls_back_when_confidence_collapses(variants, tmp_path, data_dir):
    settings, mm, p = _activate_on_probation(variants, tmp_path, data_dir)
    for seed in range(3):
        add_file(
            mm.outbox,
            seed,
            minutes=2,
            model_name=MODEL_NAME,
            model_version=p.version,
            model_sha256=p.sha256,
            confidence=0.4,
        )
    report = mm.check_health(time.time())
    assert report.rolled_back == p.folder
    assert read_pointer(settings.models_dir) == V0 and read_pointer(settings.models_dir, "previous") is None
    refusal = ModelState.load(mm.models_dir).refused[p.version]
    assert "mean confidence" in refusal.reason and "44%" in refusal.reason
    assert _deployments(mm.outbox)[-1] == (p.folder, V0, "rolled_back")
    assert not (settings.models_dir / p.folder).exists()
    # the pinned version is refused now: the next pull does not bring it back
    assert "was refused" in mm.update(time.time()).note


@pytest.mark.slow
def test_health_gate_rolls_back_when_files_fail_but_ignores_bad_inputs(variants, tmp_path, data_dir):
    _settings, mm, p = _activate_on_probation(variants, tmp_path, data_dir)
    for seed in range(3):  # not the model's fault: not judged
        add_file(
            mm.outbox,
            50 + seed,
            model_name=MODEL_NAME,
            model_version=p.version,
            model_sha256=p.sha256,
            status="failed",
            error_kind="no_imu_data",
        )
    assert mm.check_health(time.time()).health == "pending"
    add_file(
        mm.outbox, 1, minutes=2, model_name=MODEL_NAME, model_version=p.version, model_sha256=p.sha256, confidence=0.9
    )
    for seed in (2, 3):
        add_file(
            mm.outbox,
            seed,
            model_name=MODEL_NAME,
            model_version=p.version,
            model_sha256=p.sha256,
            status="failed",
            error_kind="too_short",
        )
    report = mm.check_health(time.time())
    assert report.rolled_back == p.folder
    assert "2 of the first 3 files" in ModelState.load(mm.models_dir).refused[p.version].reason


@pytest.mark.slow
def test_health_gate_rolls_back_a_model_the_agent_cannot_load(variants, tmp_path, data_dir):
    from fitgen import write_imu_fit

    from har_edge.agent.daemon import Agent

    agents = []

    def start_agent(settings, mm):  # the agent runs V0 when the new version arrives
        agents.append(Agent(settings, mm.outbox))
        assert agents[0].models.refresh().manifest.version == V0

    settings, mm, p = _activate_on_probation(variants, tmp_path, data_dir, before=start_agent)
    model_file = settings.models_dir / p.folder / "model.tflite"
    raw = bytearray(model_file.read_bytes())
    raw[100] ^= 0xFF  # damaged on the device's disk after activation
    model_file.write_bytes(bytes(raw))
    agent = agents[0]
    write_imu_fit(agent.folder.inbox / "walk.fit", rate_hz=50, seconds=30, seed=4)
    (outcome,) = agent.step(now=1e9)
    assert mm.outbox.file(outcome.file_id).model_version == V0  # the agent kept the old one
    report = mm.check_health(time.time())
    assert report.rolled_back == p.folder
    assert "could not load" in ModelState.load(mm.models_dir).refused[p.version].reason
    assert read_pointer(settings.models_dir) == V0
    assert [d[2] for d in _deployments(mm.outbox)] == ["activated", "load_failed", "rolled_back"]


# -- the models commands --------------------------------------------------------------------------------


@pytest.mark.slow
def test_models_pin_rollback_and_list(variants, tmp_path, data_dir, capsys):
    from har_edge.sync import cli

    install_local(data_dir / "models", V0)
    settings = _settings(data_dir, variants)
    ns = argparse.Namespace

    assert cli.cmd_models_pin(settings, ns(version=V1, clear=False)) == 0
    assert read_pointer(settings.models_dir) == V1 and ModelState.load(settings.models_dir).pin == V1

    assert cli.cmd_models_rollback(settings, ns(reason="wrong labels on the wrist")) == 0
    assert read_pointer(settings.models_dir) == V0
    state = ModelState.load(settings.models_dir)
    assert state.pin is None and state.refused[V1].reason == "wrong labels on the wrist"

    capsys.readouterr()
    assert cli.cmd_models_list(settings, ns(json=False)) == 0
    out = capsys.readouterr().out
    assert f"{V0}  " in out and "active" in out and "refused" in out and "wrong labels on the wrist" in out

    assert cli.cmd_models_verify(settings, ns(version=None, release=None)) == 0
    assert cli.cmd_models_verify(settings, ns(version=None, release="0.0.0-golden")) == 1

    # pinning the refused version again is a person's decision: it is fetched and activated
    assert cli.cmd_models_pin(settings, ns(version=V1, clear=False)) == 0
    assert read_pointer(settings.models_dir) == V1
    with pytest.raises(RegistryError, match=re.escape("9.9.9 is not released")):
        cli.cmd_models_pin(settings, ns(version="9.9.9", clear=False))
    assert cli.cmd_models_pin(settings, ns(version=None, clear=True)) == 0
    assert ModelState.load(settings.models_dir).pin is None
    # rolled back to what was previous when V1 was pinned (V0)
    assert cli.cmd_models_rollback(settings, ns(reason="again")) == 0
    assert read_pointer(settings.models_dir) == V0

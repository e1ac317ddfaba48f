"""The monitor end to end: reference in the manifest, per-file verdicts through the real pipeline, the trigger.

The bundled model is given a reference drawn from the synthetic generator's windows (subjects 1-16),
marked ``labelled``: here the generator stands in for real training data, so that drift verdicts are
on (a reference marked ``synthetic`` gives none, tested below). Replays are other subjects' continuous
recordings written as FIT exports, whole; shifts are made from them or synthesized (tests/shifts.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shifts

from har_edge.agent.manifest import MANIFEST_FILE, read_manifest
from har_edge.agent.model import BUNDLED_MODEL_DIR, load_model
from har_edge.agent.outbox import Outbox
from har_edge.agent.pipeline import Processor
from har_edge.agent.preprocess import apply_scaler
from har_edge.agent.settings import AgentSettings, MonitorSettings
from har_edge.trainer.data import LabelledWindows, synthetic
from har_edge.trainer.reference import attach_reference, build_reference

LABELS = ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "lying")


@pytest.fixture(scope="module")
def recordings():
    return synthetic.generate(LABELS, subjects=24, seconds_per_activity=60, seed=11)


def _reference(recordings, model, measured_on="labelled"):
    m = model.manifest
    train = LabelledWindows.concat([r.windows(m.window, m.step) for r in recordings[:16]], m.window)
    held = LabelledWindows.concat([r.windows(m.window, m.step) for r in recordings[8:16]], m.window)
    x_held = apply_scaler(held.windows, m.scaler.mean, m.scaler.scale)
    probs = model.runner.predict(x_held)
    return build_reference(
        x_held,
        probs,
        held.labels.astype(np.int64),
        measured_on,
        input_windows=apply_scaler(train.windows, m.scaler.mean, m.scaler.scale),
        input_range=model.runner.input_range,
        groups=held.subjects,
    )


@pytest.fixture(scope="module")
def model_dir(recordings, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("monitor-model") / "model"
    shutil.copytree(BUNDLED_MODEL_DIR, dest)
    attach_reference(dest, _reference(recordings, load_model(dest)))
    return dest


@pytest.fixture(scope="module")
def fits(recordings, tmp_path_factory) -> dict[str, Path]:
    """In-distribution replays (subjects 17-20, whole) and shifted files."""
    d = tmp_path_factory.mktemp("monitor-fits")
    out = {}
    for i, r in enumerate(recordings[16:20]):
        out[f"in-{i}"] = shifts.write_samples_fit(d / f"in-{i}.fit", r.samples, start=shifts.start_of(i))
    base = recordings[16].samples
    for kind, fn in shifts.RECORDING_SHIFTS.items():
        out[kind] = shifts.write_samples_fit(d / f"{kind}.fit", fn(base), start=shifts.start_of(20))
    out["vibrating_mount"] = shifts.write_samples_fit(d / "vib.fit", shifts.vibrating_mount(600, 1))
    out["lying_still"] = shifts.write_samples_fit(d / "still.fit", shifts.lying_still(1200, 1))
    out["short"] = shifts.write_samples_fit(d / "short.fit", base[: 50 * 60], start=shifts.start_of(30))
    return out


def _process(tmp_path: Path, model, paths, **kw):
    ob = Outbox(tmp_path / "outbox.sqlite")
    proc = Processor(AgentSettings(), ob, tmp_path / "scratch", **kw)
    reports = []
    for p in paths:
        outcome = proc.process([p], model)
        assert outcome.status == "processed", outcome
        reports.append((outcome, proc.last_monitor))
    return ob, reports


def test_in_distribution_replays_are_ok(model_dir, fits, tmp_path):
    model = load_model(model_dir)
    _, reports = _process(tmp_path, model, [fits[f"in-{i}"] for i in range(4)])
    for _, rep in reports:
        assert rep.status in ("ok", "warn"), rep.reasons
    assert sum(rep.status == "ok" for _, rep in reports) >= 2, [r.reasons for _, r in reports]


@pytest.mark.parametrize(
    ("kind", "expect"),
    [
        ("axes_swapped", ("acc_x", "acc_z")),
        ("gyro_rad_as_deg", ("gyro",)),
        ("gyro_10x", ("gyro",)),
        ("vibrating_mount", ("far from training",)),
        ("lying_still", ("far from training",)),
    ],
)
def test_shifted_recordings_alert_with_the_right_reasons(model_dir, fits, tmp_path, kind, expect):
    model = load_model(model_dir)
    ob, [(outcome, rep)] = _process(tmp_path, model, [fits[kind]])
    assert rep.status == "alert", rep.reasons
    assert any(all(e in r for e in expect[:1]) for r in rep.reasons), rep.reasons
    row = ob.file(outcome.file_id)  # stored with the file
    assert row.monitor_status == "alert"
    assert json.loads(row.monitor_json)["reasons"] == rep.reasons
    keys = {p.key for p in ob.file_metrics(outcome.file_id)}
    assert {"monitor.drift_score", "monitor.confidence_mean", "monitor.flip_rate", "monitor.status_code"} <= keys


def test_vibrating_mount_reads_as_one_confident_class(model_dir, fits, tmp_path):
    _, [(_, rep)] = _process(tmp_path, load_model(model_dir), [fits["vibrating_mount"]])
    assert rep.metrics["saturation_share"] >= 0 and rep.metrics["psi_max"] > 3
    assert any("acc_" in r and "PSI" in r for r in rep.reasons)


def test_a_short_file_is_too_short_to_judge(model_dir, fits, tmp_path):
    _, [(_, rep)] = _process(tmp_path, load_model(model_dir), [fits["short"]])
    assert rep.status == "too_short" and "too short to judge" in rep.reasons[0]


def test_old_manifest_without_reference_loads_and_says_no_reference(model_dir, fits, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(model_dir, folder)
    doc = json.loads((folder / MANIFEST_FILE).read_text())
    del doc["reference"]
    (folder / MANIFEST_FILE).write_text(json.dumps(doc))
    model = load_model(folder)
    assert model.manifest.reference is None
    _, [(_, rep)] = _process(tmp_path, model, [fits["gyro_10x"]])
    assert rep.status == "no_reference" and "no reference" in rep.reasons[0]
    assert 0 < rep.metrics["confidence_mean"] <= 1


def test_a_synthetic_reference_gives_no_drift_verdicts(recordings, fits, tmp_path):
    base = load_model(BUNDLED_MODEL_DIR)
    ref = _reference(recordings, base, measured_on="synthetic")
    model = dataclasses.replace(base, manifest=base.manifest.model_copy(update={"reference": ref}))
    _, [(_, rep)] = _process(tmp_path, model, [fits["gyro_10x"]])
    assert rep.status != "alert"
    assert any("synthetic" in r for r in rep.reasons)
    assert not any("PSI" in r for r in rep.reasons)


def test_reference_without_labels_is_uncalibrated_with_a_predicted_prior(recordings):
    model = load_model(BUNDLED_MODEL_DIR)
    w = LabelledWindows.concat([r.windows(200, 100) for r in recordings[:2]], 200)
    x = apply_scaler(w.windows, model.manifest.scaler.mean, model.manifest.scaler.scale)
    ref = build_reference(x, model.runner.predict(x), None, "unlabelled")
    assert ref.temperature.value == 1.0 and ref.temperature.status == "uncalibrated"
    assert ref.prior.kind == "predicted" and ref.prior.measured_on == "unlabelled"
    assert abs(sum(ref.prior.share) - 1) < 1e-6


def test_bundled_model_carries_a_fitted_reference():
    ref = read_manifest(BUNDLED_MODEL_DIR).reference
    assert ref is not None and ref.measured_on == "labelled" and ref.temperature.status == "fitted"
    assert ref.temperature.ece_after <= ref.temperature.ece_before


def test_trigger_fires_after_k_of_n_alerts_and_keeps_flagged_windows(model_dir, fits, tmp_path):
    model = load_model(model_dir)
    cfg = MonitorSettings(trigger_files=4, trigger_alerts=2, flagged_windows_per_file=8)
    paths = [fits["in-0"], fits["gyro_10x"], fits["in-1"]]
    ob, _ = _process(tmp_path, model, paths, monitor=cfg, share_flagged_windows=True)
    assert ob.pending_retrain_requests() == []  # one alert of three: not yet
    proc = Processor(AgentSettings(), ob, tmp_path / "scratch", monitor=cfg, share_flagged_windows=True)
    assert proc.process([fits["axes_swapped"]], model).status == "processed"
    [req] = ob.pending_retrain_requests()
    listed = json.loads(req.files_json)
    assert [f["name"] for f in listed] == ["gyro_10x.fit", "axes_swapped.fit"]
    assert all(f["verdict"] == "alert" and f["reasons"] and len(f["sha256"]) == 64 for f in listed)
    import io

    with np.load(io.BytesIO(ob.flagged_npz(listed[0]["file_id"]))) as z:
        assert z["windows"].shape == (8, 200, 6) and (np.diff(z["idx"]) > 0).all()
    # the window restarts: one more alert is not a second request
    assert proc.process([fits["gyro_rad_as_deg"]], model).status == "processed"
    assert len(ob.pending_retrain_requests()) == 1


def test_flagged_windows_are_not_kept_unless_shared(model_dir, fits, tmp_path):
    ob, [(outcome, rep)] = _process(tmp_path, load_model(model_dir), [fits["gyro_10x"]])
    assert rep.status == "alert" and ob.flagged_npz(outcome.file_id) is None


def test_status_lists_recent_files_with_their_verdicts(model_dir, fits, tmp_path):
    data = tmp_path / "var"
    env = {"HAR_EDGE_DATA_DIR": str(data), "HAR_EDGE_AGENT__MODEL_DIR": str(model_dir), "PATH": "/usr/bin:/bin"}
    import os

    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    cli = [sys.executable, "-m", "har_edge.cli"]
    again = tmp_path / "again.fit"
    shutil.copyfile(fits["in-0"], again)  # the same content under another name: a duplicate
    for p in (fits["in-0"], fits["gyro_10x"], again):
        subprocess.run([*cli, "agent", "process", str(p)], env=env, capture_output=True, timeout=120)
    out = subprocess.run([*cli, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    st = json.loads(out.stdout)
    recent = st["recent_files"]
    assert [f["name"] for f in recent] == ["again.fit", "gyro_10x.fit", "in-0.fit"]
    assert recent[0]["status"] == "duplicate" and recent[0]["monitor"] is None
    assert recent[1]["status"] == "processed" and recent[1]["monitor"]["status"] == "alert"
    assert recent[1]["monitor"]["reasons"] and recent[1]["windows"] > 0 and recent[1]["delivered"] is False
    assert set(recent[1]) == {"name", "sha256", "status", "error_kind", "windows", "delivered", "monitor"}
    plain = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=60).stdout
    assert "gyro_10x.fit" in plain and "monitor alert" in plain


def _push_and_check(settings, model_dir, fits, tmp_path):
    import time

    from har_edge.sync import runs
    from har_edge.sync.push import Pusher

    model = load_model(model_dir)
    ob = Outbox(settings.outbox_path)
    proc = Processor(
        settings.agent, ob, settings.work / ".scratch", monitor=settings.monitor, share_flagged_windows=True
    )
    ids = [proc.process([fits[k]], model).file_id for k in ("in-1", "gyro_10x", "axes_swapped")]
    assert len(ob.pending_retrain_requests()) == 1
    p = Pusher(settings, ob)
    report = p.push(time.time())
    assert report.files_finished == 3 and not report.refused
    for fid in ids:
        row = ob.file(fid)
        run = p.client.get_run(row.run_id)
        assert run.data.tags[runs.MONITOR] == row.monitor_status
        reasons = json.loads(row.monitor_json)["reasons"]
        note = run.data.tags[runs.DESCRIPTION]
        assert f"| monitor | **{row.monitor_status}** |" in note and all(r in note for r in reasons)
        assert "monitor.drift_score" in run.data.metrics
    assert p.client.get_run(ob.file(ids[1]).run_id).data.tags[runs.MONITOR] == "alert"
    dev = p.client.get_run(p.device_run())
    assert dev.data.tags[runs.RETRAIN_REQUESTED].startswith("request 1: 2 alerting files")
    names = sorted(a.path for a in p.client.list_artifacts(dev.info.run_id, "retrain_requests"))
    assert names == ["retrain_requests/flagged_windows_1.npz", "retrain_requests/retrain_request_1.json"]
    got = Path(p.client.download_artifacts(dev.info.run_id, "retrain_requests", str(tmp_path / "dl")))
    doc = json.loads((got / "retrain_request_1.json").read_text())
    assert [f["sha256"] for f in doc["files"]] == [ob.file(i).sha256 for i in ids[1:]]
    with np.load(got / "flagged_windows_1.npz") as z:
        assert len(z.files) == 4 and all(z[k].shape[1:] == (200, 6) for k in z.files if k.endswith(".windows"))
    assert ob.pending_retrain_requests() == []
    assert p.push(time.time()).artifacts == 0  # delivered once


def _sync_settings(tmp_path, uri):
    import uuid

    from har_edge.agent.settings import load_settings

    return load_settings(
        env={},
        data_dir=tmp_path / "var",
        device_id=f"dev-{uuid.uuid4().hex[:6]}",
        sync={"tracking_uri": uri, "request_timeout_s": 30, "share_flagged_windows": True,
              "experiment": f"monitor-{uuid.uuid4().hex[:8]}"},
        monitor={"trigger_files": 3, "trigger_alerts": 2, "flagged_windows_per_file": 4},
    )  # fmt: skip


def test_verdicts_and_the_retraining_request_reach_the_local_store(model_dir, fits, tmp_path):
    _push_and_check(_sync_settings(tmp_path, None), model_dir, fits, tmp_path)


@pytest.mark.server
def test_verdicts_and_the_retraining_request_reach_the_server(mlflow_server, model_dir, fits, tmp_path):
    _push_and_check(_sync_settings(tmp_path, mlflow_server.url), model_dir, fits, tmp_path)


def test_adapt_from_mlflow_is_refused_when_devices_did_not_share_windows(model_dir, fits, tmp_path):
    import time

    from har_edge.sync.push import Pusher
    from har_edge.trainer.adapt import windows_from_mlflow
    from har_edge.trainer.errors import TrainerError
    from har_edge.trainer.settings import load_settings as trainer_settings

    base = _sync_settings(tmp_path, None)
    settings = base.model_copy(update={"sync": base.sync.model_copy(update={"share_flagged_windows": False})})
    ob = Outbox(settings.outbox_path)
    proc = Processor(settings.agent, ob, settings.work / ".scratch", monitor=settings.monitor)
    for k in ("gyro_10x", "axes_swapped"):
        proc.process([fits[k]], load_model(model_dir))
    p = Pusher(settings, ob)
    p.push(time.time())
    names = [a.path for a in p.client.list_artifacts(p.device_run(), "retrain_requests")]
    assert names == ["retrain_requests/retrain_request_1.json"]  # the list goes up, the windows do not
    ts = trainer_settings(None, [f"mlflow.tracking_uri={p.target.uri}"])
    with pytest.raises(TrainerError, match="did not share flagged windows"):
        windows_from_mlflow(ts, f"tags.`har.device` = '{settings.device}'", tmp_path)

"""Trainer data path without TensorFlow: settings, restricted unpickler, HAPT, synthetic, Garmin, prepare, gate."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import tarfile
from datetime import UTC
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from pydantic import ValidationError
from trainer_helpers import pandas014_frame_pickle, synthetic_params, write_study_pair

from har_edge.agent.decode.types import Chunk, Recording, SensorBlock
from har_edge.agent.preprocess import recording_windows
from har_edge.trainer.data import LabelledRecording, hapt, label_runs, recording_to_windows, synthetic
from har_edge.trainer.data.garmin import Interval, label_windows, parse_time_ms, read_labels
from har_edge.trainer.data.safe_pickle import frame_columns, safe_loads
from har_edge.trainer.errors import ConfigError, DataError, GateFailed, UnsafePickle
from har_edge.trainer.gate import check_gate
from har_edge.trainer.settings import DEFAULT_LABELS, load_settings

LABELS = DEFAULT_LABELS


# -- settings --------------------------------------------------------------------


def test_repo_params_yaml_is_valid():
    root = Path(__file__).resolve().parents[1]
    s = load_settings(root / "params.yaml")
    assert s.data.window == 200 and s.data.step == 100 and s.data.sample_rate_hz == 50
    assert s.gate.min_agreement >= 0.99
    assert s.data.labels == LABELS
    assert s.build == root / "build" / "trainer"


def test_settings_refuse_unknown_keys_and_bad_values(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  epochs: -3\n  optimiser: sgd\nextra: 1\n")
    with pytest.raises(ConfigError) as e:
        load_settings(p)
    msg = str(e.value)
    assert "train.epochs" in msg and "train.optimiser" in msg and "extra" in msg


def test_settings_overrides_and_paths(tmp_path):
    p = synthetic_params(tmp_path, tracking_uri="sqlite:///x.db")
    s = load_settings(p, ["train.epochs=2", "split.test_subjects=[1, 2]", "mlflow.tags={team: lab}"])
    assert s.train.epochs == 2
    assert s.split.test_subjects == ("1", "2")
    assert s.mlflow.tags == {"team": "lab"}
    assert s.cache_dir == tmp_path / "cache" and s.prepared_file == tmp_path / "build" / "prepared.npz"
    with pytest.raises(ConfigError):
        load_settings(p, ["no-equals-sign"])
    with pytest.raises(ValidationError):
        s.train.epochs = 3  # frozen


def test_check_config_exit_codes(tmp_path, capsys):
    from har_edge.trainer.cli import main

    good = synthetic_params(tmp_path / "a", tracking_uri="sqlite:///x.db")
    assert main(["--params", str(good), "check-config"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("gate: {min_agreement: 2}\n")
    assert main(["--params", str(bad), "check-config"]) == 2  # usage: the same table as har-edge (was 1)
    assert "gate.min_agreement" in capsys.readouterr().err


# -- restricted unpickler ----------------------------------------------------------


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_unpickler_refuses_os_system(tmp_path, protocol):
    marker = tmp_path / "pwned"
    data = pickle.dumps({"evil": _Evil(marker), "x": np.arange(3)}, protocol=protocol)
    pickle.loads(pickle.dumps(1))  # sanity: the stdlib works here
    with pytest.raises(UnsafePickle) as e:
        safe_loads(data, "evil.pkl")
    assert "system" in str(e.value) and "evil.pkl" in str(e.value)
    assert not marker.exists()


def test_unpickler_refuses_eval_and_unknown_classes():
    with pytest.raises(UnsafePickle, match="eval"):
        safe_loads(pickle.dumps(_EvalEvil(), protocol=2))
    with pytest.raises(UnsafePickle, match=re.escape("collections.OrderedDict")):
        from collections import OrderedDict

        safe_loads(pickle.dumps(OrderedDict(a=1), protocol=2))


def test_unpickler_reads_numpy_and_pandas_014_frames():
    rng = np.random.default_rng(0)
    cols = {name: rng.normal(size=50) for name in ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")}
    cols["sequence"] = np.arange(50, dtype=np.int64)
    cols["label"] = np.repeat(np.arange(5, dtype=np.int64), 10)
    users = safe_loads(pandas014_frame_pickle(cols), "frame.pkl")
    got = frame_columns(users[1][0])
    assert set(got) == set(cols)
    for k, v in cols.items():
        np.testing.assert_array_equal(got[k], v)
    arr = safe_loads(pickle.dumps(np.arange(6, dtype=np.float32).reshape(2, 3), protocol=2))
    np.testing.assert_array_equal(arr, np.arange(6, dtype=np.float32).reshape(2, 3))


def test_unpickler_rejects_garbage():
    with pytest.raises(DataError):
        safe_loads(b"not a pickle at all")


def _fake_sdist(path: Path, pickled: bytes) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        payload = gzip.compress(pickled)
        info = tarfile.TarInfo(hapt.PICKLE_MEMBER)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return path


def test_hapt_sdist_loader_units_and_labels(tmp_path):
    n = 400
    t = np.arange(n) / 50
    cols = {
        "acc-x": np.full(n, 1.0),
        "acc-y": np.zeros(n),
        "acc-z": np.zeros(n),
        "gyro-x": np.full(n, np.pi),
        "gyro-y": np.zeros(n),
        "gyro-z": np.sin(t),
        "sequence": np.arange(n, dtype=np.int64),
        # unlabelled, walking, a transition (7), lying, sitting
        "label": np.concatenate([np.full(50, -1), np.full(150, 1), np.full(20, 7), np.full(100, 6), np.full(80, 4)]),
    }
    sdist = _fake_sdist(tmp_path / "fake.tar.gz", pandas014_frame_pickle(cols))
    (rec,) = hapt.load_sdist(sdist, LABELS)
    assert rec.subject == "1"
    np.testing.assert_allclose(rec.samples[:, 0], 9.80665, rtol=1e-6)  # g -> m/s²
    np.testing.assert_allclose(rec.samples[:, 3], 180.0, rtol=1e-5)  # rad/s -> deg/s
    assert label_runs(rec.labels) == [(50, 200, 0), (220, 320, 5), (320, 400, 3)]
    w = rec.windows(50, 25)
    assert set(np.unique(w.labels)) == {0, 3, 5}
    # no window spans the transition or two labels
    assert len(w) == (150 - 50) // 25 + 1 + (100 - 50) // 25 + 1 + (80 - 50) // 25 + 1


def test_hapt_sdist_refuses_tampered_pickle(tmp_path):
    marker = tmp_path / "pwned"
    sdist = _fake_sdist(tmp_path / "evil.tar.gz", pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(UnsafePickle):
        hapt.load_sdist(sdist, LABELS)
    assert not marker.exists()


def test_hapt_raw_dir_round_trip(tmp_path):
    recs = synthetic.generate(LABELS, subjects=2, seconds_per_activity=10, seed=1)
    hapt.write_raw_dir(recs, tmp_path / "RawData", LABELS)
    back = hapt.load_raw_dir(tmp_path, LABELS)
    assert [r.subject for r in back] == ["1", "2"]
    for a, b in zip(recs, back, strict=False):
        np.testing.assert_allclose(a.samples, b.samples, atol=1e-4)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert len(hapt.raw_dir_hash(tmp_path)) == 64
    with pytest.raises(DataError, match=re.escape("labels.txt")):
        hapt.load_raw_dir(tmp_path / "nowhere", LABELS)


@pytest.mark.slow
def test_real_hapt_sdist_if_cached():
    """The real HAPT pickle, when it was downloaded before (make train does): 30 users, sane units."""
    root = Path(__file__).resolve().parents[1]
    sdist = next(
        (
            p
            for p in [
                root / ".cache/har-edge/hapt" / hapt.SDIST_FILE,
                Path.home() / ".cache/har-edge/hapt" / hapt.SDIST_FILE,
            ]
            if p.is_file()
        ),
        None,
    )
    if sdist is None:
        pytest.skip("HAPT sdist not downloaded (har-train prepare fetches it)")
    recs = hapt.load_sdist(sdist, LABELS)
    assert len({r.subject for r in recs}) == 30
    lying = np.concatenate([r.samples[r.labels == 5] for r in recs])
    assert 9.0 < np.median(np.linalg.norm(lying[:, :3], axis=1)) < 10.6  # gravity in m/s²


# -- synthetic --------------------------------------------------------------------


def test_synthetic_is_seeded_and_plausible():
    a = synthetic.generate(LABELS, subjects=3, seconds_per_activity=20, seed=5)
    b = synthetic.generate(LABELS, subjects=3, seconds_per_activity=20, seed=5)
    c = synthetic.generate(LABELS, subjects=3, seconds_per_activity=20, seed=6)
    for x, y in zip(a, b, strict=False):
        np.testing.assert_array_equal(x.samples, y.samples)
    assert not np.array_equal(a[0].samples, c[0].samples)
    rec = a[0]
    for idx, name in enumerate(LABELS):
        s = rec.samples[rec.labels == idx]
        assert len(s) == 20 * 50
        mag = np.linalg.norm(s[:, :3], axis=1)
        assert 9.5 < np.linalg.norm(s[:, :3].mean(axis=0)) < 10.1, name  # gravity kept, in m/s²
        if name.startswith("walking"):
            v = mag - mag.mean()
            spec = np.abs(np.fft.rfft(v))
            freqs = np.fft.rfftfreq(len(v), 1 / 50)
            peak = freqs[np.argmax(spec[1:]) + 1]
            assert 1.5 <= peak <= 3.0, (name, peak)
            assert s[:, 3:].std() > 5  # the trunk rotates while walking
        else:
            assert mag.std() < 0.3 and s[:, 3:].std() < 5
    up = {name: np.median(rec.samples[rec.labels == i, :3], axis=0) / 9.80665 for i, name in enumerate(LABELS)}
    tilt = {k: np.degrees(np.arccos(np.clip(v[0] / np.linalg.norm(v), -1, 1))) for k, v in up.items()}
    assert tilt["standing"] < 20 and 20 < tilt["sitting"] < 70 and tilt["lying"] > 60


@hyp_settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(-1, 3), min_size=0, max_size=60), st.integers(1, 8), st.integers(1, 8))
def test_windows_never_span_two_labels(labels, window, step):
    labels = np.array(labels, dtype=np.int16)
    samples = np.arange(len(labels) * 6, dtype=np.float32).reshape(-1, 6)
    rec = LabelledRecording("r", "1", samples, labels)
    w = recording_to_windows(rec, window, step)
    for win, lab in zip(w.windows, w.labels, strict=False):
        rows = (win[:, 0] / 6).astype(int)
        assert np.all(labels[rows] == lab) and lab >= 0
        assert np.all(np.diff(rows) == 1)


# -- Garmin labelled exports ---------------------------------------------------------


def _recording_from(samples: np.ndarray, t0_ms: int, rate_hz: float = 50.0) -> Recording:
    t = t0_ms + np.round(np.arange(len(samples)) * 1000 / rate_hz).astype(np.int64)
    acc_mg = samples[:, :3] / 9.80665 * 1000

    def chunks():
        for i in range(0, len(t), 250):
            yield Chunk(
                SensorBlock(t[i : i + 250], acc_mg[i : i + 250].astype(np.float32)),
                SensorBlock(t[i : i + 250], samples[i : i + 250, 3:].astype(np.float32)),
            )

    return Recording("study", "test", chunks, accel_unit=None, has_gyro=True)


def test_garmin_windows_are_labelled_by_intervals():
    sig = synthetic.activity_signal("walking", 30, np.random.default_rng(0))
    t0 = 1_742_802_739_000
    ws = recording_windows(_recording_from(sig, t0), rate_hz=50, window=200, step=100)
    assert len(ws) == 14
    np.testing.assert_allclose(ws.windows[0], sig[:200], atol=1e-3)  # milli-g -> m/s² by the agent
    ivs = [Interval(t0, t0 + 10_000, 0), Interval(t0 + 10_000, t0 + 30_000, 3)]
    mask, labels = label_windows(ws, ivs, rate_hz=50)
    starts = (ws.start_ms - t0) // 1000
    assert labels[mask].tolist() == [0 if s + 4 <= 10 else 3 for s in starts[mask]]
    # windows straddling the 10 s boundary are dropped
    assert not mask[(starts < 10) & (starts + 4 > 10)].any()


def test_garmin_labels_csv(tmp_path):
    (tmp_path / "a.fit").write_bytes(b"")
    (tmp_path / "labels.csv").write_text(
        "file,subject,label,start,end\n"
        "a.fit,alice,walking,2025-03-24T07:52:19Z,2025-03-24T07:55:00Z\n"
        "a.fit,alice,sitting,1742802900000,1742803000000\n"
        "a.fit,alice,cycling,1742803000000,1742803100000\n"
        "x_accelerometer.csv|x_gyroscope.csv,bob,lying,2025-03-24T08:00:00,2025-03-24T08:10:00\n"
    )
    exports = read_labels(tmp_path, LABELS)
    assert [(e.files, e.subject, len(e.intervals)) for e in exports] == [
        (("a.fit",), "alice", 2),
        (("x_accelerometer.csv", "x_gyroscope.csv"), "bob", 1),
    ]
    assert exports[0].intervals[0].start_ms == parse_time_ms("1742802739000", "t")
    (tmp_path / "labels.csv").write_text("file,subject,label,start,end\na.fit,alice,walking,5,1\n")
    with pytest.raises(DataError, match="not after start"):
        read_labels(tmp_path, LABELS)
    with pytest.raises(DataError, match=re.escape("labels.csv")):
        read_labels(tmp_path / "none", LABELS)


def test_garmin_source_end_to_end_through_the_agent_decoder(tmp_path):
    """Study CSV pairs + labels.csv -> prepare: windows decoded and cut by the agent's own functions."""
    from datetime import datetime

    from har_edge.trainer.prepare import load_prepared, prepare

    folder = tmp_path / "study"
    folder.mkdir()
    rows = ["file,subject,label,start,end"]
    t0 = 1_742_802_739_000
    for k, subject in enumerate(("alice", "bob", "carol")):
        rng = np.random.default_rng(k)
        walk = synthetic.activity_signal("walking", 30, rng)
        sit = synthetic.activity_signal("sitting", 30, rng)
        start = t0 + k * 3_600_000
        acc, gyr = write_study_pair(folder, subject, np.concatenate([walk, sit]), start)
        iso = lambda ms: datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()  # noqa: E731
        rows.append(f"{acc}|{gyr},{subject},walking,{iso(start)},{iso(start + 30_000)}")
        rows.append(f"{acc}|{gyr},{subject},sitting,{start + 30_000},{start + 60_000}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    params = synthetic_params(
        tmp_path,
        tracking_uri="sqlite:///unused.db",
        data={"source": "garmin", "raw_dir": "study", "labels": ["walking", "sitting"]},
        split={"test_subjects": ["carol"], "val_subjects": 1},
    )
    s = load_settings(params)
    meta = prepare(s)
    p = load_prepared(s)
    assert set(p.subjects["test"]) == {"carol"} and len(set(p.subjects["train"])) == 1
    # 30 s of one label hold 14 windows of 4 s at a 2 s step; the 1 window across the change is dropped
    assert meta["per_class"]["test"] == {"walking": 14, "sitting": 14}
    assert meta["source"].startswith("garmin:") and len(meta["source_sha256"]) == 64
    walking = p.x["test"][p.y["test"] == 0]
    assert walking[:, :, 3:].std() > 5 and 9.0 < np.linalg.norm(walking[:, :, :3].mean(axis=(0, 1))) < 10.5


# -- prepare ------------------------------------------------------------------------


def test_prepare_splits_by_subject_and_fits_scaler_on_training_only(tmp_path):
    from har_edge.trainer.prepare import fit_scaler, load_prepared, prepare

    s = load_settings(synthetic_params(tmp_path, tracking_uri="sqlite:///unused.db"))
    meta = prepare(s)
    p = load_prepared(s)
    subs = {k: set(v.tolist()) for k, v in p.subjects.items()}
    assert not (subs["train"] & subs["val"]) and not (subs["train"] & subs["test"]) and not (subs["val"] & subs["test"])
    assert subs["test"] == set(meta["subjects"]["test"]) and len(subs["test"]) == 2
    mean, scale = fit_scaler(p.x["train"])
    np.testing.assert_array_equal(mean, p.mean)
    np.testing.assert_array_equal(scale, p.scale)
    assert p.x["train"].dtype == np.float32 and p.x["train"].shape[1:] == (200, 6)
    # byte-reproducible: the same params give the same file and hash
    first = meta["sha256"]
    assert prepare(s)["sha256"] == first
    assert json.loads(s.prepared_meta.read_text())["dvc_md5"] == meta["dvc_md5"]


def test_prepare_refuses_missing_test_subjects(tmp_path):
    from har_edge.trainer.prepare import prepare

    s = load_settings(synthetic_params(tmp_path, tracking_uri="sqlite:///unused.db"), ["split.test_subjects=[99]"])
    with pytest.raises(DataError, match=re.escape("split.test_subjects")):
        prepare(s)


# -- gate ---------------------------------------------------------------------------


def test_gate_names_the_failing_figure():
    from har_edge.trainer.settings import GateSettings

    g = GateSettings(min_int8_accuracy=0.9, min_agreement=0.99, max_size_kb=200)
    ok = check_gate({"int8_accuracy": 0.95, "agreement": 0.995, "int8_macro_f1": 0.9, "size_kb": 80}, g)
    assert ok.passed and not ok.failures
    bad = check_gate({"int8_accuracy": 0.95, "agreement": 0.97, "int8_macro_f1": 0.9, "size_kb": 250}, g)
    assert not bad.passed
    with pytest.raises(GateFailed) as e:
        bad.raise_if_failed("m 1")
    assert "agreement 0.9700 < 0.9900" in str(e.value) and "size" in str(e.value)
    assert "accuracy" not in str(e.value)
    assert not check_gate({}, g).passed

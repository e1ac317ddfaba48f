"""Bringing a study's own model in: ``har-train import`` -> release -> sync -> the agent runs it.

Real things throughout: a small seeded 1D-CNN-BiLSTM with a BatchNorm after the
BiLSTM, trained by TensorFlow on synthetic labelled exports and saved as .keras;
the exports decoded by the agent's decoders; LiteRT runs the int8 model; git and
DVC make the registry; MLflow is the session's server (or a local sqlite store).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sync_helpers import restore_mlflow_env  # noqa: F401 - fixture
from trainer_helpers import git, registry_repo, write_study_pair

from bench import study_model
from har_edge.agent.channels import ACCEL_MS2_PER_G, ChannelMap
from har_edge.agent.errors import ChecksumMismatch, ManifestError
from har_edge.agent.manifest import GOLDEN_FILE, MANIFEST_FILE, read_manifest
from har_edge.agent.model import BUNDLED_MODEL_DIR, load_model
from har_edge.common.cli import Exit
from har_edge.trainer.cli import main
from har_edge.trainer.data.synthetic import activity_signal

LABELS = [
    "walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "lying", "running", "shaking",
]  # fmt: skip
RATE, WINDOW, STEP = 50.0, 200, 100
SECONDS = 24.0
T0_MS = 1_742_802_739_000
NAME = "study-cnn"


# -- fast checks of the manifest contract -----------------------------------------------------


def test_a_v1_manifest_still_loads(tmp_path):
    """The bundled model's manifest as version 1 wrote it (tests/fixtures/manifest-v1.json) reads as version 2."""
    v1 = Path(__file__).parent / "fixtures" / "manifest-v1.json"
    raw = json.loads(v1.read_text())
    assert raw["schema_version"] == 1 and "reference" not in raw
    (tmp_path / MANIFEST_FILE).write_text(v1.read_text())
    m = read_manifest(tmp_path)
    assert m.schema_version == 2 and m.measured == {} and m.accepted_unmeasured == [] and m.source_files == []
    assert m.reference is None
    assert m.channel_map.identity
    assert read_manifest(BUNDLED_MODEL_DIR).schema_version == 2


def test_channels_are_matched_by_spelling_in_any_order_and_converted():
    cm = ChannelMap.from_channels(
        [
            ("Gz", "rad/s"),
            ("accel_x", "g"),
            ("Ay", "milli-g"),
            ("acc_z", "m/s^2"),
            ("gyr_x", "deg/s"),
            ("GYRO_Y", "dps"),
        ]
    )
    stream = np.arange(12, dtype=np.float32).reshape(1, 2, 6) + 1
    out = cm.to_model(stream)
    np.testing.assert_allclose(out[0, :, 0], stream[0, :, 5] * np.pi / 180, rtol=1e-6)
    np.testing.assert_allclose(out[0, :, 1], stream[0, :, 0] / ACCEL_MS2_PER_G, rtol=1e-6)
    np.testing.assert_allclose(out[0, :, 2], stream[0, :, 1] * 1000 / ACCEL_MS2_PER_G, rtol=1e-6)
    np.testing.assert_allclose(cm.to_stream(out), stream, rtol=1e-5)


@pytest.mark.parametrize(
    "channel, needle", [({"name": "acc_x", "unit": "furlong/s^2"}, "furlong"), ({"name": "temp", "unit": "g"}, "temp")]
)
def test_an_unknown_unit_or_channel_is_refused_at_load_named(tmp_path, channel, needle):
    folder = tmp_path / "m"
    shutil.copytree(BUNDLED_MODEL_DIR, folder)
    doc = json.loads((folder / MANIFEST_FILE).read_text())
    doc["channels"][0] = channel
    (folder / MANIFEST_FILE).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=needle):
        load_model(folder)


# -- the study ---------------------------------------------------------------------------------


def _signal(label: str, rng: np.random.Generator, mount: np.ndarray, bias: np.ndarray) -> np.ndarray:
    base = {"running": "walking", "shaking": "standing"}.get(label, label)
    sig = activity_signal(base, SECONDS, rng, rate_hz=RATE, mount=mount, gyro_bias=bias).astype(np.float64)
    t = np.arange(len(sig)) / RATE
    if label == "running":  # harder, faster bouncing
        mean = sig.mean(axis=0)
        sig = mean + 2.2 * (sig - mean)
    elif label == "shaking":  # a 6 Hz tremor of the wrist
        sig[:, 1] += 3.0 * np.sin(2 * np.pi * 6 * t)
        sig[:, 5] += 90.0 * np.sin(2 * np.pi * 6 * t + 0.5)
    return sig.astype(np.float32)


def _recording(subject: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """(samples (n, 6) SI, [(first sample, end sample, label)]) with every class once, in a random order."""
    return study_model.recording(subject, LABELS, _signal, seed=11)


def _windows(samples: np.ndarray, spans, step: int) -> tuple[np.ndarray, np.ndarray]:
    return study_model.windows(samples, spans, WINDOW, step)


@dataclass
class Study:
    root: Path
    keras: Path
    labels: Path
    scaler: Path
    exports: list[Path]
    val_accuracy: float
    mean: np.ndarray
    scale: np.ndarray
    tracking_uri: str


@pytest.fixture(scope="module")
def tracking_uri(request, tmp_path_factory) -> str:
    try:
        return request.getfixturevalue("mlflow_server").url
    except pytest.FixtureLookupError:
        return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def study(tmp_path_factory, tracking_uri) -> Study:
    """What a study hands over: model.keras, labels.json, scaler.json, and labelled exports of other subjects."""
    root = tmp_path_factory.mktemp("study")
    xs, ys = [], []
    for subject in range(1, 7):
        samples, spans = _recording(subject)
        x, y = _windows(samples, spans, 50)
        xs.append(x)
        ys.append(y)
    x_train, y_train = np.concatenate(xs), np.concatenate(ys)
    mean = x_train.reshape(-1, 6).mean(axis=0)
    scale = x_train.reshape(-1, 6).std(axis=0)

    exports: list[Path] = []
    data = root / "exports"
    data.mkdir()
    val_x, val_y = [], []
    for k, subject in enumerate(range(7, 11)):
        samples, spans = _recording(subject)
        t0 = T0_MS + k * 3_600_000
        acc_name, gyro_name = write_study_pair(data, f"s{subject:02d}", samples, t0, rate_hz=RATE)
        labelled = data / f"s{subject:02d}.labels.csv"
        study_model.write_labels(labelled, spans, LABELS, t0_ms=t0, rate_hz=RATE, subject=f"s{subject:02d}")
        exports += [data / acc_name, data / gyro_name]
        x, y = _windows(samples, spans, STEP)
        val_x.append(x)
        val_y.append(y)

    model = study_model.build(study_model.SMALL, WINDOW, len(LABELS))
    vx, vy = (np.concatenate(val_x) - mean) / scale, np.concatenate(val_y)
    model.fit((x_train - mean) / scale, y_train, epochs=12, batch_size=32, verbose=0, validation_data=(vx, vy))
    val_accuracy = float((model.predict(vx, verbose=0).argmax(1) == vy).mean())
    study_model.save(root, model, LABELS, mean, scale)
    return Study(
        root, root / "model.keras", root / "labels.json", root / "scaler.json", exports, val_accuracy, mean, scale,
        tracking_uri,
    )  # fmt: skip


def _import(study: Study, out: Path, *extra: str, name: str = NAME, version: str = "1.0.0") -> int:
    return main(
        [
            "--set", f"mlflow.tracking_uri={study.tracking_uri}",
            "--set", "mlflow.experiment=own-model-tests",
            "--set", f"data.cache_dir={study.root / 'cache'}",
            "--set", "gate.max_size_kb=2000",
            "--set", "gate.min_agreement=0.97",
            "--set", "gate.min_int8_accuracy=0.7",
            "import", str(study.keras), "--labels", str(study.labels), "--scaler", str(study.scaler),
            "--name", name, "--version", version, "-o", str(out), *extra,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def imported(study, tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("imported") / NAME
    t0 = time.perf_counter()
    assert _import(study, out, "--data", *map(str, study.exports), "--labelled") == Exit.OK
    return out, time.perf_counter() - t0


@pytest.mark.slow
def test_the_study_model_trains_to_a_stated_accuracy(study):
    assert study.val_accuracy >= 0.8, study.val_accuracy


@pytest.mark.slow
def test_import_converts_to_full_int8_that_agrees_with_the_float_model(imported, study, capsys):
    folder, seconds = imported
    m = read_manifest(folder)
    assert (m.input_dtype, m.output_dtype) == ("int8", "int8")
    assert m.labels == LABELS and m.window == WINDOW and m.step == STEP
    fig = {k: v.value for k, v in m.measured.items()}
    assert fig["rebuild_unrolled_max_dp"] <= 1e-5 and fig["rebuild_folded_max_dp"] <= 1e-5
    assert m.training["folded_batchnorms"] and m.training["unrolled_layers"]
    assert fig["agreement"] >= 0.97, m.measured["agreement"]
    assert fig["agreement_margin"] >= 0.99, m.measured["agreement_margin"]
    assert fig["int8_accuracy"] is not None and fig["int8_macro_f1"] is not None
    assert "worst" not in m.measured or m.measured["int8_accuracy_worst_subject"].value is not None
    assert "build host" in m.measured["ms_per_window"].on and "held-out" in m.measured["agreement"].on
    assert m.calibration["source"] == "exports" and m.calibration["check_files"]
    check = set(m.calibration["check_files"])
    assert check and check < set(m.calibration["files"])  # whole exports held out from calibration
    assert set(m.source_files) == {"source.keras", "source_unrolled.keras"}
    for f in m.source_files:
        assert (folder / f).is_file()
    with np.load(folder / GOLDEN_FILE) as g:
        assert g["windows"].shape[1:] == (WINDOW, 6) and g["probs"].shape == (m.golden.count, len(LABELS))
    load_model(folder)
    with capsys.disabled():
        print(
            f"\n[measure] import of a {len(LABELS)}-class CNN-BiLSTM with --data ({len(study.exports) // 2} exports):"
            f" {seconds:.1f} s; agreement {fig['agreement']:.4f} ({m.measured['agreement'].on}), "
            f"{fig['agreement_margin']:.4f} where margin >= 0.1, max |dp| {fig['max_dp']:.4f}; "
            f"{fig['ms_per_window']:.3f} ms/window ({m.measured['ms_per_window'].on}); "
            f"int8 accuracy {fig['int8_accuracy']:.3f}, macro-F1 {fig['int8_macro_f1']:.3f}; "
            f"{fig['size_kb']:.0f} KB; float val accuracy {study.val_accuracy:.3f}"
        )


@pytest.mark.slow
def test_the_import_is_its_own_mlflow_run_registered_under_the_name(imported, study):
    from mlflow import MlflowClient

    m = read_manifest(imported[0])
    c = MlflowClient(study.tracking_uri)
    run = c.get_run(m.mlflow_run_id)
    assert run.info.run_name == f"import {NAME} 1.0.0"
    assert run.data.tags["har.model_name"] == NAME and run.data.tags["har.run_kind"] == "import"
    assert run.data.metrics["agreement"] == pytest.approx(m.metrics["agreement"])
    versions = c.search_model_versions(f"name = '{NAME}'")
    assert [v.tags["sha256"] for v in versions] == [m.sha256]
    arts = [a.path for a in c.list_artifacts(m.mlflow_run_id, "model")]
    assert "model/source.keras" in arts and "model/source_unrolled.keras" in arts


@pytest.mark.slow
def test_release_sync_and_the_agent_run_the_imported_model(imported, study, tmp_path):
    from fitgen import write_imu_fit

    from har_edge.agent.daemon import Agent
    from har_edge.agent.settings import load_settings
    from har_edge.sync.models import ModelManager

    repo, origin = registry_repo(tmp_path)
    args = [
        "--set", f"mlflow.tracking_uri={study.tracking_uri}",
        "--set", f"data.cache_dir={study.root / 'cache'}",
        "--set", "gate.max_size_kb=2000", "--set", "gate.min_agreement=0.97", "--set", "gate.min_int8_accuracy=0.7",
        "release", str(imported[0]), "--registry", str(repo), "--remote", str(tmp_path / "dvc-remote"),
    ]  # fmt: skip
    assert main(args) == Exit.OK
    assert f"{NAME}@v1.0.0" in git(tmp_path, "ls-remote", "--tags", str(origin))

    data_dir = tmp_path / "var"
    settings = load_settings(
        env={}, data_dir=data_dir, device_id="dev-own", agent={"settle_s": 0.0},
        sync={"registry": str(origin), "model_name": NAME},
    )  # fmt: skip
    agent = Agent(settings)
    report = ModelManager(settings, agent.outbox).update(time.time())
    assert report.activated == "1.0.0", report.summary()
    write_imu_fit(agent.folder.inbox / "walk.fit", rate_hz=50, seconds=60, seed=11)
    (outcome,) = agent.step(now=1e9)
    assert outcome.status == "processed"
    row = agent.outbox.file(outcome.file_id)
    assert (row.model_name, row.model_version) == (NAME, "1.0.0")
    released = repo / "models" / NAME
    assert (released / "source.keras").is_file() and (released / "source_unrolled.keras").is_file()


@pytest.mark.slow
def test_a_g_unit_twin_gives_the_same_labels_and_needs_accepting_unmeasured(study, imported, tmp_path, capsys):
    from fitgen import write_imu_fit

    from har_edge.agent.decode.fit import decode_fit
    from har_edge.agent.preprocess import recording_windows

    g = np.where(np.arange(6) < 3, ACCEL_MS2_PER_G, 1.0)
    scaler = tmp_path / "scaler_g.json"
    scaler.write_text(json.dumps({"mean_": (study.mean / g).tolist(), "scale_": (study.scale / g).tolist()}))
    twin = tmp_path / "twin"
    args = ["--units", "acc=g", "--channels", "Ax,Ay,Az,Gx,Gy,Gz", "--data", *map(str, study.exports)]
    s = Study(**{**study.__dict__, "scaler": scaler})
    assert _import(s, twin, *args, name="study-cnn-g") == Exit.OK
    mt = read_manifest(twin)
    assert [c.unit for c in mt.channels] == ["g"] * 3 + ["deg/s"] * 3
    assert mt.measured["int8_accuracy"].value is None

    fit = write_imu_fit(tmp_path / "walk.fit", rate_hz=50, seconds=120, seed=4).path
    ws = recording_windows(decode_fit(fit, fit.name), rate_hz=RATE, window=WINDOW, step=STEP)
    a = load_model(imported[0]).predict(ws.windows).argmax(1)
    b = load_model(twin).predict(ws.windows).argmax(1)
    assert len(a) > 20 and (a == b).mean() >= 0.99, (a != b).sum()
    with capsys.disabled():
        print(f"\n[measure] m/s^2 model vs g-unit twin, one FIT export: {int((a == b).sum())} of {len(a)} labels equal")

    # release: refused while accuracy is unmeasured, accepted by name and recorded
    repo = tmp_path / "registry"
    git(tmp_path, "init", "-q", "-b", "main", str(repo))
    git(repo, "commit", "-q", "--allow-empty", "-m", "model registry")
    base = [
        "--set", f"mlflow.tracking_uri={study.tracking_uri}", "--set", f"data.cache_dir={study.root / 'cache'}",
        "--set", "gate.max_size_kb=2000", "--set", "gate.min_agreement=0.97", "--set", "gate.min_int8_accuracy=0.7",
        "release", str(twin), "--registry", str(repo), "--remote", str(tmp_path / "dvc-remote"),
    ]  # fmt: skip
    assert main(base) == Exit.GATE
    assert main([*base, "--accept-unmeasured", "accuracy,macro_f1"]) == Exit.OK
    mt = read_manifest(twin)
    assert mt.accepted_unmeasured == ["int8_accuracy", "int8_macro_f1"]
    assert "accepted_unmeasured=int8_accuracy,int8_macro_f1" in git(repo, "tag", "-l", "--format=%(contents)")
    from mlflow import MlflowClient

    c = MlflowClient(study.tracking_uri)
    assert c.get_run(mt.mlflow_run_id).data.tags["har.accepted_unmeasured"] == "int8_accuracy,int8_macro_f1"


@pytest.mark.slow
def test_a_float_tflite_imports_and_runs_in_the_agent(study, tmp_path):
    import keras
    import tensorflow as tf

    from har_edge.trainer.importer.convert import rebuild

    rb = rebuild(keras.models.load_model(study.keras, compile=False))
    flat = tmp_path / "float.tflite"
    flat.write_bytes(tf.lite.TFLiteConverter.from_keras_model(rb.unrolled).convert())
    out = tmp_path / "float-import"
    s = Study(**{**study.__dict__, "keras": flat})
    assert _import(s, out, "--data", *map(str, study.exports[:4]), name="study-float") in (Exit.OK, Exit.GATE)
    m = read_manifest(out)
    assert m.source_files == ["source_float.tflite"]
    quantized = m.measured["quantized"].value == 1.0
    assert quantized or m.measured["quantized"].on == "not quantized"
    model = load_model(out)  # the agent's loader, float input path included
    assert model.runner.input_dtype.name == m.input_dtype
    x = np.repeat(study.mean[None, None, :], WINDOW, axis=1).astype(np.float32)
    p = model.predict(x)
    assert p.shape == (1, len(LABELS)) and abs(float(p.sum()) - 1) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--units", "acc=furlong"], "furlong"),
        (["--labels", "a,b,c,d,e,f,g"], "lists 7"),
        (["--window", "100"], "windows of 200"),
        (["--channels", "acc_x,acc_y,acc_z"], "takes 6 channels"),
    ],
)
def test_bad_imports_are_refused_with_a_clear_message(study, tmp_path, capsys, extra, needle):
    args = [*extra]
    if extra[0] == "--labels":  # replaces the study's labels
        code = main(
            ["--set", f"mlflow.tracking_uri={study.tracking_uri}", "import", str(study.keras), *extra,
             "--name", "x", "--version", "1.0.0", "-o", str(tmp_path / "x")]
        )  # fmt: skip
    else:
        code = _import(study, tmp_path / "x", *args)
    assert code == Exit.FAILED
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_missing_golden_file_is_refused_and_har_train_golden_regenerates_it(imported, study, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(imported[0], folder)
    (folder / GOLDEN_FILE).unlink()
    with pytest.raises(ChecksumMismatch, match=r"golden\.npz is missing"):
        load_model(folder)
    assert main(["golden", str(folder)]) == Exit.FAILED
    assert "--data" in capsys.readouterr().err
    assert main(["golden", str(folder), "--data", *map(str, study.exports[:2])]) == Exit.OK
    m = load_model(folder).manifest
    with np.load(folder / GOLDEN_FILE) as g:
        assert g["windows"].shape == (m.golden.count, WINDOW, 6)


# -- identity and the health gate (real git + DVC registry, real outbox) ----------------------------


def _sync_settings(data_dir: Path, registry, **sync):
    from har_edge.agent.settings import load_settings

    return load_settings(
        env={}, data_dir=data_dir, device_id="dev-own", agent={"settle_s": 0.0}, sync={"registry": registry, **sync}
    )


def test_model_identity_is_name_and_version(tmp_path, data_dir):
    from sync_helpers import BUNDLED, RegistryRepo

    from har_edge.sync.errors import SyncError
    from har_edge.sync.models import ModelManager

    reg = RegistryRepo(tmp_path / "registry", name="study-har")
    reg.release(BUNDLED.version)  # the same version as the bundled model, another model
    mm = ModelManager(_sync_settings(data_dir, reg.url, model_name="study-har"))
    report = mm.update(time.time())
    assert report.activated == BUNDLED.version, report.summary()  # the bundled model is no reason to skip it
    assert read_manifest(mm.folder_of(mm.pointers()[0])).name == "study-har"
    assert mm.pin_version(f"study-har@{BUNDLED.version}", time.time()).note == (
        f"study-har@{BUNDLED.version} is already active"
    )
    with pytest.raises(SyncError, match=r"follows study-har: set sync\.model_name = har-cnn"):
        mm.pin_version("har-cnn@1.0.0", time.time())

    other = ModelManager(_sync_settings(tmp_path / "var2", reg.url, model_name="har-cnn"))
    assert other.update(time.time()).note == (
        "the registry has releases of study-har; you follow har-cnn: set sync.model_name"
    )


def test_models_verify_checks_agent_model_dir(tmp_path, data_dir):
    from har_edge.sync.models import ModelManager

    broken = tmp_path / "mine"
    shutil.copytree(BUNDLED_MODEL_DIR, broken)
    (broken / "model.tflite").write_bytes(b"not a model")
    from har_edge.agent.settings import load_settings

    mm = ModelManager(load_settings(env={}, data_dir=data_dir, device_id="d", agent={"model_dir": str(broken)}))
    ((label, _version, problem),) = mm.verify_installed()
    assert label == f"agent.model_dir {broken}" and problem is not None and "sha256" in problem


def test_the_health_gate_compares_confidence_only_across_the_same_label_set(tmp_path):
    from sync_helpers import add_file

    from har_edge.agent.outbox import Outbox
    from har_edge.agent.settings import SyncSettings
    from har_edge.sync.health import judge
    from har_edge.sync.state import Probation

    ob = Outbox(tmp_path / "outbox.db")
    six = ["walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "lying"]
    eleven = [f"behaviour_{i}" for i in range(11)]
    old_sha, new_sha = "a" * 64, "b" * 64
    for seed in range(3):
        add_file(ob, seed, minutes=2, labels=six, model_sha256=old_sha, confidence=0.95, processed_ms=1000 + seed)
    since = 10_000
    for seed in range(3, 6):
        add_file(ob, seed, minutes=2, labels=eleven, model_sha256=new_sha, confidence=0.4, processed_ms=since + seed)
    p = Probation(
        folder="2.0.0", version="2.0.0", sha256=new_sha, since_ms=since,
        previous_folder="1.0.0", previous_version="1.0.0", previous_sha256=old_sha,
    )  # fmt: skip
    s = SyncSettings()
    differ = judge(ob, p, s, labels=(eleven, six))
    assert differ.state == "healthy" and "confidence not compared: label sets differ" in differ.reason
    same = judge(ob, p, s, labels=(six, six))  # what the old gate did: 11-class vs 6-class confidence
    assert same.state == "failed" and "mean confidence" in same.reason and "criteria" in same.reason


def test_the_saturation_criterion_of_the_health_gate_is_a_setting(tmp_path):
    from sync_helpers import add_file

    from har_edge.agent.outbox import Outbox
    from har_edge.agent.settings import SyncSettings
    from har_edge.sync.health import judge
    from har_edge.sync.state import Probation

    ob = Outbox(tmp_path / "outbox.db")
    new_sha, since = "c" * 64, 10_000
    for seed in range(3):  # a fifth of gyro_z beyond the int8 input range: a units or scaler mismatch
        outside = {"input_outside_share_gyro_z": 0.2, "input_outside_share_acc_x": 0.01}
        add_file(ob, seed, minutes=2, model_sha256=new_sha, processed_ms=since + seed, quality=outside)
    p = Probation(folder="2.0.0", version="2.0.0", sha256=new_sha, since_ms=since)
    default = judge(ob, p, SyncSettings())
    assert default.state == "failed" and "20.0% of the scaled inputs" in default.reason
    assert "sync.health_max_input_outside_share=0.05" in default.reason
    lenient = judge(ob, p, SyncSettings(health_max_input_outside_share=0.25))
    assert lenient.state == "healthy" and "inputs beyond int8 range 20.00%" in lenient.reason


@pytest.mark.slow
def test_when_the_quantizer_fails_a_float_tflite_runs_as_a_float_model(study, tmp_path, monkeypatch):
    """ai-edge-quantizer handles our float model, so its failure is forced (the fallback path is the subject)."""
    import keras
    import tensorflow as tf

    from har_edge.trainer.importer import run as import_run
    from har_edge.trainer.importer.convert import rebuild

    def refuse(*_a, **_k):
        raise RuntimeError("unsupported op (forced by the test)")

    monkeypatch.setattr(import_run, "_quantize_tflite", refuse)
    rb = rebuild(keras.models.load_model(study.keras, compile=False))
    flat = tmp_path / "float.tflite"
    flat.write_bytes(tf.lite.TFLiteConverter.from_keras_model(rb.unrolled).convert())
    out = tmp_path / "float-model"
    s = Study(**{**study.__dict__, "keras": flat})
    assert _import(s, out, "--data", *map(str, study.exports[:4]), name="study-float") == Exit.OK
    m = read_manifest(out)
    assert (m.input_dtype, m.output_dtype) == ("float32", "float32")
    assert m.measured["quantized"].on == "not quantized" and m.measured["agreement"].value is None
    assert "not quantized" in m.measured["agreement"].on
    model = load_model(out)  # the agent's float path: no quantization of the input, golden windows reproduce
    assert model.input_range() is None
    fit_windows = np.repeat(study.mean[None, None, :], WINDOW, axis=1).astype(np.float32)
    assert model.predict(fit_windows).shape == (1, len(LABELS))


@pytest.mark.slow
def test_a_savedmodel_imports_unless_it_is_recurrent(tmp_path, capsys, study):
    import keras

    keras.utils.set_random_seed(2)
    L = keras.layers
    cnn = keras.Sequential([keras.Input((WINDOW, 6)), L.Conv1D(8, 5, activation="relu"), L.GlobalAveragePooling1D(),
                            L.Dense(4, activation="softmax")])  # fmt: skip
    cnn.export(str(tmp_path / "cnn"))
    rnn = keras.Sequential([keras.Input((WINDOW, 6)), L.Bidirectional(L.LSTM(4)), L.Dense(4, activation="softmax")])
    rnn.export(str(tmp_path / "rnn"))
    base = ["--set", f"mlflow.tracking_uri={study.tracking_uri}", "import"]
    tail = ["--labels", "a,b,c,d", "--name", "sm", "--version", "1.0.0", "--data", *map(str, study.exports[:4])]
    assert main([*base, str(tmp_path / "cnn"), *tail, "-o", str(tmp_path / "o1")]) == Exit.OK
    assert read_manifest(tmp_path / "o1").training["source_kind"] == "savedmodel"
    capsys.readouterr()
    assert main([*base, str(tmp_path / "rnn"), *tail, "-o", str(tmp_path / "o2")]) == Exit.FAILED
    assert "save it as .keras" in capsys.readouterr().err


@pytest.mark.slow
def test_without_data_windows_come_from_the_baseline_and_the_manifest_says_so(study, tmp_path):
    names = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]
    stats = {n: {"mean": float(mu), "std": float(sd), "min": -1e3, "max": 1e3}
             for n, mu, sd in zip(names, study.mean, study.scale, strict=True)}  # fmt: skip
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"channels": stats, "classes": {"walking": stats}}))
    out = tmp_path / "nodata"
    code = _import(study, out, "--baseline", str(baseline), name="study-nodata")
    assert code in (Exit.OK, Exit.GATE)
    m = read_manifest(out)
    assert m.calibration["source"] == "baseline-statistics" and "no --data" in m.calibration["warning"]
    assert "indicative only" in m.measured["agreement"].on
    assert m.training["baseline"]["channels"]["acc_x"]["mean"] == pytest.approx(float(study.mean[0]))


def test_every_file_records_inputs_beyond_the_int8_range_and_gyro_saturation(data_dir):
    from fitgen import walk_signal, write_imu_fit

    from har_edge.agent.daemon import Agent
    from har_edge.agent.settings import load_settings

    def spinning(t: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        accel, gyro = walk_signal(t, rng)
        gyro[:, 2] = np.where(np.sin(2 * np.pi * 0.2 * t) > 0, 2000.0, gyro[:, 2])  # clipped at the sensor's range
        return accel, gyro

    agent = Agent(load_settings(env={}, data_dir=data_dir, device_id="dev-q", agent={"settle_s": 0.0}))
    write_imu_fit(agent.folder.inbox / "spin.fit", rate_hz=50, seconds=60, seed=3, signal=spinning)
    (outcome,) = agent.step(now=1e9)
    assert outcome.status == "processed"
    q = {p.key: p.value for p in agent.outbox.file_metrics(outcome.file_id) if p.key.startswith("quality_")}
    assert 0.4 < q["quality_gyro_saturated_share"] < 0.6
    channels = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]
    shares = {c: q[f"quality_input_outside_share_{c}"] for c in channels}
    assert shares["gyro_z"] > 0.3, shares  # 2000 deg/s is far beyond the bundled model's int8 input range
    assert shares["gyro_x"] < 0.01 and shares["acc_x"] < 0.01, shares


@pytest.mark.slow
def test_a_labelled_study_folder_gives_int8_accuracy(study, tmp_path):
    from datetime import UTC, datetime

    folder = tmp_path / "study-folder"
    folder.mkdir()
    rows = ["file,subject,label,start,end"]
    for acc, gyro in zip(study.exports[::2], study.exports[1::2], strict=True):
        shutil.copy(acc, folder)
        shutil.copy(gyro, folder)
        prefix = acc.name.split("-accelerometer")[0]
        for line in (acc.parent / f"{prefix}.labels.csv").read_text().splitlines()[1:]:
            a, b, label, subject = line.split(",")
            iso = datetime.fromtimestamp(int(a) / 1000, tz=UTC).isoformat()
            rows.append(f"{acc.name}|{gyro.name},{subject},{label},{iso},{b}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "from-folder"
    assert _import(study, out, "--data", str(folder), "--labelled", name="study-folder") == Exit.OK
    m = read_manifest(out)
    assert m.measured["int8_accuracy"].value is not None and m.calibration["source"] == "exports"
    assert len(m.calibration["files"]) == 4 and m.calibration["check_files"]

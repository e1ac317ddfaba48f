"""The trainer end to end on small synthetic data: pipeline, edge runtime, gate, MLflow, DVC release.

Real things throughout: TensorFlow trains and converts, ai-edge-litert runs the
export, MLflow is the session's server (``mlflow_server`` in conftest) or a
local sqlite store, git and dvc run on temporary repositories.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from trainer_helpers import dvc, git, registry_repo, synthetic_params

from har_edge.agent.errors import ModelValidationError
from har_edge.agent.manifest import GOLDEN_FILE, MANIFEST_FILE, MODEL_FILE, read_manifest
from har_edge.agent.model import load_model
from har_edge.common.cli import Exit
from har_edge.common.hashing import sha256_file
from har_edge.trainer.cli import main
from har_edge.trainer.errors import GateFailed, ReleaseError
from har_edge.trainer.settings import Settings, load_settings

pytestmark = pytest.mark.slow

INT8_BUILTINS = {
    "CONV_2D",
    "MAX_POOL_2D",
    "MEAN",
    "FULLY_CONNECTED",
    "SOFTMAX",
    "RESHAPE",
    "EXPAND_DIMS",
    "QUANTIZE",
    "DEQUANTIZE",
}


@dataclass
class Pipeline:
    root: Path
    params: Path
    settings: Settings
    folder: Path


@pytest.fixture(scope="module")
def tracking_uri(request, tmp_path_factory) -> str:
    """The session's MLflow server when conftest offers one, else a local sqlite store."""
    try:
        return request.getfixturevalue("mlflow_server").url
    except pytest.FixtureLookupError:
        return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tracking_uri) -> Pipeline:
    root = tmp_path_factory.mktemp("trainer")
    params = synthetic_params(root, tracking_uri=tracking_uri)
    for stage in ("prepare", "train", "evaluate", "export"):
        assert main(["--params", str(params), stage]) == Exit.OK, stage
    s = load_settings(params)
    return Pipeline(root, params, s, s.model_dir)


def test_pipeline_writes_every_stage_output(pipeline):
    s = pipeline.settings
    for path in (
        s.prepared_file,
        s.prepared_meta,
        s.train_dir / "model.keras",
        s.train_dir / "run.json",
        s.eval_dir / "metrics.json",
        s.eval_dir / "report.json",
        s.eval_dir / "model_int8.tflite",
    ):
        assert path.is_file(), path
    assert (s.eval_dir / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((s.eval_dir / "metrics.json").read_text())["metrics"]
    assert metrics["int8_accuracy"] >= 0.6 and metrics["agreement"] >= 0.9
    report = json.loads((s.eval_dir / "report.json").read_text())
    assert set(report["labels"]) <= set(report["int8"]["report"])
    assert sorted(p.name for p in pipeline.folder.iterdir()) == sorted([MODEL_FILE, MANIFEST_FILE, GOLDEN_FILE])


def test_export_loads_in_edge_runtime_and_reproduces_golden(pipeline):
    s = pipeline.settings
    m = load_model(pipeline.folder)  # sha256, shapes vs manifest, golden windows
    assert m.runner.runtime == "ai_edge_litert"
    assert (m.runner.window, m.runner.channels) == (m.manifest.window, m.manifest.n_channels) == (200, 6)
    assert m.runner.output_size == len(m.manifest.labels)
    assert m.manifest.labels == list(s.data.labels)
    assert m.runner.input_dtype == np.int8 and m.runner.output_dtype == np.int8
    assert [c.name for c in m.manifest.channels] == ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]
    assert m.manifest.sha256 == sha256_file(pipeline.folder / MODEL_FILE)
    assert m.manifest.data_hash == "sha256:" + sha256_file(s.prepared_file)
    assert m.manifest.training["gate"]["passed"] is True
    # golden.npz: plain arrays, raw SI windows, outputs of this int8 model
    with np.load(pipeline.folder / GOLDEN_FILE, allow_pickle=False) as g:
        windows, probs = g["windows"], g["probs"]
    assert windows.dtype == np.float32 and windows.shape == (m.manifest.golden.count, 200, 6)
    assert probs.shape == (m.manifest.golden.count, len(m.manifest.labels))
    np.testing.assert_allclose(m.predict(windows), probs, atol=1e-6)
    # the manifest's scaler is the training one: the edge reproduces evaluate's int8 outputs on raw windows
    with np.load(s.prepared_file) as z:
        x_test = z["x_test"]
    with np.load(s.eval_dir / "predictions.npz") as z:
        np.testing.assert_allclose(m.predict(x_test), z["int8_probs"], atol=1e-6)


def test_export_uses_int8_builtin_ops_only(pipeline):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(pipeline.folder / MODEL_FILE))
    ops = {op["op_name"] for op in it._get_ops_details()}
    assert ops <= INT8_BUILTINS, ops - INT8_BUILTINS
    assert it.get_input_details()[0]["dtype"] == np.int8 and it.get_output_details()[0]["dtype"] == np.int8


def test_tampered_golden_outputs_are_refused(pipeline, tmp_path):
    from har_edge.trainer.npzio import save_npz

    folder = tmp_path / "m"
    shutil.copytree(pipeline.folder, folder)
    with np.load(folder / GOLDEN_FILE) as g:
        windows, probs = g["windows"], g["probs"]
    save_npz(folder / GOLDEN_FILE, {"windows": windows, "probs": np.roll(probs, 1, axis=1)})
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["golden"]["sha256"] = sha256_file(folder / GOLDEN_FILE)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelValidationError, match="golden"):
        load_model(folder)


def test_mlflow_received_params_metrics_artifacts(pipeline, tracking_uri):
    from mlflow import MlflowClient

    s = pipeline.settings
    manifest = read_manifest(pipeline.folder)
    c = MlflowClient(tracking_uri)
    run = c.get_run(manifest.mlflow_run_id)
    assert c.get_experiment(run.info.experiment_id).name == "trainer-tests"
    assert run.info.run_name == "tcnn-v1.0.0-synthetic" and run.info.status == "FINISHED"
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["train.epochs"] == "5" and p["data.window"] == "200" and p["data.source"] == "synthetic"
    assert float(p["scaler.mean.acc_x"]) == pytest.approx(manifest.scaler.mean[0], abs=1e-5)
    assert float(p["scaler.scale.gyro_z"]) == pytest.approx(manifest.scaler.scale[5], abs=1e-5)
    meta = json.loads(s.prepared_meta.read_text())
    assert t["har.run_kind"] == "test" and t["har.data_dvc_md5"] == meta["dvc_md5"] == md5_file(s.prepared_file)
    assert t["har.data_sha256"] == meta["sha256"] and t["har.sha256"] == manifest.sha256 and t["har.gate"] == "passed"
    epochs = manifest.training["epochs_run"]
    history = c.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(h.step for h in history) == list(range(epochs))
    for key in ("int8_accuracy", "agreement", "int8_macro_f1", "float_accuracy"):
        assert m[key] == pytest.approx(manifest.metrics[key])
    names = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"eval", "model", "data", MANIFEST_FILE} <= names
    assert {"eval/confusion.png", "eval/report.json", "eval/metrics.json"} <= {
        a.path for a in c.list_artifacts(run.info.run_id, "eval")
    }
    assert "model/model.tflite" in {a.path for a in c.list_artifacts(run.info.run_id, "model")}


def md5_file(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def test_gate_refuses_an_untrained_model(pipeline, tmp_path, capsys, tracking_uri):
    params = synthetic_params(tmp_path, tracking_uri=tracking_uri, train={"epochs": 0}, export={"name": "untrained"})
    assert main(["--params", str(params), "all"]) == Exit.GATE
    err = capsys.readouterr().err
    assert "failed the gate" in err and "int8 held-out accuracy" in err and "min_int8_accuracy" in err
    s = load_settings(params)
    assert not s.model_dir.exists()
    from mlflow import MlflowClient

    run_id = json.loads((s.train_dir / "run.json").read_text())["run_id"]
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.data.tags["har.gate"] == "failed" and "min_int8_accuracy" in run.data.tags["har.gate_failures"]


# -- release ---------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path):
    """A registry working repo whose origin is a bare repo, and an empty local DVC remote."""
    repo, origin = registry_repo(tmp_path)
    return repo, origin, tmp_path / "dvc-remote"


def test_release_publishes_a_fetchable_version_idempotently(pipeline, registry, tmp_path, tracking_uri):
    from mlflow import MlflowClient

    from har_edge.trainer.release import release

    repo, origin, remote = registry
    s = pipeline.settings
    manifest = read_manifest(pipeline.folder)
    r = release(s, pipeline.folder, registry=str(repo), remote=str(remote))
    assert r.created and r.git_pushed and r.tag == "tcnn@v1.0.0" and r.mlflow_created
    assert "tcnn@v1.0.0" in git(tmp_path, "ls-remote", "--tags", str(origin))

    # what the edge sync daemon does: dvc get of the tag from the shared registry
    stage = tmp_path / "staging"
    dvc(tmp_path, "get", str(origin), "models/tcnn", "--rev", r.tag, "-o", str(stage))
    assert sha256_file(stage / MODEL_FILE) == manifest.sha256
    assert sha256_file(stage / GOLDEN_FILE) == manifest.golden.sha256
    load_model(stage)

    # MLflow registry: version with the DVC revision and sha256, alias on the newest
    c = MlflowClient(tracking_uri)
    mv = c.get_model_version("tcnn", r.mlflow_version)
    assert mv.tags["sha256"] == manifest.sha256 and mv.tags["dvc_rev"] == r.commit and mv.tags["git_tag"] == r.tag
    assert mv.run_id == manifest.mlflow_run_id and mv.source.startswith(f"runs:/{manifest.mlflow_run_id}/")
    assert c.get_model_version_by_alias("tcnn", "newest").version == r.mlflow_version

    # again: nothing changes
    head = git(repo, "rev-parse", "HEAD")
    remote_files = sorted(p.relative_to(remote) for p in remote.rglob("*"))
    again = release(s, pipeline.folder, registry=str(repo), remote=str(remote))
    assert not again.created and not again.mlflow_created
    assert (again.commit, again.mlflow_version) == (r.commit, r.mlflow_version)
    assert git(repo, "rev-parse", "HEAD") == head and git(repo, "status", "--porcelain") == ""
    assert sorted(p.relative_to(remote) for p in remote.rglob("*")) == remote_files
    assert len(c.search_model_versions("name = 'tcnn'")) == 1


def _edited_copy(folder: Path, dest: Path, edit) -> Path:
    shutil.copytree(folder, dest)
    doc = json.loads((dest / MANIFEST_FILE).read_text())
    edit(doc)
    (dest / MANIFEST_FILE).write_text(json.dumps(doc))
    return dest


def test_release_refuses_failed_gate_and_moved_tags(pipeline, registry, tmp_path):
    from har_edge.trainer.release import release

    repo, _origin, remote = registry
    s = pipeline.settings

    def low(doc):
        doc["metrics"]["int8_accuracy"] = 0.1

    def failed(doc):
        doc["training"]["gate"]["passed"] = False

    for edit in (low, failed):
        bad = _edited_copy(pipeline.folder, tmp_path / edit.__name__, edit)
        with pytest.raises(GateFailed):
            release(s, bad, registry=str(repo), remote=str(remote))
    assert git(repo, "tag") == ""

    # a version tag that already holds another model is never moved
    git(repo, "tag", "-a", "tcnn@v2.0.0", "-m", "tcnn 2.0.0\n\nsha256=" + "0" * 64)
    v2 = _edited_copy(pipeline.folder, tmp_path / "v2", lambda d: d.update(version="2.0.0"))
    with pytest.raises(ReleaseError, match=re.escape("bump export.version")):
        release(s, v2, registry=str(repo), remote=str(remote))


def test_register_in_a_local_store_without_the_training_run(pipeline, tmp_path):
    """Releasing against another tracking store logs the folder in a release run and registers that."""
    from mlflow import MlflowClient

    from har_edge.trainer.release import _register

    uri = f"sqlite:///{tmp_path / 'other.db'}"
    s = load_settings(pipeline.params, [f"mlflow.tracking_uri={uri}"])
    manifest = read_manifest(pipeline.folder)
    v, created = _register(s, pipeline.folder, manifest, tag="tcnn@v1.0.0", commit="abc", registry="r", remote="x")
    assert created and (v, False) == _register(
        s, pipeline.folder, manifest, tag="tcnn@v1.0.0", commit="abc", registry="r", remote="x"
    )
    c = MlflowClient(uri)
    mv = c.get_model_version("tcnn", v)
    assert c.get_run(mv.run_id).data.tags["har.run_kind"] == "release"
    assert "model/model.tflite" in {a.path for a in c.list_artifacts(mv.run_id, "model")}


def test_bundle_verifies_and_copies(pipeline, tmp_path):
    assert main(["--params", str(pipeline.params), "bundle", str(pipeline.folder), str(tmp_path / "dm")]) == Exit.OK
    assert load_model(tmp_path / "dm").manifest.sha256 == read_manifest(pipeline.folder).sha256
    assert main(["--params", str(pipeline.params), "verify", str(tmp_path / "dm")]) == Exit.OK


def test_seed_like_cnn_bilstm_converts_to_int8_builtins(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from har_edge.agent.runtime import TFLiteRunner
    from har_edge.trainer.export import convert_int8
    from har_edge.trainer.model import build_model
    from har_edge.trainer.settings import TrainSettings

    model = build_model(TrainSettings(arch="cnn_bilstm", lstm_units=16), window=200, channels=6, classes=6)
    rep = np.random.default_rng(0).normal(size=(16, 200, 6)).astype(np.float32)
    path = tmp_path / "bilstm.tflite"
    path.write_bytes(convert_int8(model, rep))
    ops = {op["op_name"] for op in Interpreter(model_path=str(path))._get_ops_details()}
    assert "FLEX" not in " ".join(ops) and "CUSTOM" not in ops and "WHILE" not in ops, ops
    probs = TFLiteRunner(path, batch=4).predict(rep[:6])
    assert probs.shape == (6, 6) and np.allclose(probs.sum(axis=1), 1, atol=0.05)


def test_export_writes_a_reference_marked_synthetic(pipeline):
    ref = read_manifest(pipeline.folder).reference
    assert ref is not None and ref.measured_on == "synthetic" and not ref.gives_drift_verdicts
    assert ref.temperature.status == "fitted" and ref.temperature.ece_before is not None
    assert ref.prior.kind == "true" and abs(sum(ref.prior.share) - 1) < 1e-6


def test_adapt_on_shifted_data_reduces_drift_and_keeps_accuracy(pipeline, tmp_path):
    import shifts

    from har_edge.trainer.adapt import adapt, windows_from_mlflow
    from har_edge.trainer.data import synthetic
    from har_edge.trainer.errors import TrainerError

    s = pipeline.settings
    with pytest.raises(TrainerError, match=r"a tflite-only folder cannot be adapted"):
        adapt(s, pipeline.folder, tmp_path / "x", data=tmp_path)
    # a device of its own: the session's server also holds other tests' device runs
    with pytest.raises(TrainerError, match="no run matching"):
        windows_from_mlflow(s, f"tags.`har.kind` = 'device' and tags.`har.device` = 'none-{tmp_path.name}'", tmp_path)
    target = tmp_path / "exports"
    target.mkdir()
    recs = synthetic.generate(s.data.labels, subjects=3, seconds_per_activity=40, seed=99)
    for i, r in enumerate(recs):  # another sensor: gyroscope gain 1.6, accelerometer offset 0.8 m/s² on y
        x = r.samples.copy()
        x[:, 3:] *= 1.6
        x[:, 1] += 0.8
        shifts.write_samples_fit(target / f"t{i}.fit", x, start=shifts.start_of(i))
    out = tmp_path / "adapted"
    r = adapt(s, pipeline.folder, out, data=target, float_path=s.train_dir / "model.keras")
    assert r.drift_after < r.drift_before
    assert r.accuracy_after is not None and r.accuracy_after >= r.accuracy_before - 0.02
    m = load_model(out)  # the folder `har-train release` takes, verified as the edge loads it
    assert m.manifest.version == "1.0.1" and m.manifest.training["adaptation"]["method"] == "adabn"
    assert m.manifest.reference is not None and m.manifest.reference.measured_on == "unlabelled"
    assert (out / "source.keras").is_file() and m.manifest.source_files == ["source.keras"]

"""The runtime module and model verification, on the real bundled int8 model.

Run twice by ``make test``: with ai-edge-litert in the main environment and with
tflite-runtime in its own (HAR_EDGE_TFLITE_RUNTIME=tflite_runtime). This file
imports only what the legacy environment has (numpy, pydantic, the agent).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from har_edge.agent.errors import ChecksumMismatch, ManifestError, ModelValidationError
from har_edge.agent.manifest import read_manifest
from har_edge.agent.model import BUNDLED_MODEL_DIR, check_golden, load_model
from har_edge.agent.runtime import TFLiteRunner, runtime_name
from har_edge.common.hashing import sha256_file

EXPECTED_RUNTIME = os.environ.get("HAR_EDGE_TFLITE_RUNTIME") or "ai_edge_litert"


def test_the_expected_runtime_is_used():
    assert runtime_name() == EXPECTED_RUNTIME


def test_bundled_model_loads_and_reproduces_golden_windows():
    m = load_model(BUNDLED_MODEL_DIR)
    assert m.runner.runtime == EXPECTED_RUNTIME
    assert (m.runner.window, m.runner.channels) == (m.manifest.window, 6)
    assert m.runner.output_size == len(m.manifest.labels)
    assert check_golden(m) <= m.manifest.golden.atol


def test_batched_prediction_equals_one_by_one():
    m = load_model(BUNDLED_MODEL_DIR)
    with np.load(BUNDLED_MODEL_DIR / m.manifest.golden.file) as g:
        windows = g["windows"]
    rng = np.random.default_rng(1)
    many = np.concatenate([windows, windows + rng.normal(0, 0.5, windows.shape).astype(np.float32)] * 20)
    batched = m.predict(many)  # crosses several batches of 64 and a padded last one
    single = TFLiteRunner(m.folder / "model.tflite", batch=1)
    from har_edge.agent.preprocess import apply_scaler

    one = single.predict(apply_scaler(many[:7], m.manifest.scaler.mean, m.manifest.scaler.scale))
    assert batched.shape == (len(many), len(m.manifest.labels))
    np.testing.assert_array_equal(batched[:7], one)
    np.testing.assert_allclose(batched.sum(axis=1), 1.0, atol=0.05)


def test_timings_are_recorded_per_batch():
    m = load_model(BUNDLED_MODEL_DIR, batch=16)
    timings: list[float] = []
    with np.load(BUNDLED_MODEL_DIR / m.manifest.golden.file) as g:
        w = np.concatenate([g["windows"]] * 5)
    m.predict(w, timings)
    assert len(timings) == -(-len(w) // 16)
    assert all(t > 0 for t in timings)


def test_threads_setting_gives_the_same_answers():
    a = load_model(BUNDLED_MODEL_DIR, threads=1)
    b = load_model(BUNDLED_MODEL_DIR, threads=2)
    with np.load(BUNDLED_MODEL_DIR / a.manifest.golden.file) as g:
        np.testing.assert_array_equal(a.predict(g["windows"]), b.predict(g["windows"]))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    dest = tmp_path / "m"
    shutil.copytree(BUNDLED_MODEL_DIR, dest)
    return dest


def _edit_manifest(folder: Path, **changes) -> None:
    raw = json.loads((folder / "manifest.json").read_text())
    raw.update(changes)
    (folder / "manifest.json").write_text(json.dumps(raw))


def test_flipped_byte_is_refused(folder: Path):
    data = bytearray((folder / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.tflite").write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match="sha256"):
        load_model(folder)


def test_label_count_mismatch_is_refused(folder: Path):
    labels = read_manifest(folder).labels
    _edit_manifest(folder, labels=[*labels, "extra"])
    with pytest.raises(ModelValidationError, match="classes"):
        load_model(folder)


def test_wrong_window_is_refused(folder: Path):
    _edit_manifest(folder, window=128, step=64)
    with pytest.raises(ModelValidationError, match="128"):
        load_model(folder)


def test_failing_golden_windows_are_refused(folder: Path):
    with np.load(folder / "golden.npz") as g:
        windows, probs = g["windows"], g["probs"]
    np.savez(folder / "golden.npz", windows=windows, probs=np.roll(probs, 1, axis=1))
    raw = json.loads((folder / "manifest.json").read_text())
    raw["golden"]["sha256"] = sha256_file(folder / "golden.npz")
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelValidationError, match="golden"):
        load_model(folder)


def test_garbage_model_bytes_are_refused(folder: Path):
    (folder / "model.tflite").write_bytes(b"not a flatbuffer at all" * 10)
    _edit_manifest(folder, sha256=sha256_file(folder / "model.tflite"))
    with pytest.raises(ModelValidationError):
        load_model(folder)


@pytest.mark.parametrize(
    "changes, named", [({"schema_version": 99}, "schema_version 99"), ({"surprise": 1}, "surprise")]
)
def test_manifest_problems_are_named(folder: Path, changes, named):
    _edit_manifest(folder, **changes)
    with pytest.raises(ManifestError, match=named):
        load_model(folder)

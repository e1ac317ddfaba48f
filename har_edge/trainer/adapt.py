"""``har-train adapt``: a model adapted to the data its devices flagged, released through the usual loop.

From the float source (``--float PATH``, or the Keras model the folder's manifest lists in
``source_files``; a folder holding only ``model.tflite`` is refused: int8 weights cannot be
re-estimated):

1. AdaBN: every BatchNormalization layer's moving mean and variance are re-estimated, layer by
   layer, on the target windows (no labels needed), mixed with as many training windows when the
   trainer's prepared data is there (``--target-only``: the target alone);
2. optionally (``--pseudo-label``) a short fine-tune on the target windows the AdaBN model is
   confident about (calibrated top-1 >= ``--min-confidence``).

Gate: accuracy on the trainer's held-out test set (``build/trainer/prepared.npz``) must not drop by
more than ``--max-accuracy-drop``, and the drift of the model's penultimate features on the target
data (mean |z| of the target's mean feature against held-out source features through the model
with source statistics) must shrink. Without a labelled test set the
accuracy figure is recorded as unmeasured. The result is a model folder ``har-train release`` takes.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from har_edge.agent.manifest import read_manifest, write_manifest
from har_edge.agent.preprocess import apply_scaler
from har_edge.trainer.errors import GateFailed, TrainerError
from har_edge.trainer.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class AdaptResult:
    folder: Path
    version: str
    target_windows: int
    drift_before: float
    drift_after: float
    accuracy_before: float | None
    accuracy_after: float | None
    pseudo_labelled: int = 0
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": "adabn" + ("+pseudo_label" if self.pseudo_labelled else ""),
            "target_windows": self.target_windows,
            "pseudo_labelled_windows": self.pseudo_labelled,
            "feature_drift_before": round(self.drift_before, 4),
            "feature_drift_after": round(self.drift_after, 4),
            "test_accuracy_before": "unmeasured" if self.accuracy_before is None else round(self.accuracy_before, 4),
            "test_accuracy_after": "unmeasured" if self.accuracy_after is None else round(self.accuracy_after, 4),
        }


#: the adapted float model, kept beside model.tflite (listed in the manifest's source_files)
ADAPTED_SOURCE = "source.keras"


def find_float_model(folder: Path, explicit: Path | None) -> Path:
    if explicit is not None:
        if not Path(explicit).is_file():
            raise TrainerError(f"--float {explicit} does not exist")
        return Path(explicit)
    # the float sources the manifest names (har-train import and adapt keep them beside model.tflite):
    # the original Keras model first, then its unrolled rebuild (BatchNorms not folded)
    named = read_manifest(folder).source_files
    for candidate in (n for n in named if n.endswith((".keras", ".h5"))):
        if (Path(folder) / candidate).is_file():
            return Path(folder) / candidate
    raise TrainerError(
        f"{folder} holds no float Keras model (the manifest's source_files: {named or 'none'}): a tflite-only folder "
        "cannot be adapted, as its int8 weights cannot be re-estimated; pass --float PATH (the trainer keeps "
        "build/trainer/train/model.keras)"
    )


def windows_from_exports(folder: Path, manifest: Any, scratch: Path) -> np.ndarray:
    """Raw SI windows of every export in ``folder``, cut as the edge cuts them."""
    from har_edge.agent.decode import open_export
    from har_edge.agent.preprocess import StreamWindower

    parts: list[np.ndarray] = []
    paths = sorted(p for p in Path(folder).iterdir() if p.is_file()) if Path(folder).is_dir() else [Path(folder)]
    for path in paths:
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            for rec in open_export([path], Path(tmp), max_archive_bytes=512_000_000, name=path.name):
                sw = StreamWindower(
                    rate_hz=manifest.sample_rate_hz,
                    window=manifest.window,
                    step=manifest.step,
                    has_gyro=rec.has_gyro,
                    accel_unit=rec.accel_unit,
                )
                for chunk in rec.chunks():
                    ws = sw.feed(chunk)
                    if len(ws):
                        parts.append(ws.windows)
                ws = sw.finish()
                if len(ws):
                    parts.append(ws.windows)
    if not parts:
        raise TrainerError(f"{folder}: no export there holds a full window of IMU data")
    return np.concatenate(parts).astype(np.float32)


def windows_from_mlflow(settings: Settings, filter_string: str, scratch: Path) -> np.ndarray:
    """Scaled windows the devices shared with their retraining requests (runs matching ``filter_string``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=settings.tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(exps, filter_string, max_results=200)
    parts: list[np.ndarray] = []
    requests = 0
    for run in found:
        try:
            arts = client.list_artifacts(run.info.run_id, "retrain_requests")
        except Exception:  # a run without artifacts
            continue
        requests += sum(a.path.endswith(".json") for a in arts)
        for a in arts:
            if a.path.endswith(".npz"):
                local = client.download_artifacts(run.info.run_id, a.path, str(scratch))
                with np.load(local, allow_pickle=False) as z:
                    parts += [z[k] for k in z.files if k.endswith(".windows")]
    if not parts:
        why = (
            f"{requests} retraining request(s) found, but the devices did not share flagged windows "
            "(sync.share_flagged_windows = false): use --data with exports instead"
            if requests
            else f"no run matching {filter_string!r} holds a retraining request"
        )
        raise TrainerError(f"--from-mlflow {filter_string!r}: {why}")
    return np.concatenate(parts).astype(np.float32)


def adabn(model: Any, scaled: np.ndarray, batch: int = 256) -> int:
    """Re-estimate every BatchNormalization layer's moving statistics on ``scaled`` (in place); return how many."""
    import keras

    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in bns:  # in order: each layer sees the statistics its predecessors were given
        probe = keras.Model(model.inputs, bn.input)
        act = np.concatenate(
            [np.asarray(probe(scaled[i : i + batch], training=False)) for i in range(0, len(scaled), batch)]
        )
        axes = tuple(range(act.ndim - 1))
        bn.moving_mean.assign(act.mean(axis=axes).astype(np.float32))
        bn.moving_variance.assign(act.var(axis=axes).astype(np.float32))
    return len(bns)


def _penultimate(model: Any) -> Any:
    import keras

    return keras.Model(model.inputs, model.layers[-2].output)


def penultimate_features(model: Any, x: np.ndarray) -> np.ndarray:
    probe = _penultimate(model)
    return np.asarray(probe.predict(x, verbose=0, batch_size=256)).reshape(len(x), -1)


def feature_drift(source_features: np.ndarray, model: Any, target: np.ndarray) -> float:
    """Mean |z| of the target's mean penultimate feature against ``source_features`` (the features the head
    should see: held-out source windows through the model with source statistics)."""
    ft = penultimate_features(model, target)
    sd = source_features.std(axis=0) + 1e-3
    return float(np.abs((ft.mean(axis=0) - source_features.mean(axis=0)) / sd).mean())


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float((model.predict(x, verbose=0, batch_size=256).argmax(axis=1) == y).mean())


def adapt(
    settings: Settings,
    folder: Path,
    out: Path,
    *,
    data: Path | None = None,
    from_mlflow: str | None = None,
    float_path: Path | None = None,
    version: str | None = None,
    pseudo_label: bool = False,
    min_confidence: float = 0.9,
    max_accuracy_drop: float = 0.02,
    target_only: bool = False,
) -> AdaptResult:
    import keras

    from har_edge.trainer.export import (
        choose_golden,
        convert_int8,
        representative_windows,
        verify_folder,
        write_model_folder,
    )
    from har_edge.trainer.reference import build_reference

    folder = Path(folder)
    manifest = read_manifest(folder)
    keras_path = find_float_model(folder, float_path)
    if (data is None) == (from_mlflow is None):
        raise TrainerError("give exactly one of --data EXPORTS and --from-mlflow FILTER")
    mean, scale = np.asarray(manifest.scaler.mean), np.asarray(manifest.scaler.scale)
    with tempfile.TemporaryDirectory() as tmp:
        if data is not None:
            target = apply_scaler(windows_from_exports(data, manifest, Path(tmp)), mean, scale)
        else:
            target = windows_from_mlflow(settings, str(from_mlflow), Path(tmp))
    model = keras.models.load_model(keras_path, compile=False)
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None
    train_x = target[:0]
    try:
        from har_edge.trainer.prepare import load_prepared

        p = load_prepared(settings)
        test_x, test_y = apply_scaler(p.x["test"], mean, scale), p.y["test"]
        train_x = apply_scaler(p.x["train"], mean, scale)
    except TrainerError as exc:
        log.warning("no prepared training data (%s): test accuracy is unmeasured, AdaBN uses the target only", exc)
    acc_before = _accuracy(model, test_x, test_y) if test_x is not None and test_y is not None else None
    if len(train_x) and test_x is not None:
        # the features the head should see: held-out source windows through the model with source statistics
        ms = keras.models.load_model(keras_path, compile=False)
        adabn(ms, train_x)
        source_features = penultimate_features(ms, test_x)
        del ms
    else:
        source_features = penultimate_features(model, target)  # nothing to compare with: drift 0 before
    drift_before = feature_drift(source_features, model, target)
    stats_data = target
    if len(train_x) and not target_only:
        # target windows mixed with as many training windows: the model keeps working on the data it knew
        pick = np.random.default_rng(0).choice(len(train_x), size=min(len(train_x), len(target)), replace=False)
        stats_data = np.concatenate([target, train_x[np.sort(pick)]])
    n_bn = adabn(model, stats_data)
    if not n_bn:
        raise TrainerError(f"{keras_path} has no BatchNormalization layer: AdaBN has nothing to re-estimate")
    pseudo = 0
    if pseudo_label:
        probs = model.predict(target, verbose=0, batch_size=256)
        keep = probs.max(axis=1) >= min_confidence
        pseudo = int(keep.sum())
        if pseudo:
            for layer in model.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False  # keep the AdaBN statistics
            model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
            model.fit(target[keep], probs[keep].argmax(axis=1), epochs=2, batch_size=64, verbose=0)
    drift_after = feature_drift(source_features, model, target)
    acc_after = _accuracy(model, test_x, test_y) if test_x is not None and test_y is not None else None
    new_version = version or _next_version(manifest.version)
    result = AdaptResult(out, new_version, len(target), drift_before, drift_after, acc_before, acc_after, pseudo)
    if acc_before is not None and acc_after is not None and acc_after < acc_before - max_accuracy_drop:
        result.failures.append(
            f"held-out test accuracy fell from {acc_before:.3f} to {acc_after:.3f} (allowed drop {max_accuracy_drop})"
        )
    if len(train_x) and not drift_after < drift_before:
        result.failures.append(f"feature drift on the target did not shrink ({drift_before:.3f} -> {drift_after:.3f})")
    log.info("adapt: %s", result.as_dict())
    if result.failures:
        raise GateFailed(f"adapted {manifest.name} {new_version} refused: " + "; ".join(result.failures))
    rep = representative_windows(stats_data, 512, 0)
    with tempfile.TemporaryDirectory() as tmp:
        tfl = Path(tmp) / "model.tflite"
        tfl.write_bytes(convert_int8(model, rep))
        from har_edge.agent.runtime import TFLiteRunner

        runner = TFLiteRunner(tfl)
        probs = runner.predict(target)
        ref = build_reference(
            target, probs, None, "unlabelled", input_range=runner.input_range or (-8.0, 8.0),
            source=f"adapted (AdaBN) on {len(target)} target windows",
        )  # fmt: skip
        golden_raw = target[choose_golden(probs, 2)] * scale.astype(np.float32) + mean.astype(np.float32)
        s = settings.model_copy(
            update={"export": settings.export.model_copy(update={"name": manifest.name, "version": new_version})}
        )
        training = dict(
            manifest.training, adaptation=result.as_dict(), adapted_from=f"{manifest.name} {manifest.version}"
        )
        metrics = dict(manifest.metrics)
        if acc_after is not None:
            metrics["int8_accuracy_source"] = acc_after
        write_model_folder(
            out, tflite=tfl, settings=s, labels=tuple(manifest.labels), mean=mean, scale=scale,
            golden_raw=golden_raw.astype(np.float32), metrics=metrics, training=training,
            data_hash=manifest.data_hash, run_id=manifest.mlflow_run_id, reference=ref,
        )  # fmt: skip
    model.save(Path(out) / ADAPTED_SOURCE)  # the float source of the adapted model, released beside it
    write_manifest(out, read_manifest(out).model_copy(update={"source_files": [ADAPTED_SOURCE]}))
    verify_folder(out)
    return result


def _next_version(v: str) -> str:
    import re

    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", v)
    return f"{m.group(1)}.{m.group(2)}.{int(m.group(3)) + 1}" if m else f"{v}.1"


__all__ = ["AdaptResult", "adabn", "adapt", "feature_drift", "find_float_model"]

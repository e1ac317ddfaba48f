"""Full-int8 conversion, golden windows, the manifest and the model folder.

Conversion (what works with TF 2.21): ``Optimize.DEFAULT``, a
representative dataset of real (scaled) training windows, builtins-only int8
kernels, int8 input and output. The folder written is the edge contract
(``har_edge.agent.manifest``): ``model.tflite``, ``manifest.json``, ``golden.npz``
(``windows`` raw SI float32 (n, window, 6), ``probs`` float32 (n, classes) that
the exported model gave for them in the edge runtime), and it is proven by
loading it with ``har_edge.agent.model.load_model`` before it is declared done.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from har_edge.agent.manifest import (
    CHANNELS,
    GOLDEN_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    SCHEMA_VERSION,
    Manifest,
)
from har_edge.agent.preprocess import apply_scaler
from har_edge.agent.runtime import TFLiteRunner
from har_edge.common.hashing import sha256_file
from har_edge.trainer import __version__, tracking
from har_edge.trainer.errors import TrainerError
from har_edge.trainer.gate import GateResult, check_gate
from har_edge.trainer.npzio import save_npz
from har_edge.trainer.settings import Settings

log = logging.getLogger(__name__)


def representative_windows(scaled_train: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` scaled training windows drawn with ``seed`` (all of them if fewer)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(scaled_train), size=min(count, len(scaled_train)), replace=False)
    return np.ascontiguousarray(scaled_train[np.sort(idx)], dtype=np.float32)


def convert_int8(model: Any, representative: np.ndarray) -> bytes:
    """The Keras model as full-int8 TFLite bytes (int8 in, int8 out, builtin int8 ops only)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def dataset() -> Iterator[list[np.ndarray]]:
        for i in range(len(representative)):
            yield [representative[i : i + 1]]

    converter.representative_dataset = dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    chatter = io.StringIO()  # the Keras export path prints its saved signature to stdout
    try:
        with contextlib.redirect_stdout(chatter):
            return bytes(converter.convert())
    except Exception as exc:  # the converter raises many types (ConverterError, RuntimeError...)
        raise TrainerError(
            f"int8 conversion of {model.name} failed ({type(exc).__name__}: {str(exc)[:400]}): "
            "the model uses an op without an int8 builtin kernel; use train.arch: cnn"
        ) from None
    finally:
        log.debug("converter output: %s", chatter.getvalue()[-2000:])


def tflite_predict(model_path: Path, scaled: np.ndarray, threads: int = 1) -> np.ndarray:
    """Probabilities from the edge runtime (``har_edge.agent.runtime``) for scaled windows."""
    return TFLiteRunner(model_path, threads=threads, batch=64).predict(scaled)


def choose_golden(probs: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of golden windows: per predicted class, the ones with the widest top-1/top-2 margin.

    Wide margins keep the check about the bytes, not about a quantum of rounding
    that another runtime build may resolve differently.
    """
    top2 = np.sort(probs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    pred = probs.argmax(1)
    chosen: list[int] = []
    for c in range(probs.shape[1]):
        idx = np.flatnonzero(pred == c)
        chosen.extend(idx[np.argsort(-margin[idx], kind="stable")][:per_class].tolist())
    return np.array(sorted(chosen), dtype=np.int64)


@contextlib.contextmanager
def _runtime(name: str) -> Iterator[None]:
    old = os.environ.get("HAR_EDGE_TFLITE_RUNTIME")
    os.environ["HAR_EDGE_TFLITE_RUNTIME"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HAR_EDGE_TFLITE_RUNTIME", None)
        else:
            os.environ["HAR_EDGE_TFLITE_RUNTIME"] = old


def verify_folder(folder: Path) -> list[str]:
    """Load the folder as the edge does, in every installed runtime; return the runtimes that passed."""
    import importlib.util

    from har_edge.agent.model import load_model

    passed = []
    for runtime in ("ai_edge_litert", "tflite_runtime"):
        if importlib.util.find_spec(runtime) is None:
            continue
        with _runtime(runtime):
            load_model(folder, threads=1)  # raises ModelValidationError/ChecksumMismatch if anything differs
        passed.append(runtime)
    if not passed:
        raise TrainerError("neither ai_edge_litert nor tflite_runtime is installed: cannot verify the export")
    return passed


def write_model_folder(
    out: Path,
    *,
    tflite: Path,
    settings: Settings,
    labels: tuple[str, ...],
    mean: np.ndarray,
    scale: np.ndarray,
    golden_raw: np.ndarray,
    metrics: dict[str, float],
    training: dict[str, Any],
    data_hash: str,
    run_id: str,
    reference: Any = None,
) -> Manifest:
    """Write ``model.tflite`` + ``golden.npz`` + ``manifest.json`` into ``out`` (replaced as a whole)."""
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        shutil.copyfile(tflite, tmp / MODEL_FILE)
        scaled = apply_scaler(golden_raw, mean, scale)
        probs = tflite_predict(tmp / MODEL_FILE, scaled)
        save_npz(tmp / GOLDEN_FILE, {"windows": golden_raw.astype(np.float32), "probs": probs.astype(np.float32)})
        d = settings.data
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            name=settings.export.name,
            version=settings.export.version,
            labels=list(labels),
            sample_rate_hz=d.sample_rate_hz,
            window=d.window,
            step=d.step,
            channels=[{"name": n, "unit": u} for n, u in CHANNELS],
            scaler={"mean": [float(v) for v in mean], "scale": [float(v) for v in scale]},
            input_dtype="int8",
            output_dtype="int8",
            sha256=sha256_file(tmp / MODEL_FILE),
            golden={
                "file": GOLDEN_FILE,
                "sha256": sha256_file(tmp / GOLDEN_FILE),
                "count": len(golden_raw),
                "atol": settings.export.golden_atol,
            },
            data_hash=data_hash,
            mlflow_run_id=run_id,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            metrics=metrics,
            training=training,
            reference=reference,
        )
        (tmp / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def export(settings: Settings, out: Path | None = None) -> tuple[Manifest, GateResult]:
    """Stage ``export``: gate the evaluated int8 model, write and verify the folder, track it."""
    from har_edge.trainer.evaluate import load_evaluation
    from har_edge.trainer.prepare import load_prepared
    from har_edge.trainer.train import read_run

    p = load_prepared(settings)
    run = read_run(settings)
    ev = load_evaluation(settings)
    gate = check_gate(ev.metrics, settings.gate)
    run_id = run["run_id"]
    if tracking.run_exists(settings, run_id):
        tracking.set_tags(settings, run_id, {"har.gate": "passed" if gate.passed else "failed"})
        if not gate.passed:
            tracking.set_tags(settings, run_id, {"har.gate_failures": "; ".join(gate.failures)[:5000]})
            tracking.end_run(settings, run_id)
    gate.raise_if_failed(f"{settings.export.name} {settings.export.version}")

    pred = ev.int8_probs
    golden_idx = choose_golden(pred, settings.export.golden_per_class)
    training = {
        "trainer_version": __version__,
        "arch": settings.train.arch,
        "parameters": run["parameters"],
        "macs_per_window": run["macs_per_window"],
        "epochs_run": run["epochs_run"],
        "best_epoch": run["best_epoch"],
        "train_seconds": run["train_seconds"],
        "data_source": p.meta["source"],
        "source_sha256": p.meta.get("source_sha256", ""),
        "data_dvc_md5": p.meta["dvc_md5"],
        "subjects": p.meta["subjects"],
        "windows": p.meta["windows"],
        "train_step": p.meta["train_step"],
        "representative_windows": ev.representative,
        "gate": gate.as_dict(),
        "tensorflow": ev.tensorflow_version,
    }
    out = Path(out) if out is not None else settings.model_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    from har_edge.trainer.reference import reference_from_prepared

    reference = reference_from_prepared(p, ev.tflite_path)
    manifest = write_model_folder(
        out,
        tflite=ev.tflite_path,
        settings=settings,
        labels=p.labels,
        mean=p.mean,
        scale=p.scale,
        golden_raw=p.x["test"][golden_idx],
        metrics=ev.metrics,
        training=training,
        data_hash=f"sha256:{p.meta['sha256']}",
        run_id=run_id,
        reference=reference,
    )
    runtimes = verify_folder(out)
    log.info(
        "exported %s %s to %s (%.1f KB, verified in %s)",
        manifest.name,
        manifest.version,
        out,
        (out / MODEL_FILE).stat().st_size / 1024,
        ", ".join(runtimes),
    )
    if tracking.run_exists(settings, run_id):
        tracking.set_tags(
            settings, run_id, {"har.sha256": manifest.sha256, "har.verified_runtimes": ",".join(runtimes)}
        )
        tracking.log_artifacts(settings, run_id, [out], "model")
        tracking.log_artifacts(settings, run_id, [out / MANIFEST_FILE])
        tracking.end_run(settings, run_id)
    else:
        log.warning("MLflow run %s is not in %s: the export is not tracked", run_id, settings.tracking_uri)
    return manifest, gate

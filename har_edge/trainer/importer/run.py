"""``har-train import``: source -> verified full-int8 model folder, MLflow run, registered version."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from har_edge.agent.channels import STREAM, ChannelMap, sensor_of
from har_edge.agent.errors import ManifestError
from har_edge.agent.manifest import GOLDEN_FILE, MODEL_FILE, SCHEMA_VERSION, Manifest, write_manifest
from har_edge.agent.preprocess import apply_scaler
from har_edge.agent.runtime import TFLiteRunner
from har_edge.common.hashing import sha256_file
from har_edge.trainer import __version__, tracking
from har_edge.trainer.errors import ImportRefused
from har_edge.trainer.export import convert_int8, verify_folder
from har_edge.trainer.importer import figures, golden, sources, windows
from har_edge.trainer.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_UNITS = {"acc": "m/s^2", "gyro": "deg/s"}


@dataclass
class ImportOptions:
    source: Path
    labels: str
    name: str
    version: str
    out: Path
    scaler: Path | None = None
    data: list[Path] = field(default_factory=list)
    units: dict[str, str] = field(default_factory=dict)  # sensor -> unit
    channels: list[str] = field(default_factory=list)
    rate_hz: float = 50.0
    window: int | None = None
    step: int | None = None
    labelled: bool = False
    baseline: Path | None = None
    representative: int = 300
    synthetic_windows: int = 400
    seed: int = 0
    min_agreement: float | None = None
    golden_per_class: int = 2


@dataclass
class ImportResult:
    manifest: Manifest
    folder: Path
    run_id: str
    registry_version: str | None
    seconds: float
    measured: dict[str, dict]
    calibration: dict[str, Any]


def parse_units(spec: str) -> dict[str, str]:
    """``acc=g,gyro=rad/s`` -> {"acc": "g", "gyro": "rad/s"}."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        sensor, _, unit = part.partition("=")
        sensor = {"accel": "acc", "accelerometer": "acc", "gyr": "gyro", "gyroscope": "gyro"}.get(sensor, sensor)
        if sensor not in DEFAULT_UNITS or not unit:
            raise ImportRefused(f"--units {spec!r}: give sensor=unit pairs for acc and gyro, e.g. acc=g,gyro=rad/s")
        out[sensor] = unit
    return out


def _channels(opt: ImportOptions, n: int) -> list[dict[str, str]]:
    names = opt.channels or [c for c, _ in STREAM]
    if len(names) != n:
        raise ImportRefused(
            f"the model takes {n} channels, --channels names {len(names)} ({', '.join(names)}): "
            "name the model's input channels in order"
        )
    units = {**DEFAULT_UNITS, **opt.units}
    chans = [{"name": c, "unit": units[sensor_of(c)]} for c in names]
    ChannelMap.from_channels([(c["name"], c["unit"]) for c in chans])  # refuses an unknown unit, named
    return chans


def _float_tflite(path: Path, scaled: np.ndarray) -> np.ndarray:
    return TFLiteRunner(path, threads=1, batch=64).predict(scaled)


def _quantize_tflite(float_path: Path, calib: np.ndarray, out: Path) -> None:
    """Static int8 (weights and activations) with ai-edge-quantizer, calibrated on ``calib``."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    sigs = Interpreter(model_path=str(float_path)).get_signature_list()
    key = next(iter(sigs))
    input_name = sigs[key]["inputs"][0]
    qt = quantizer.Quantizer(str(float_path))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    data = [{input_name: calib[i : i + 1]} for i in range(len(calib))]
    result = qt.quantize(qt.calibrate({key: data}), enable_progress_report=False)
    out.write_bytes(bytes(result.quantized_model))


def run_import(settings: Settings, opt: ImportOptions) -> ImportResult:
    t0 = time.perf_counter()
    src = sources.open_source(opt.source)
    labels = sources.read_labels(opt.labels)
    window, n_ch = src.input_shape
    if len(labels) != src.outputs:
        raise ImportRefused(
            f"{opt.source.name} has {src.outputs} outputs, --labels {opt.labels} lists {len(labels)}: "
            "hand over the label mapping the model was trained with"
        )
    if opt.window is not None and opt.window != window:
        raise ImportRefused(
            f"--window {opt.window}: {opt.source.name} takes windows of {window} samples ({window}x{n_ch})"
        )
    step = opt.step or window // 2
    if not 0 < step <= window:
        raise ImportRefused(f"--step {step} must be within 1..{window}")
    try:
        chans = _channels(opt, n_ch)
    except ManifestError as exc:
        raise ImportRefused(str(exc)) from None
    cmap = ChannelMap.from_channels([(c["name"], c["unit"]) for c in chans])
    mean, scale, scaler_how = sources.read_scaler(opt.scaler, n_ch)
    baseline = sources.read_baseline(opt.baseline)

    # -- windows --------------------------------------------------------------
    if opt.data:
        w = windows.from_exports(
            opt.data,
            channel_map=cmap,
            rate_hz=opt.rate_hz,
            window=window,
            step=step,
            labels=labels if opt.labelled else None,
        )
    else:
        if opt.labelled:
            raise ImportRefused("--labelled needs --data: the labels belong to exports")
        w = windows.synthetic(
            mean=mean, scale=scale, window=window, count=opt.synthetic_windows, seed=opt.seed,
            baseline=baseline, channel_names=[c["name"] for c in chans],
        )  # fmt: skip
    calib, check = windows.split(w)
    if not len(calib) or not len(check):
        raise ImportRefused(f"{len(w)} windows are too few to hold some out for the check: give more --data")
    rng = np.random.default_rng(opt.seed)
    rep_idx = np.sort(rng.choice(len(calib), size=min(opt.representative, len(calib)), replace=False))
    calib_scaled = np.ascontiguousarray(apply_scaler(calib.raw[rep_idx], mean, scale))
    check_scaled = np.ascontiguousarray(apply_scaler(check.raw, mean, scale))
    check_files = sorted({w.files[e] for e in set(check.export.tolist())}) if w.files else []
    on = (
        f"{len(check)} held-out windows of {len(check_files)} exports ({', '.join(check_files)})"
        if w.source == "exports"
        else f"{len(check)} synthetic windows drawn from the {w.source} (no --data: indicative only)"
    )
    calibration = {
        "source": w.source,
        "files": w.files,
        "windows": len(w),
        "representative_windows": len(rep_idx),
        "check_windows": len(check),
        "check_files": check_files,
    }
    if w.source != "exports":
        calibration["warning"] = (
            "no --data: calibration and check windows were drawn at random from the "
            f"{w.source}; int8 ranges and agreement are indicative only"
        )

    # -- conversion -----------------------------------------------------------
    run_id = ""
    work = Path(tempfile.mkdtemp(prefix=f".{opt.out.name}-", dir=opt.out.parent if opt.out.parent.exists() else None))
    try:
        src_files: list[str] = []
        rebuild_figs: dict[str, float] = {}
        training_extra: dict[str, Any] = {}
        float_probs: np.ndarray | None = None
        why_no_float = ""
        quantized = True
        if src.kind == "keras":
            import tensorflow as tf

            from har_edge.trainer.importer import convert

            rb = convert.rebuild(src.keras_model)
            rebuild_figs = convert.check_rebuild(
                src.keras_model, rb, np.concatenate([check_scaled[:128], calib_scaled[:128]])
            )
            (work / MODEL_FILE).write_bytes(convert_int8(rb.folded, calib_scaled))
            float_probs = convert.predict(src.keras_model, check_scaled)
            ext = opt.source.suffix.lower()
            shutil.copyfile(opt.source, work / f"source{ext}")
            rb.unrolled.save(work / "source_unrolled.keras")
            src_files = [f"source{ext}", "source_unrolled.keras"]
            training_extra = {
                "folded_batchnorms": rb.folded_layers,
                "unrolled_layers": rb.unrolled_layers,
                "tensorflow": tf.__version__,
            }
        elif src.kind == "savedmodel":
            import tensorflow as tf

            conv = tf.lite.TFLiteConverter.from_saved_model(str(opt.source))
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: ([calib_scaled[i : i + 1]] for i in range(len(calib_scaled)))
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
            (work / MODEL_FILE).write_bytes(bytes(conv.convert()))
            fn = tf.saved_model.load(str(opt.source)).signatures["serving_default"]
            key = next(iter(fn.structured_input_signature[1]))
            outs = [next(iter(fn(**{key: tf.constant(check_scaled[i : i + 256])}).values())).numpy()
                    for i in range(0, len(check_scaled), 256)]  # fmt: skip
            float_probs = np.concatenate(outs).astype(np.float32)
        elif src.tflite_dtype in ("int8", "uint8"):
            shutil.copyfile(opt.source, work / MODEL_FILE)
            why_no_float = "not measured: the source is already int8, there is no float model to compare with"
        else:
            shutil.copyfile(opt.source, work / "source_float.tflite")
            src_files = ["source_float.tflite"]
            float_probs = _float_tflite(opt.source, check_scaled)
            try:
                _quantize_tflite(opt.source, calib_scaled, work / MODEL_FILE)
                TFLiteRunner(work / MODEL_FILE)  # loads in the edge runtime
            except Exception as exc:  # the quantizer raises many types on a model it cannot handle
                log.warning("ai-edge-quantizer could not quantize %s (%s: %s): importing it as a float model",
                            opt.source.name, type(exc).__name__, str(exc)[:300])  # fmt: skip
                shutil.copyfile(opt.source, work / MODEL_FILE)
                quantized = False
                training_extra["quantization_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                float_probs, why_no_float = None, "not quantized: the float model runs as it is (no int8 to compare)"
        runner = TFLiteRunner(work / MODEL_FILE, threads=1, batch=64)
        if runner.output_size != len(labels):
            raise ImportRefused(f"the converted model has {runner.output_size} outputs, the labels {len(labels)}")
        int8_probs = runner.predict(check_scaled)

        # -- figures and gate ---------------------------------------------------
        measured: dict[str, dict] = {}
        measured.update(figures.agreement_figures(int8_probs, float_probs, on, why_no_float))
        measured["size_kb"] = figures.figure((work / MODEL_FILE).stat().st_size / 1024, "model.tflite")
        measured.update(figures.speed_figure(work / MODEL_FILE, check_scaled))
        measured.update(figures.accuracy_figures(int8_probs, check.labels, check.subjects, len(labels), on))
        measured["quantized"] = figures.figure(1.0 if quantized else 0.0, "int8" if quantized else "not quantized")
        for k, v in rebuild_figs.items():
            measured[k] = figures.figure(v, f"{min(256, len(check_scaled) + len(calib_scaled))} windows, float")
        g = settings.gate
        thresholds = {
            "min_agreement": opt.min_agreement if opt.min_agreement is not None else g.min_agreement,
            "min_int8_accuracy": g.min_int8_accuracy,
            "min_macro_f1": g.min_macro_f1,
            "max_size_kb": g.max_size_kb,
        }
        gate = figures.gate(measured, thresholds)
        metrics = {k: float(v["value"]) for k, v in measured.items() if v["value"] is not None}

        # -- golden windows and manifest ----------------------------------------
        gold_raw = golden.pick(work / MODEL_FILE, check.raw, mean, scale, opt.golden_per_class)
        gsha, gcount = golden.write(work, gold_raw, mean, scale)
        run_id = _start_run(settings, opt, src.kind)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            name=opt.name,
            version=opt.version,
            labels=labels,
            sample_rate_hz=opt.rate_hz,
            window=window,
            step=step,
            channels=chans,
            scaler={"mean": [float(v) for v in mean], "scale": [float(v) for v in scale]},
            input_dtype=runner.input_dtype.name,
            output_dtype=runner.output_dtype.name,
            sha256=sha256_file(work / MODEL_FILE),
            golden={"file": GOLDEN_FILE, "sha256": gsha, "count": gcount, "atol": settings.export.golden_atol},
            data_hash="",
            mlflow_run_id=run_id,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            metrics=metrics,
            training={
                "imported_from": opt.source.name,
                "source_kind": src.kind if src.kind != "tflite" else f"tflite-{src.tflite_dtype}",
                "source_sha256": sha256_file(opt.source) if opt.source.is_file() else "",
                "scaler": scaler_how,
                "trainer_version": __version__,
                "gate": gate,
                **({"baseline": baseline} if baseline is not None else {}),
                **training_extra,
            },
            measured=measured,
            calibration=calibration,
            source_files=src_files,
        )
        write_manifest(work, manifest)
        verify_folder(work)
        work.chmod(0o755)
        if opt.out.exists():
            shutil.rmtree(opt.out)
        opt.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(work), str(opt.out))
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if run_id:
            tracking.set_tags(settings, run_id, {"har.import": "failed"})
            tracking.end_run(settings, run_id, "FAILED")
        raise
    version = _track(settings, opt, run_id, manifest, measured, calibration)
    seconds = time.perf_counter() - t0
    tracking.log_metrics(settings, run_id, {"import_seconds": seconds})
    tracking.end_run(settings, run_id)
    return ImportResult(manifest, opt.out, run_id, version, seconds, measured, calibration)


def _start_run(settings: Settings, opt: ImportOptions, kind: str) -> str:
    c = tracking.client(settings)
    tags = {
        "har.run_kind": "import",
        "har.model_name": opt.name,
        "har.model_version": opt.version,
        "har.source": opt.source.name,
        "har.source_kind": kind,
        "har.data_source": "exports" if opt.data else "synthetic",
    }
    run = c.create_run(tracking.experiment_id(c, settings), run_name=f"import {opt.name} {opt.version}", tags=tags)
    return str(run.info.run_id)


def _track(
    settings: Settings, opt: ImportOptions, run_id: str, m: Manifest, measured: dict, calibration: dict
) -> str | None:
    tracking.log_params(
        settings,
        run_id,
        {
            "source": opt.source.name,
            "labels": ",".join(m.labels),
            "channels": ",".join(f"{c.name}[{c.unit}]" for c in m.channels),
            "window": m.window,
            "step": m.step,
            "sample_rate_hz": m.sample_rate_hz,
            "calibration_source": calibration["source"],
            "data_files": ",".join(calibration["files"]),
        },
    )
    tracking.log_metrics(settings, run_id, dict(m.metrics))
    unmeasured = [k for k, v in measured.items() if v["value"] is None]
    tracking.set_tags(
        settings,
        run_id,
        {
            "har.sha256": m.sha256,
            "har.gate": "passed" if m.training["gate"]["passed"] else "failed",
            "har.unmeasured": ",".join(unmeasured),
        },
    )
    tracking.log_artifacts(settings, run_id, [opt.out], "model")
    version, _created = tracking.register_version(
        settings,
        name=m.name,
        run_id=run_id,
        artifact_path="model",
        sha256=m.sha256,
        tags={"model_version": m.version, "source": opt.source.name, "stage": "imported"},
        description=f"{m.name} {m.version} imported from {opt.source.name}",
    )
    return version

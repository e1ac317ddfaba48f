"""Section ``own_model``: a researcher's own CNN-BiLSTM, brought in by ``har-train import``, run by the agent.

A study-sized 1D-CNN-BiLSTM (11 classes, 200x6 windows at 50 Hz, a BatchNorm
after the BiLSTM) is built with a fixed seed and trained briefly on synthetic
labelled recordings; accuracy is not the point, the figure says what it reached.
Its ``.keras`` file is imported through the real ``har-train import --data
... --labelled`` (unrolled, BatchNorm folded, full int8, gate figures). Both
steps run once in a worker process (TensorFlow stays out of the timed process)
and are cached in ``.cache/bench-own-model/`` (``.cache/bench/`` is emptied per
run) keyed by the build's parameters and the TensorFlow version.

Then, in this process, the agent's runtime (``load_model`` + ``LoadedModel.predict``,
the scaler included) is timed on batches with 1 and 2 threads, in rounds
interleaved with one core's numpy float32 matmul peak (``bench.inference.Peak``).
MACs per window are counted from the imported Keras model's layers
(:func:`keras_macs`) and checked against the ``.tflite`` ops; the MAC floor is
peak / (2 * MACs). Agreement: int8 (agent) vs the float Keras model's argmax on
windows of subjects neither trained on nor exported, split by the float top-2 margin.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bench import study_model
from bench.common import ROOT, Report, fmt, median, python_worker, spread

log = logging.getLogger(__name__)

CACHE = ROOT / ".cache" / "bench-own-model"
LABELS = [
    "walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "lying",
    "running", "jumping", "shaking", "brushing_teeth", "ear_rubbing",
]  # fmt: skip
RATE, WINDOW, STEP = 50.0, 200, 100
SECONDS = 24.0  # per activity and subject
T0_MS = 1_742_802_739_000
TRAIN_SUBJECTS, EXPORT_SUBJECTS, HELD_OUT_SUBJECTS = range(1, 7), range(7, 11), range(11, 14)
EPOCHS = 5
ROUNDS = 9
WINDOWS = 2048
#: bump when the model, the data or the import arguments change: a new cache key
BUILD_VERSION = 1
NAME = "bench-study-cnn-bilstm"


# -- MACs ----------------------------------------------------------------------------------------------


def _rnn_macs(layer: Any, steps: int, features: int) -> int:
    """Matmul MACs of a recurrent layer over ``steps``: gates x units x (input + recurrent) per step."""
    gates = {"LSTM": 4, "GRU": 3, "SimpleRNN": 1}[type(layer).__name__]
    units = int(layer.units)
    return steps * gates * units * (features + units)


def keras_macs(model: Any) -> tuple[int, dict[str, int]]:
    """Multiply-accumulates of one window, per layer type, from a built Keras model's layers.

    Conv1D: output steps x filters x kernel x input channels / groups; Dense: its
    leading output dims x units x inputs; LSTM/GRU/SimpleRNN (also inside
    Bidirectional, both directions): per step gates x units x (inputs + units), as
    when unrolled. Element-wise work (activations, gate products, pooling,
    BatchNorm) is not counted: the floor is a matmul floor.
    """
    total = 0
    by_layer: dict[str, int] = {}

    def walk(layers: Any) -> None:
        nonlocal total
        for layer in layers:
            kind = type(layer).__name__
            if hasattr(layer, "layers") and kind not in ("Bidirectional",):  # a nested Sequential / Model
                walk(layer.layers)
                continue
            if kind == "Conv1D":
                _, steps, filters = layer.output.shape
                macs = int(steps) * int(filters) * int(layer.kernel_size[0]) * int(layer.input.shape[-1])
                macs //= int(getattr(layer, "groups", 1) or 1)
            elif kind == "Dense":
                lead = int(np.prod([int(d) for d in layer.output.shape[1:-1]], dtype=np.int64))
                macs = lead * int(layer.units) * int(layer.input.shape[-1])
            elif kind in ("LSTM", "GRU", "SimpleRNN"):
                macs = _rnn_macs(layer, int(layer.input.shape[1]), int(layer.input.shape[-1]))
            elif kind == "Bidirectional":
                steps, features = int(layer.input.shape[1]), int(layer.input.shape[-1])
                macs = _rnn_macs(layer.forward_layer, steps, features) + _rnn_macs(
                    layer.backward_layer, steps, features
                )
            else:
                continue
            total += macs
            by_layer[kind] = by_layer.get(kind, 0) + macs

    walk(model.layers)
    return total, by_layer


# -- the study's data (synthetic) ---------------------------------------------------------------------


def _signal(label: str, rng: np.random.Generator, mount: NDArray[Any], bias: NDArray[Any]) -> NDArray[np.float32]:
    from har_edge.trainer.data.synthetic import activity_signal

    base = {"running": "walking", "jumping": "standing", "shaking": "standing", "brushing_teeth": "standing",
            "ear_rubbing": "sitting"}.get(label, label)  # fmt: skip
    sig = activity_signal(base, SECONDS, rng, rate_hz=RATE, mount=mount, gyro_bias=bias).astype(np.float64)
    t = np.arange(len(sig)) / RATE
    f = rng.uniform(0.9, 1.1)
    if label == "running":
        mean = sig.mean(axis=0)
        sig = mean + 2.2 * (sig - mean)
    elif label == "jumping":  # big vertical bounces at ~2 Hz
        sig[:, 0] += 9.0 * np.maximum(np.sin(2 * np.pi * 2.0 * f * t), 0) ** 3 - 2.5
        sig[:, 4] += 40.0 * np.sin(2 * np.pi * 2.0 * f * t)
    elif label == "shaking":  # a 6 Hz tremor of the wrist
        sig[:, 1] += 3.0 * np.sin(2 * np.pi * 6 * f * t)
        sig[:, 5] += 90.0 * np.sin(2 * np.pi * 6 * f * t + 0.5)
    elif label == "brushing_teeth":  # a 4 Hz stroke along z
        sig[:, 2] += 2.0 * np.sin(2 * np.pi * 4 * f * t)
        sig[:, 3] += 60.0 * np.sin(2 * np.pi * 4 * f * t + 1.0)
    elif label == "ear_rubbing":  # a small 3 Hz circle near the head
        sig[:, 1] += 1.0 * np.sin(2 * np.pi * 3 * f * t)
        sig[:, 2] += 1.0 * np.cos(2 * np.pi * 3 * f * t)
        sig[:, 4] += 40.0 * np.sin(2 * np.pi * 3 * f * t)
    return sig.astype(np.float32)


def _recording(subject: int) -> tuple[NDArray[np.float32], study_model.Spans]:
    """(samples (n, 6) SI, [(first sample, end sample, label index)]): every class once, in a random order."""
    return study_model.recording(subject, LABELS, _signal, seed=17)


def _subjects(subjects: range, step: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    parts = [study_model.windows(*_recording(s), WINDOW, step) for s in subjects]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _write_study_pair(folder: Path, prefix: str, samples: NDArray[np.float32], t0_ms: int) -> tuple[str, str]:
    """The study's CSV pair, written by the tests' writer (tests/trainer_helpers.py, loaded by path)."""
    path = ROOT / "tests" / "trainer_helpers.py"
    spec = importlib.util.spec_from_file_location("har_edge_trainer_helpers", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} cannot be loaded as a module: is the tests folder there?")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names: tuple[str, str] = module.write_study_pair(folder, prefix, samples, t0_ms, rate_hz=RATE)
    return names


# -- the build (a worker process: TensorFlow, the import) -------------------------------------------


def build_key() -> str:
    import importlib.metadata as md

    try:
        tf = md.version("tensorflow")
    except md.PackageNotFoundError:
        tf = md.version("tensorflow-cpu")
    importer = hashlib.sha256()  # a change to the import's code is a new import
    for path in sorted((ROOT / "har_edge" / "trainer" / "importer").glob("*.py")):
        importer.update(path.read_bytes())
    doc = {"v": BUILD_VERSION, "labels": LABELS, "epochs": EPOCHS, "tf": tf, "window": WINDOW, "step": STEP,
           "importer": importer.hexdigest()}  # fmt: skip
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


def build(folder: Path) -> dict[str, Any]:
    """Train the study model, import it with ``har-train import --data``, count its MACs; ``info.json``."""
    import keras

    from har_edge.agent.manifest import read_manifest
    from har_edge.common.cli import Exit
    from har_edge.trainer.cli import main

    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    x_train, y_train = _subjects(TRAIN_SUBJECTS, 50)
    mean = x_train.reshape(-1, 6).mean(axis=0)
    scale = x_train.reshape(-1, 6).std(axis=0)
    exports: list[Path] = []
    data = folder / "exports"
    data.mkdir()
    for k, subject in enumerate(EXPORT_SUBJECTS):
        samples, spans = _recording(subject)
        t = T0_MS + k * 3_600_000
        acc, gyro = _write_study_pair(data, f"s{subject:02d}", samples, t)
        labelled = data / f"s{subject:02d}.labels.csv"
        study_model.write_labels(labelled, spans, LABELS, t0_ms=t, rate_hz=RATE, subject=f"s{subject:02d}")
        exports += [data / acc, data / gyro]
    x_held, y_held = _subjects(HELD_OUT_SUBJECTS, STEP)

    model = study_model.build(study_model.STUDY, WINDOW, len(LABELS))
    model.fit((x_train - mean) / scale, y_train, epochs=EPOCHS, batch_size=32, verbose=0)
    float_probs = model.predict((x_held - mean) / scale, verbose=0, batch_size=256)
    train_s = time.perf_counter() - t0
    study_model.save(folder, model, LABELS, mean, scale)
    np.savez(folder / "held_out.npz", windows=x_held, labels=y_held, float_probs=float_probs)

    t1 = time.perf_counter()
    code = main([
        "--set", f"mlflow.tracking_uri=sqlite:///{folder / 'mlflow.db'}",
        "--set", "mlflow.experiment=bench-own-model",
        "--set", f"data.cache_dir={folder / 'cache'}",
        "--set", "gate.max_size_kb=2000",
        "--set", "gate.min_int8_accuracy=0.5",
        "import", str(folder / "model.keras"), "--labels", str(folder / "labels.json"),
        "--scaler", str(folder / "scaler.json"), "--name", NAME, "--version", "1.0.0",
        "--units", "acc=m/s^2,gyro=deg/s", "--data", *map(str, exports), "--labelled",
        "-o", str(folder / "imported"),
    ])  # fmt: skip
    import_s = time.perf_counter() - t1
    # a gate refusal (exit 4) still writes the folder: the bench measures it and says why it was refused
    if code not in (Exit.OK, Exit.GATE) or not (folder / "imported" / "model.tflite").is_file():
        raise RuntimeError(f"har-train import of {folder / 'model.keras'} failed with exit code {code}")
    gate = read_manifest(folder / "imported").training["gate"]
    imported = keras.models.load_model(folder / "imported" / "source.keras")  # what the import kept of it
    macs, by_layer = keras_macs(imported)
    info = {
        "key": build_key(), "import_exit": int(code), "gate_failures": list(gate.get("failures", [])),
        "train_seconds": round(train_s, 1),
        "import_seconds": round(import_s, 1), "epochs": EPOCHS, "train_windows": len(x_train),
        "held_out_windows": len(x_held), "exports": len(exports) // 2,
        "float_held_out_accuracy": float((float_probs.argmax(1) == y_held).mean()),
        "params": int(model.count_params()), "macs_keras": macs, "macs_by_layer": by_layer,
    }  # fmt: skip
    (folder / "info.json").write_text(json.dumps(info, indent=2))
    return info


def cached_build() -> tuple[Path, dict[str, Any]]:
    """The build folder for this build key: reused when complete, else built in a worker process.

    The same model with ``--quick`` or not: its size is what is measured, and it is cached.
    """
    key = build_key()
    folder = CACHE / key
    info_file = folder / "info.json"
    if info_file.is_file():
        info: dict[str, Any] = json.loads(info_file.read_text())
        info["cached"] = True
        return folder, info
    shutil.rmtree(folder, ignore_errors=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    log.info("own model: building and importing into %s (a few minutes, once)", folder)
    info = python_worker("bench.own_model", ["build", str(folder)], env=env, timeout=1800)
    info["cached"] = False
    return folder, info


# -- the section ----------------------------------------------------------------------------------------


def run(report: Report, *, quick: bool = False) -> None:
    from bench.inference import Peak, subprocess_peak
    from har_edge.agent.manifest import read_manifest
    from har_edge.agent.model import load_model

    S = "own model"
    folder, info = cached_build()
    model_dir = folder / "imported"
    manifest = read_manifest(model_dir)
    macs = int(info["macs_keras"])
    from bench.inference import tflite_macs

    macs_tflite, _ = tflite_macs(model_dir / "model.tflite")
    rounds, n = (3, 512) if quick else (ROUNDS, WINDOWS)
    with np.load(folder / "held_out.npz") as z:
        held, y_held, float_probs = z["windows"], z["labels"], z["float_probs"]
    x = np.ascontiguousarray(np.resize(held, (n, *held.shape[1:])), np.float32)

    batch = 256
    models = {t: load_model(model_dir, threads=t, batch=batch) for t in (1, 2)}
    for mdl in models.values():
        mdl.predict(x[:batch])
    peak = Peak()
    rows: list[dict[str, Any]] = []
    for i in range(rounds):
        row: dict[str, Any] = {"peak_gflops": peak.round()}
        for t, mdl in models.items():
            w, c = time.perf_counter(), time.process_time()
            mdl.predict(x)
            row[f"{t}t"] = {"wall": time.perf_counter() - w, "cpu": time.process_time() - c}
        rows.append(row)
        log.info("own model round %d/%d done", i + 1, rounds)
    peaks = [r["peak_gflops"] for r in rows]
    if peaks[0] is None:
        peaks = [subprocess_peak({})["gflops_best"]] * len(rows)

    from bench.peers import compare

    unrolled = model_dir / "source_unrolled.keras"
    peer_info = compare(
        report, S, model_dir=model_dir, x=models[1].scale(x).astype(np.float32), agent=models[1].runner.predict,
        float_keras=unrolled if unrolled.is_file() else model_dir / "source.keras", batch=batch,
        rounds=max(3, rounds // 2), eval_x=models[1].scale(held).astype(np.float32), float_probs=float_probs,
    )  # fmt: skip
    int8_probs = models[1].predict(held)
    same = int8_probs.argmax(1) == float_probs.argmax(1)
    top2 = np.sort(float_probs, axis=1)[:, -2:]
    wide = (top2[:, 1] - top2[:, 0]) >= 0.1
    int8_acc = float((int8_probs.argmax(1) == y_held).mean())

    per_cpu1 = [n / r["1t"]["cpu"] for r in rows]
    wall1 = [n / r["1t"]["wall"] for r in rows]
    wall2 = [n / r["2t"]["wall"] for r in rows]
    floors = [p * 1e9 / (2 * macs) for p in peaks]
    share = [a / f for a, f in zip(per_cpu1, floors, strict=True)]
    speedup = [a / b for a, b in zip(wall2, wall1, strict=True)]
    fig = {k: v.value for k, v in manifest.measured.items()}
    report.raw["own_model"] = {
        "folder": str(folder), "build": info, "macs_tflite": macs_tflite, "rounds": rows, "windows": n,
        "batch": batch, "peak_gflops": peaks, "agreement": float(same.mean()),
        "agreement_wide": float(same[wide].mean()) if wide.any() else None, "wide": int(wide.sum()),
        "int8_accuracy": int8_acc, "manifest_measured": fig, "peers": peer_info,
    }  # fmt: skip

    gate_text = f": gate refused it, {'; '.join(info['gate_failures'])}" if info["gate_failures"] else ": gate passed"
    built = "cached build" if info.get("cached") else f"built in {info['train_seconds']:.0f} s"
    report.add(S, f"imported CNN-BiLSTM ({len(LABELS)} classes, {WINDOW}x6), int8, 1 thread, batch {batch}",
               f"{fmt(median(per_cpu1))} w/s/core",
               note=f"{manifest.name} {manifest.version}, {info['params']:,} parameters; {built}, imported in "
                    f"{info['import_seconds']:.0f} s (har-train import --data {info['exports']} exports --labelled, "
                    f"exit {info['import_exit']}{gate_text}); wall {fmt(median(wall1))} w/s; "
                    f"LoadedModel.predict, scaler included")  # fmt: skip
    report.add(S, f"imported CNN-BiLSTM, int8, 2 threads, batch {batch}", f"{fmt(median(wall2))} w/s (wall)",
               baseline=f"{fmt(median(wall1))} w/s 1 thread", ratio=f"{median(speedup):.2f}x 1 thread",
               note=f"per round: {spread(speedup)}x; {fmt(median([n / r['2t']['cpu'] for r in rows]))} w/s per "
                    f"CPU-second; the machine is shared, so 2 threads gain only when a core is free")  # fmt: skip
    agree_macs = abs(macs_tflite - macs) <= 0.05 * macs
    by = ", ".join(f"{k} {fmt(v / 1e6)} M" for k, v in info["macs_by_layer"].items())
    report.add(S, "its MAC floor (MACs/window / one core's matmul peak)", f"{fmt(median(floors))} w/s/core",
               note=f"{fmt(macs / 1e6)} M MACs/window from the Keras layers ({by}); the .tflite ops count "
                    f"{fmt(macs_tflite / 1e6)} M{'' if agree_macs else ' (DIFFERENT)'}; peak "
                    f"{fmt(median(peaks))} GFLOP/s float32")  # fmt: skip
    report.add(S, "imported CNN-BiLSTM vs its MAC floor", f"{median(share) * 100:.0f}%",
               baseline=f"{fmt(median(floors))} w/s/core", ratio=f"{median(share):.2f}x floor",
               target=">= 75%", ok=median(share) >= 0.75,
               note=f"per round: {spread([s * 100 for s in share])}%; int8 kernels can beat a float32 floor "
                    f"(more MACs per instruction)")  # fmt: skip
    wide_text = (
        f"{same[wide].mean() * 100:.2f}% of the {int(wide.sum())} with top-2 margin >= 0.1" if wide.any() else ""
    )
    narrow = ~wide
    narrow_text = f"{same[narrow].mean() * 100:.1f}% of the {int(narrow.sum())} below" if narrow.any() else ""
    imp = fig.get("agreement")
    report.add(S, "argmax agreement int8 (agent) vs Keras float", f"{same.mean() * 100:.2f}%",
               baseline=f"{imp * 100:.2f}% at import" if imp is not None else "",
               note=f"{len(held)} windows of {len(HELD_OUT_SUBJECTS)} subjects neither trained on nor exported; "
                    f"{'; '.join(t for t in (wide_text, narrow_text) if t)}")  # fmt: skip
    if not quick:
        _day_with_it(report, S, model_dir)
    report.add(S, "accuracy on those windows (trained briefly: not the point)", f"int8 {int8_acc * 100:.1f}%",
               baseline=f"float {info['float_held_out_accuracy'] * 100:.1f}%",
               note=f"{info['epochs']} epochs on {info['train_windows']} synthetic windows of "
                    f"{len(TRAIN_SUBJECTS)} subjects")  # fmt: skip


def _day_with_it(report: Report, section: str, model_dir: Path) -> None:
    """The 24 h export through Agent.step with the imported model (default threads and decode thread), and the
    daemon's RSS on it."""
    from bench.common import SCRATCH, imu_fixture
    from bench.e2e import agent_pass
    from bench.memory import measure_daemon

    day = imu_fixture(24)
    passes = [agent_pass(day, SCRATCH / f"own-e2e-{i}", model_dir) for i in range(2)]
    walls = [p["wall"] for p in passes]
    inf = median([p["stages"]["wall_s"].get("inference", 0.0) for p in passes])
    report.add(section, "24 h export drop -> outbox with the imported model", f"{median(walls):.1f} s wall",
               target="<= 20 s", ok=median(walls) <= 20.0,
               note=f"Agent.step, {fmt(passes[0]['windows'])} windows, agent.threads = auto, decode thread on; "
                    f"runs {spread(walls)} s; CPU {median([p['cpu'] for p in passes]):.1f} s; inference wall "
                    f"{inf:.1f} s")  # fmt: skip
    mem = measure_daemon(SCRATCH / "own-memory", [day], model_dir)
    d = mem["runs"][0]
    report.add(section, "agent daemon with the imported model: idle / steady / peak (24 h export)",
               f"{mem['idle_mb']:.0f} / {d['steady_mb']:.0f} / {d['peak_mb']:.0f} MB RSS",
               note="reported beside the bundled model's budgets (section 4), not held to them")  # fmt: skip
    report.raw["own_model_day"] = {"passes": passes, "memory": mem}


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.own_model")
    ap.add_argument("command", choices=["build"])
    ap.add_argument("folder", type=Path)
    a = ap.parse_args(argv)
    info = build(a.folder)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

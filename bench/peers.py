"""Peers of the agent's runtime on the same model: ONNX Runtime int8 (QDQ) and float, LiteRT float.

What a user would pick instead for CPU inference: the agent's ``.tflite`` converted by ``tf2onnx``
1.17 (``--tflite``: the int8 graph as QuantizeLinear/DequantizeLinear around integer kernels, i.e.
statically quantized QDQ; ``--tflite --dequantize``: the same weights as float, int8 only at the
input and output). tf2onnx and onnx are installed once into ``build/bench-onnx`` (``pip install
--target``, no dependencies: their pins are met by the shared venv, and TensorFlow stays as it is) and
run in a worker process; the converted files are cached by the ``.tflite``'s sha256. A conversion
that fails is reported as a finding, with its error, not dropped. LiteRT float needs the float Keras
model (converted by TensorFlow's TFLiteConverter in a worker, cached likewise).

Every peer gets the same scaled windows, one thread (``intra_op_num_threads = 1``, sequential) and
the same batch as the agent's runner; rounds interleave in time; rates are windows per CPU-second.
Agreement: the share of windows whose argmax equals the agent's int8 argmax, and, when a float
reference is given, the float reference's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from bench.common import ROOT, Report, fmt, median, spread

log = logging.getLogger(__name__)

ONNX_DIR = ROOT / "build" / "bench-onnx"
CACHE = ROOT / ".cache" / "bench-peers"
TF2ONNX, ONNX = "tf2onnx==1.17.0", "onnx==1.23.2"
OPSET = 17

Predict = Callable[[NDArray[np.float32]], NDArray[np.float32]]


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def ensure_tf2onnx() -> str | None:
    """tf2onnx and onnx in build/bench-onnx (installed once); None when ready, else why not."""
    if (ONNX_DIR / "tf2onnx").is_dir() and (ONNX_DIR / "onnx").is_dir():
        return None
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
           "--target", str(ONNX_DIR), TF2ONNX, ONNX]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return f"pip install --target {ONNX_DIR} {TF2ONNX} {ONNX} failed: {proc.stderr.strip()[-500:]}"
    return None


def _worker_env() -> dict[str, str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ONNX_DIR), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def to_onnx(tflite: Path, *, dequantize: bool) -> tuple[Path | None, str]:
    """The .tflite as ONNX (cached); (path, '') or (None, the converter's error)."""
    why = ensure_tf2onnx()
    if why:
        return None, why
    out = CACHE / f"{_sha(tflite)}-{'float' if dequantize else 'int8'}.onnx"
    if out.is_file():
        return out, ""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tf2onnx.convert", "--tflite", str(tflite), "--output", str(out),
           "--opset", str(OPSET), *(["--dequantize"] if dequantize else [])]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_worker_env(), cwd=CACHE)
    if proc.returncode != 0 or not out.is_file():
        err = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        return None, f"tf2onnx {'--dequantize ' if dequantize else ''}failed ({proc.returncode}): " + (
            err[-1] if err else proc.stderr.strip()[-300:]
        )
    return out, ""


def tflite_float(keras_path: Path) -> tuple[Path | None, str]:
    """The float Keras model as a float .tflite (TFLiteConverter without optimizations, cached)."""
    out = CACHE / f"{_sha(keras_path)}-float.tflite"
    if out.is_file():
        return out, ""
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "bench.peers", "tflite-float", str(keras_path), str(out)],
                          capture_output=True, text=True, timeout=900, env=_worker_env(), cwd=ROOT)  # fmt: skip
    if proc.returncode != 0 or not out.is_file():
        return None, f"TFLiteConverter failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"
    return out, ""


# -- runners -------------------------------------------------------------------------------------------


def _quant(detail: tuple[float, int] | None, dtype: str) -> tuple[float, int] | None:
    return detail if "int8" in dtype else None


def ort_runner(path: Path, in_q: tuple[float, int] | None, out_q: tuple[float, int] | None, batch: int) -> Predict:
    """An ONNX Runtime session on one thread; int8 ends quantized with the agent's model's parameters."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp, outp = sess.get_inputs()[0], sess.get_outputs()[0]
    qi, qo = _quant(in_q, inp.type), _quant(out_q, outp.type)

    def predict(x: NDArray[np.float32]) -> NDArray[np.float32]:
        parts = []
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            if qi is not None:
                xb = np.clip(np.rint(xb / np.float32(qi[0])) + qi[1], -128, 127).astype(np.int8)
            y = sess.run(None, {inp.name: xb})[0]
            parts.append((y.astype(np.float32) - qo[1]) * np.float32(qo[0]) if qo is not None else y)
        return np.concatenate(parts).astype(np.float32)

    return predict


def litert_runner(path: Path, batch: int) -> Predict:
    from har_edge.agent.runtime import TFLiteRunner

    runner = TFLiteRunner(path, threads=1, batch=batch)
    return runner.predict


# -- the comparison ------------------------------------------------------------------------------------------


def compare(
    report: Report,
    section: str,
    *,
    model_dir: Path,
    x: NDArray[np.float32],
    agent: Predict,
    float_keras: Path | None,
    batch: int,
    rounds: int,
    eval_x: NDArray[np.float32] | None = None,
    float_probs: NDArray[np.float32] | None = None,
) -> dict[str, Any]:
    """Rows for each peer (windows/s/core, agreement) and the agent int8 vs the best peer (target >= 1.0x)."""
    from har_edge.agent.runtime import TFLiteRunner

    tflite = model_dir / "model.tflite"
    ref = TFLiteRunner(tflite, threads=1, batch=batch)
    in_q, out_q = ref._in_q, ref._out_q
    peers: dict[str, Predict] = {}
    problems: dict[str, str] = {}
    for name, deq in (("ONNX Runtime int8 (QDQ)", False), ("ONNX Runtime float", True)):
        path, err = to_onnx(tflite, dequantize=deq)
        if path is None:
            problems[name] = err
            continue
        try:
            peers[name] = ort_runner(path, in_q, out_q, batch)
        except Exception as exc:  # a converted file ONNX Runtime refuses is a finding too
            problems[name] = f"ONNX Runtime refused the converted model: {type(exc).__name__}: {exc}"[:400]
    if float_keras is not None and Path(float_keras).is_file():
        path, err = tflite_float(Path(float_keras))
        if path is None:
            problems["LiteRT float"] = err
        else:
            peers["LiteRT float"] = litert_runner(path, batch)
    else:
        problems["LiteRT float"] = "no float Keras model of this .tflite here (build/trainer/train/model.keras)"
    runs: dict[str, Predict] = {"agent int8 (LiteRT)": agent, **peers}
    for fn in runs.values():
        fn(x[:batch])
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            c = time.process_time()
            fn(x)
            times[name].append(len(x) / (time.process_time() - c))
    ev = x if eval_x is None else eval_x
    base = agent(ev).argmax(1)
    agree = {name: float((fn(ev).argmax(1) == base).mean()) for name, fn in peers.items()}
    agree_float = (
        {name: float((fn(ev).argmax(1) == float_probs.argmax(1)).mean()) for name, fn in runs.items()}
        if float_probs is not None
        else {}
    )
    mine = median(times["agent int8 (LiteRT)"])
    for name in peers:
        rate = median(times[name])
        vs_float = f"; vs Keras float {agree_float[name] * 100:.2f}%" if name in agree_float else ""
        report.add(section, f"peer: {name}, 1 thread, batch {batch}", f"{fmt(rate)} w/s/core",
                   ratio=f"agent int8 {mine / rate:.2f}x",
                   note=f"argmax agreement with the agent's int8: {agree[name] * 100:.2f}%{vs_float}; per round "
                        f"{spread(times[name])} w/s/core")  # fmt: skip
    for name, why in problems.items():
        report.add(section, f"peer: {name}", "n/a", note=why)
    if peers:
        best = max(peers, key=lambda k: median(times[k]))
        ratio = mine / median(times[best])
        ratios = [a / b for a, b in zip(times["agent int8 (LiteRT)"], times[best], strict=True)]
        report.add(section, "agent int8 vs the best peer", f"{ratio:.2f}x", baseline=f"{best}",
                   ratio=f"{ratio:.2f}x", target=">= 1.0x", ok=ratio >= 1.0,
                   note=f"agent {fmt(mine)} w/s/core; per round {spread(ratios)}x"
                        + (f"; agent int8 vs Keras float {agree_float['agent int8 (LiteRT)'] * 100:.2f}%"
                           if agree_float else ""))  # fmt: skip
    return {"rates": times, "agreement": agree, "agreement_float": agree_float, "problems": problems}


# -- worker ---------------------------------------------------------------------------------------------------


def _tflite_float(keras_path: Path, out: Path) -> None:
    import keras
    import tensorflow as tf

    model = keras.models.load_model(keras_path, compile=False)
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    out.write_bytes(conv.convert())


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peers")
    ap.add_argument("command", choices=["tflite-float"])
    ap.add_argument("keras", type=Path)
    ap.add_argument("out", type=Path)
    a = ap.parse_args(argv)
    _tflite_float(a.keras, a.out)
    print(json.dumps({"out": str(a.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

"""Worker: TensorFlow Keras on the float model, one core, driven line by line over stdin/stdout.

Started once by :mod:`bench.inference` so that its rounds interleave in time with
the TFLite rounds of the parent (on a shared machine, figures taken minutes
apart are not comparable). Commands, one JSON object per line:

* ``{"op": "call", "batch": 64}``: the whole window set through ``model(x, training=False)``
  in batches (eager call, the way a Python service calls a Keras model);
* ``{"op": "predict", "batch": 64}``: the same through ``model.predict(x, batch_size=...)``
  (Keras's compiled predict loop);
* ``{"op": "single", "n": 10}``: ``model.predict`` on one window, ``n`` times
  (how the project's predecessor served);
* ``{"op": "probs", "out": "path.npy", "windows": "other.npy"}``: probabilities of every window
  (of ``windows`` when given), saved;
* ``{"op": "quit"}``.

Each answer is one JSON line with ``wall`` and ``cpu`` (process CPU seconds: TF's
own threads included). The first line written is the model description:
where it came from, parameters, MACs per window.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")


def default_keras_path() -> Path | None:
    """Where ``har-train train`` saves the float model (build/trainer/train/model.keras by default)."""
    root = Path(__file__).resolve().parents[1]
    try:
        from har_edge.trainer.settings import load_settings
        from har_edge.trainer.train import MODEL_FILE

        params = root / "params.yaml"
        return load_settings(params if params.is_file() else None).train_dir / MODEL_FILE
    except Exception:
        return root / "build" / "trainer" / "train" / "model.keras"


def keras_macs(model: Any) -> int:
    """Multiply-accumulates per window of the Conv1D/Conv2D/Dense layers."""
    from keras import layers

    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv1D):
            total += (
                layer.output.shape[1] * layer.kernel_size[0] * layer.input.shape[-1] // layer.groups * layer.filters
            )
        elif isinstance(layer, layers.Conv2D):
            oh, ow = layer.output.shape[1:3]
            kh, kw = layer.kernel_size
            total += oh * ow * kh * kw * layer.input.shape[-1] // layer.groups * layer.filters
        elif isinstance(layer, layers.Dense):
            total += layer.input.shape[-1] * layer.units
    return int(total)


def load(path: str | None, window: int, channels: int, classes: int) -> tuple[Any, str]:
    import keras

    if path:
        return keras.models.load_model(path, compile=False), f"file {path}"
    from har_edge.trainer.model import build_model
    from har_edge.trainer.settings import TrainSettings

    keras.utils.set_random_seed(0)
    model = build_model(TrainSettings(), window=window, channels=channels, classes=classes)
    return model, "trainer.model.build_model(TrainSettings()) with random weights"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", required=True, help=".npy of scaled windows (n, window, channels)")
    ap.add_argument("--model", default="", help=".keras file; empty: build the architecture from trainer.model")
    ap.add_argument("--classes", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    x = np.load(args.windows)
    model, origin = load(args.model or None, x.shape[1], x.shape[2], args.classes)
    out = sys.stdout
    out.write(json.dumps({
        "origin": origin, "params": int(model.count_params()), "macs": keras_macs(model),
        "tensorflow": tf.__version__, "keras": __import__("keras").__version__,
        "input_shape": list(model.input_shape[1:]), "output_size": int(model.output_shape[-1]),
    }) + "\n")  # fmt: skip
    out.flush()
    batches: dict[int, list[Any]] = {}

    def tensors(batch: int) -> list[Any]:
        if batch not in batches:  # converted once, outside the clock
            batches[batch] = [tf.constant(x[i : i + batch]) for i in range(0, len(x), batch)]
        return batches[batch]

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        w, c = time.perf_counter(), time.process_time()
        n = len(x)
        if op == "call":
            for b in tensors(cmd["batch"]):
                model(b, training=False).numpy()
        elif op == "predict":
            model.predict(x, batch_size=cmd["batch"], verbose=0)
        elif op == "single":
            n = cmd["n"]
            for i in range(n):
                model.predict(x[i : i + 1], verbose=0)
        elif op == "probs":
            xs = np.load(cmd["windows"]) if cmd.get("windows") else x
            np.save(cmd["out"], model.predict(xs, batch_size=256, verbose=0).astype(np.float32))
        elif op == "warm":
            model(tensors(cmd["batch"])[0], training=False)
            model.predict(x[: cmd["batch"]], batch_size=cmd["batch"], verbose=0)
            model.predict(x[:1], verbose=0)
        out.write(
            json.dumps({"op": op, "n": n, "wall": time.perf_counter() - w, "cpu": time.process_time() - c}) + "\n"
        )
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

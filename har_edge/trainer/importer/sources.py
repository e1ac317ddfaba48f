"""Reading what a study hands over: the model file, its labels, its scaler, its training baseline."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from har_edge.trainer.errors import ImportRefused

log = logging.getLogger(__name__)

#: op types that mean a SavedModel holds a recurrent loop (Keras 3 cannot rebuild it unrolled)
_LOOP_OPS = {"While", "StatelessWhile", "TensorListReserve", "TensorListFromTensor"}


@dataclass
class Source:
    """The model to import: ``kind`` keras | savedmodel | tflite."""

    path: Path
    kind: str
    keras_model: Any = None  # keras.Model for kind keras
    tflite_dtype: str = ""  # input dtype of a .tflite source
    input_shape: tuple[int, int] = (0, 0)  # (window, channels)
    outputs: int = 0


def _json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImportRefused(f"{what} file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImportRefused(f"{what} file {path} is not readable JSON: {exc}") from None


def read_labels(spec: str) -> list[str]:
    """Labels from a JSON file (a list, ``{index: name}`` or ``{name: index}``) or a comma-separated list."""
    path = Path(spec)
    if not path.is_file():
        if spec.endswith(".json"):
            raise ImportRefused(f"labels file {spec} does not exist")
        labels = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        doc = _json(path, "labels")
        if isinstance(doc, list):
            labels = [str(x) for x in doc]
        elif isinstance(doc, dict) and doc:
            keys, values = list(doc), list(doc.values())
            if all(str(k).lstrip("-").isdigit() for k in keys):
                pairs = sorted((int(k), str(v)) for k, v in doc.items())
            elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                pairs = sorted((int(v), str(k)) for k, v in doc.items())
            else:
                raise ImportRefused(f"labels file {path}: a mapping must be {{index: name}} or {{name: index}}")
            idx = [i for i, _ in pairs]
            if idx != list(range(len(idx))):
                raise ImportRefused(f"labels file {path}: the indices {idx} are not 0..{len(idx) - 1}")
            labels = [n for _, n in pairs]
        else:
            raise ImportRefused(f"labels file {path} is neither a list nor a mapping of labels")
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ImportRefused(f"labels {spec}: need at least two distinct labels, got {labels}")
    return labels


def read_scaler(path: Path | None, channels: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(mean, scale, how) from a StandardScaler JSON (mean/scale or mean_/scale_); identity when ``path`` is None."""
    if path is None:
        return np.zeros(channels, np.float32), np.ones(channels, np.float32), "none: the model scales its own input"
    doc = _json(Path(path), "scaler")
    if not isinstance(doc, dict):
        raise ImportRefused(f"scaler file {path} is not a JSON object with mean and scale")
    mean = doc.get("mean", doc.get("mean_"))
    scale = doc.get("scale", doc.get("scale_"))
    if mean is None or scale is None:
        raise ImportRefused(f"scaler file {path} has no mean/scale (or sklearn's mean_/scale_): keys {sorted(doc)}")
    m, s = np.asarray(mean, np.float32).ravel(), np.asarray(scale, np.float32).ravel()
    if len(m) != channels or len(s) != channels:
        raise ImportRefused(f"scaler file {path} has {len(m)}/{len(s)} values, the model takes {channels} channels")
    if not (s > 0).all():
        raise ImportRefused(f"scaler file {path}: every scale must be > 0")
    return m, s, f"StandardScaler from {Path(path).name}"


def read_baseline(path: Path | None) -> dict[str, Any] | None:
    """A study's training baseline: ``{"channels": {name: {mean,std,min,max}}, "classes": {label: {...}}}``."""
    if path is None:
        return None
    doc = _json(Path(path), "baseline")
    if not isinstance(doc, dict) or "channels" not in doc:
        raise ImportRefused(f"baseline file {path} needs a 'channels' object (per channel mean/std/min/max)")
    return doc


def _graph_ops(saved: Any) -> set[str]:
    ops: set[str] = set()
    for fn in saved.signatures.values():
        graph = fn.graph
        ops.update(op.type for op in graph.get_operations())
        for f in graph.as_graph_def().library.function:
            ops.update(n.op for n in f.node_def)
    return ops


def open_source(path: Path) -> Source:
    """Load the model to import; refuse what cannot be rebuilt, saying what to hand over instead."""
    path = Path(path)
    if not path.exists():
        raise ImportRefused(f"model {path} does not exist")
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ImportRefused(f"{path} is a folder without saved_model.pb: hand over a .keras, .h5 or .tflite file")
        import tensorflow as tf

        saved = tf.saved_model.load(str(path))
        if "serving_default" not in saved.signatures:
            raise ImportRefused(f"SavedModel {path} has no serving_default signature")
        loops = _graph_ops(saved) & _LOOP_OPS
        if loops:
            raise ImportRefused(
                f"SavedModel {path} holds a recurrent loop ({', '.join(sorted(loops))}); Keras 3 cannot rebuild "
                "a SavedModel unrolled: save it as .keras (model.save('model.keras')) and import that"
            )
        fn = saved.signatures["serving_default"]
        spec = next(iter(fn.structured_input_signature[1].values()))
        out = next(iter(fn.structured_outputs.values()))
        shape = tuple(int(d) for d in spec.shape[1:])
        return Source(path, "savedmodel", input_shape=_shape(shape, path), outputs=int(out.shape[-1]))
    suffix = path.suffix.lower()
    if suffix in (".keras", ".h5", ".hdf5"):
        import keras

        try:
            model = keras.models.load_model(path, compile=False)
        except Exception as exc:  # keras raises many types for a file it cannot read
            raise ImportRefused(
                f"{path} does not load in Keras {keras.__version__}: {type(exc).__name__}: {exc}"
            ) from None
        shape = tuple(int(d) if d is not None else -1 for d in model.input_shape[1:])
        return Source(
            path, "keras", keras_model=model, input_shape=_shape(shape, path), outputs=int(model.output_shape[-1])
        )
    if suffix == ".tflite":
        from ai_edge_litert.interpreter import Interpreter

        try:
            interp = Interpreter(model_path=str(path))
        except (ValueError, RuntimeError) as exc:
            raise ImportRefused(f"{path} does not load in LiteRT: {exc}") from None
        inp, out = interp.get_input_details(), interp.get_output_details()
        if len(inp) != 1 or len(out) != 1:
            raise ImportRefused(f"{path} has {len(inp)} inputs and {len(out)} outputs; a har-edge model has one each")
        shape = tuple(int(d) for d in inp[0]["shape"][1:])
        return Source(
            path,
            "tflite",
            tflite_dtype=np.dtype(inp[0]["dtype"]).name,
            input_shape=_shape(shape, path),
            outputs=int(out[0]["shape"][-1]),
        )
    raise ImportRefused(f"{path}: not a .keras, .h5, .tflite file or SavedModel folder")


def _shape(shape: tuple[int, ...], path: Path) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) <= 0:
        raise ImportRefused(
            f"{path} takes input of shape {shape}; a har-edge model takes fixed (window, channels) windows"
        )
    return shape[0], shape[1]

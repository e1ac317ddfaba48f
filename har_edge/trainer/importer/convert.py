"""Make a Keras model convertible to full int8, exactly in float.

* Recurrent layers (LSTM, GRU, SimpleRNN, also inside Bidirectional) are rebuilt
  with ``unroll=True`` and the same weights: Keras 3's looped form does not
  convert (TensorListReserve), the unrolled one does.
* A BatchNormalization right after a recurrent or Dense layer is folded into the
  next Dense (or 'valid' Conv1D) layer: TF 2.21's int8 converter mis-scales such
  a BatchNorm, and the fold is exact in float.

Only a chain of layers (one input, each layer feeding the next) is rebuilt; the
rebuilt model is compared with the original on real windows and refused when it
differs by more than :data:`MAX_REBUILD_DP`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from har_edge.trainer.errors import ImportRefused

log = logging.getLogger(__name__)

MAX_REBUILD_DP = 1e-5
_RECURRENT = ("LSTM", "GRU", "SimpleRNN")
_PASS_THROUGH = ("Dropout", "SpatialDropout1D", "GaussianNoise", "GaussianDropout", "ActivityRegularization")


@dataclass
class Rebuilt:
    unrolled: Any  # keras.Model: recurrent layers unrolled, BatchNorms kept (stored for adaptation)
    folded: Any  # keras.Model: unrolled and with BatchNorms folded (what is converted)
    folded_layers: list[str] = field(default_factory=list)
    unrolled_layers: list[str] = field(default_factory=list)


def _chain(model: Any) -> list[Any]:
    import keras

    layers = [la for la in model.layers if not isinstance(la, keras.layers.InputLayer)]
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ImportRefused(
            f"{model.name} has {len(model.inputs)} inputs / {len(model.outputs)} outputs: need one each"
        )
    return layers


def _unrolled_copy(layer: Any) -> tuple[Any, bool]:
    import keras

    cls = type(layer).__name__
    cfg = layer.get_config()
    if cls in _RECURRENT:
        cfg["unroll"] = True
        return type(layer).from_config(cfg), True
    if cls == "Bidirectional":
        inner = cfg["layer"]
        inner["config"]["unroll"] = True
        if cfg.get("backward_layer"):
            cfg["backward_layer"]["config"]["unroll"] = True
        return keras.layers.Bidirectional.from_config(cfg), True
    return type(layer).from_config(cfg), False


def _bn_affine(bn: Any) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm at inference as ``x * g + c``."""
    mean = np.asarray(bn.moving_mean.numpy(), np.float64)
    var = np.asarray(bn.moving_variance.numpy(), np.float64)
    gamma = np.asarray(bn.gamma.numpy(), np.float64) if bn.scale else np.ones_like(mean)
    beta = np.asarray(bn.beta.numpy(), np.float64) if bn.center else np.zeros_like(mean)
    g = gamma / np.sqrt(var + bn.epsilon)
    return g, beta - mean * g


def _foldable_into(layer: Any) -> bool:
    cls = type(layer).__name__
    if cls == "Dense":
        return True
    return cls == "Conv1D" and layer.get_config().get("padding") == "valid"


def _fold(bn: Any, nxt: Any, new_next: Any) -> None:
    """Set ``new_next``'s weights to ``nxt``'s with ``bn`` folded in."""
    g, c = _bn_affine(bn)
    w = [np.asarray(v, np.float64) for v in nxt.get_weights()]
    kernel = w[0]
    bias = w[1] if len(w) > 1 else np.zeros(kernel.shape[-1])
    if type(nxt).__name__ == "Dense":
        new_kernel = g[:, None] * kernel
        new_bias = bias + c @ kernel
    else:  # Conv1D (k, in, out), valid padding
        new_kernel = kernel * g[None, :, None]
        new_bias = bias + np.einsum("i,kio->o", c, kernel)
    new_next.set_weights([new_kernel.astype(np.float32), new_bias.astype(np.float32)])


def rebuild(model: Any) -> Rebuilt:
    """The unrolled twin of ``model`` and its BatchNorm-folded form (both exact in float)."""
    import keras

    layers = _chain(model)
    window, channels = (int(d) for d in model.input_shape[1:])
    unrolled_names: list[str] = []

    def build(fold: bool) -> tuple[Any, list[str]]:
        inp = keras.Input(shape=(window, channels), name="window")
        x = inp
        folded: list[str] = []
        pending: list[tuple[Any, Any]] = []  # (new layer, source layer) whose weights to copy once built
        i = 0
        while i < len(layers):
            la = layers[i]
            cls = type(la).__name__
            prev = type(layers[i - 1]).__name__ if i else ""
            if fold and cls == "BatchNormalization" and (prev in _RECURRENT or prev in ("Bidirectional", "Dense")):
                j = i + 1
                while j < len(layers) and type(layers[j]).__name__ in _PASS_THROUGH:
                    j += 1
                axis = la.get_config().get("axis", -1)
                last_axis = axis in (-1, [-1], len(la.input.shape) - 1, [len(la.input.shape) - 1])
                if j < len(layers) and _foldable_into(layers[j]) and last_axis:
                    for k in range(i + 1, j):  # pass-through layers between
                        x = _unrolled_copy(layers[k])[0](x)
                    new_next, _ = _unrolled_copy(layers[j])
                    x = new_next(x)
                    _fold(la, layers[j], new_next)
                    folded.append(f"{la.name} -> {layers[j].name}")
                    i = j + 1
                    continue
                log.warning("BatchNorm %s after %s cannot be folded (next layer not Dense/valid Conv1D)", la.name, prev)
            new, unrolled = _unrolled_copy(la)
            if unrolled and not fold:
                unrolled_names.append(la.name)
            x = new(x)
            pending.append((new, la))
            i += 1
        for new, la in pending:
            new.set_weights(la.get_weights())
        return keras.Model(inp, x, name=f"{model.name}_rebuilt"), folded

    unrolled, _ = build(fold=False)
    folded_model, folded = build(fold=True)
    return Rebuilt(unrolled, folded_model, folded, unrolled_names)


def max_dp(a: Any, b: Any, windows: np.ndarray, batch: int = 256) -> float:
    """Largest absolute difference of the two models' outputs on ``windows``."""
    pa = predict(a, windows, batch)
    pb = predict(b, windows, batch)
    return float(np.abs(pa - pb).max()) if len(windows) else 0.0


def predict(model: Any, windows: np.ndarray, batch: int = 256) -> np.ndarray:
    out = [np.asarray(model(windows[i : i + batch], training=False)) for i in range(0, len(windows), batch)]
    return np.concatenate(out).astype(np.float32) if out else np.empty((0, 0), np.float32)


def check_rebuild(original: Any, rebuilt: Rebuilt, scaled: np.ndarray) -> dict[str, float]:
    """max |dp| of both rebuilds against the original; refuse beyond :data:`MAX_REBUILD_DP`."""
    figures = {
        "rebuild_unrolled_max_dp": max_dp(original, rebuilt.unrolled, scaled),
        "rebuild_folded_max_dp": max_dp(original, rebuilt.folded, scaled),
    }
    worst = max(figures.values())
    if worst > MAX_REBUILD_DP:
        raise ImportRefused(
            f"the rebuilt float model differs from {original.name} by {worst:.2e} (> {MAX_REBUILD_DP:g}) on "
            f"{len(scaled)} windows: only a chain of layers is rebuilt; save a Sequential-style model"
        )
    return figures

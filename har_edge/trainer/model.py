"""Keras models that convert to full-int8 TFLite builtins.

``cnn`` (default): three blocks of Conv1D (no bias) -> BatchNorm -> ReLU ->
MaxPool(2), global average pooling, a small dense head. With the defaults
(32/64/128 filters, kernels 7/5/5, dense 64) it has 62,086 parameters and needs
~3.35 M multiply-accumulates per 200x6 window; the converter folds each
BatchNorm into its convolution, so the int8 graph is CONV_2D, MAX_POOL_2D,
MEAN, FULLY_CONNECTED, SOFTMAX (+ reshapes).

``cnn_bilstm``: the seed project's idea (convolutions, then a bidirectional
LSTM) in a form that converts to builtins: ``LSTM(unroll=True)`` after two
pooling blocks (50 time steps for a 200-sample window) and no BatchNorm after
the recurrent layer (TF 2.21's int8 converter mis-scales a BatchNorm after a BiLSTM). Its unrolled
recurrence is many small sequential ops, several times slower per window on
the edge, and ~620 KB as int8: use it only when the CNN is not enough.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from har_edge.trainer.settings import TrainSettings

if TYPE_CHECKING:  # pragma: no cover
    import keras


def build_model(cfg: TrainSettings, *, window: int, channels: int, classes: int) -> keras.Model:
    import keras
    from keras import layers

    inputs = keras.Input(shape=(window, channels), name="windows")
    x = inputs
    if cfg.input_noise > 0:  # training-time augmentation only: not part of the inference graph
        x = layers.GaussianNoise(cfg.input_noise, seed=cfg.seed, name="noise")(x)
    blocks = len(cfg.filters) if cfg.arch == "cnn" else 2
    for i, (filters, kernel) in enumerate(zip(cfg.filters[:blocks], cfg.kernels[:blocks], strict=False), start=1):
        x = layers.Conv1D(filters, kernel, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        x = layers.MaxPooling1D(2, name=f"pool{i}")(x)
    if cfg.arch == "cnn":
        x = layers.GlobalAveragePooling1D(name="gap")(x)
    else:
        x = layers.Bidirectional(layers.LSTM(cfg.lstm_units, unroll=True), name="bilstm")(x)
    x = layers.Dropout(cfg.dropout, name="drop1")(x)
    x = layers.Dense(cfg.dense, activation="relu", name="dense")(x)
    x = layers.Dropout(cfg.dropout, name="drop2")(x)
    outputs = layers.Dense(classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name=f"har_{cfg.arch}")


def macs_per_window(model: keras.Model) -> int:
    """Multiply-accumulates of one window through the Conv1D and Dense layers (the bulk of the cost)."""
    from keras import layers

    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv1D):
            steps = layer.output.shape[1]
            total += steps * layer.kernel_size[0] * layer.input.shape[-1] * layer.filters
        elif isinstance(layer, layers.Dense):
            total += layer.input.shape[-1] * layer.units
        elif isinstance(layer, layers.Bidirectional):
            steps, features = layer.input.shape[1], layer.input.shape[-1]
            units = layer.forward_layer.units
            total += 2 * steps * 4 * (features + units) * units  # four gates, two directions
    return int(total)

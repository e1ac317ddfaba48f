"""The one module that talks to a TFLite runtime.

``ai_edge_litert`` (LiteRT, maintained, runs int8 through XNNPACK) is used when
installed, ``tflite_runtime`` otherwise (its last release, for old 32-bit
boards). Everything else in har-edge sees only :class:`TFLiteRunner.predict`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from har_edge.agent.cpus import resolve_threads
from har_edge.agent.errors import ModelValidationError, RuntimeUnavailable
from har_edge.agent.nativelog import filtered_stderr

log = logging.getLogger(__name__)

#: a tensor's details as the interpreter gives them (``index``, ``shape``, ``dtype``, ``quantization``, ...)
TensorDetails = dict[str, Any]


class InterpreterLike(Protocol):
    """The part of a LiteRT / tflite_runtime ``Interpreter`` har-edge uses (neither module is typed)."""

    def get_input_details(self) -> list[TensorDetails]: ...
    def get_output_details(self) -> list[TensorDetails]: ...
    def get_tensor_details(self) -> list[TensorDetails]: ...
    def resize_tensor_input(self, input_index: int, tensor_size: Sequence[int], strict: bool = ...) -> None: ...
    def allocate_tensors(self) -> None: ...
    def set_tensor(self, tensor_index: int, value: NDArray[Any]) -> None: ...
    def invoke(self) -> None: ...
    def get_tensor(self, tensor_index: int) -> NDArray[Any]: ...


def _import_interpreter() -> tuple[Callable[..., InterpreterLike], str]:
    forced = os.environ.get("HAR_EDGE_TFLITE_RUNTIME", "")
    errors = []
    if forced in ("", "ai_edge_litert"):
        try:
            from ai_edge_litert.interpreter import Interpreter

            return Interpreter, "ai_edge_litert"
        except ImportError as exc:
            errors.append(f"ai_edge_litert: {exc}")
    if forced in ("", "tflite_runtime"):
        try:
            from tflite_runtime.interpreter import Interpreter

            return Interpreter, "tflite_runtime"
        except ImportError as exc:
            errors.append(f"tflite_runtime: {exc}")
    raise RuntimeUnavailable(
        "no TFLite runtime could be imported (" + "; ".join(errors) + "): "
        "pip install 'har-edge[edge]' (ai-edge-litert), or tflite-runtime on Python < 3.12"
    )


def runtime_name() -> str:
    return _import_interpreter()[1]


class TFLiteRunner:
    """A loaded ``.tflite`` classifier: float windows in, probabilities out.

    Inputs are quantized with the model's input scale and zero point when the
    model takes int8/uint8, windows run in batches of ``batch`` (the input tensor
    is resized once), and outputs are dequantized to float32 probabilities.
    """

    def __init__(self, model_path: Path, *, threads: int | str = 1, batch: int = 64) -> None:
        Interpreter, self.runtime = _import_interpreter()
        self.path = Path(model_path)
        self.batch = max(1, int(batch))
        #: interpreter threads (``auto``: the cores this process may use, see :mod:`har_edge.agent.cpus`)
        self.threads = resolve_threads(threads)
        try:
            self._interp = Interpreter(model_path=str(self.path), num_threads=self.threads)
        except (ValueError, RuntimeError) as exc:
            raise ModelValidationError(f"{self.path} does not load in {self.runtime}: {exc}") from None
        inp = self._interp.get_input_details()
        out = self._interp.get_output_details()
        if len(inp) != 1 or len(out) != 1:
            raise ModelValidationError(
                f"{self.path} has {len(inp)} inputs and {len(out)} outputs; a har-edge model has one of each"
            )
        self._in, self._out = inp[0], out[0]
        shape = tuple(int(s) for s in self._in["shape"])
        if len(shape) != 3:
            raise ModelValidationError(f"{self.path} input shape {shape} is not (batch, window, channels)")
        self.window, self.channels = shape[1], shape[2]
        self.input_dtype: np.dtype[Any] = np.dtype(self._in["dtype"])
        self.output_dtype: np.dtype[Any] = np.dtype(self._out["dtype"])
        self.output_size = int(self._out["shape"][-1])
        self._in_q = self._quant(self._in)
        self._out_q = self._quant(self._out)
        with filtered_stderr():  # the first allocation prints LiteRT's XNNPACK banner on fd 2
            self._resize(self.batch)

    @staticmethod
    def _quant(detail: Mapping[str, Any]) -> tuple[float, int] | None:
        scale, zero = detail.get("quantization", (0.0, 0))
        if np.dtype(detail["dtype"]) in (np.int8, np.uint8):
            if not scale:
                raise ModelValidationError("an integer tensor without quantization parameters")
            return float(scale), int(zero)
        return None

    def _resize(self, n: int) -> None:
        try:
            self._interp.resize_tensor_input(self._in["index"], [n, self.window, self.channels], strict=False)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelValidationError(f"{self.path} cannot run batches of {n}: {exc}") from None
        self._n = n

    @property
    def input_range(self) -> tuple[float, float] | None:
        """The scaled values an int8/uint8 input can represent (beyond them quantization clips); None for float."""
        if self._in_q is None:
            return None
        scale, zero = self._in_q
        info = np.iinfo(self.input_dtype)
        return (float((info.min - zero) * scale), float((info.max - zero) * scale))

    def describe(self) -> dict[str, str | int]:
        return {
            "runtime": self.runtime,
            "window": self.window,
            "channels": self.channels,
            "input_dtype": self.input_dtype.name,
            "output_dtype": self.output_dtype.name,
            "output_size": self.output_size,
            "threads": self.threads,
        }

    def _quantize(self, x: NDArray[np.float32]) -> NDArray[Any]:
        if self._in_q is None:
            return x.astype(self.input_dtype, copy=False)
        scale, zero = self._in_q
        info = np.iinfo(self.input_dtype)
        q = np.rint(x / np.float32(scale)) + zero
        quantized: NDArray[Any] = np.clip(q, info.min, info.max).astype(self.input_dtype)  # numpy types np.clip as Any
        return quantized

    def _quantize_into(self, x: NDArray[np.float32], out: NDArray[Any], tmp: NDArray[np.float32]) -> None:
        """``out[:] = _quantize(x)`` without temporaries (same operations, same rounding)."""
        if self._in_q is None:
            out[...] = x.astype(self.input_dtype, copy=False)
            return
        scale, zero = self._in_q
        info = np.iinfo(self.input_dtype)
        np.divide(x, np.float32(scale), out=tmp)
        np.rint(tmp, out=tmp)
        np.add(tmp, zero, out=tmp)
        np.clip(tmp, info.min, info.max, out=tmp)
        out[...] = tmp

    def _dequantize(self, y: NDArray[Any]) -> NDArray[np.float32]:
        if self._out_q is None:
            return y.astype(np.float32, copy=False)
        scale, zero = self._out_q
        return ((y.astype(np.float32) - zero) * np.float32(scale)).astype(np.float32)

    def predict(self, scaled: NDArray[np.floating[Any]], timings: list[float] | None = None) -> NDArray[np.float32]:
        """Probabilities (n, output_size) for standardised windows (n, window, channels).

        When ``timings`` is given, the per-window inference time of each batch
        (seconds) is appended to it.
        """
        import time

        scaled = np.asarray(scaled, dtype=np.float32)
        if scaled.ndim != 3 or scaled.shape[1:] != (self.window, self.channels):
            raise ValueError(
                f"windows of shape {scaled.shape[1:]} given, the model takes {(self.window, self.channels)}"
            )
        n = len(scaled)
        out = np.empty((n, self.output_size), np.float32)
        idx_in, idx_out = self._in["index"], self._out["index"]
        interp = self._interp
        buf = np.zeros(
            (self.batch if n >= self.batch else _tail_size(n, self.batch), self.window, self.channels), self.input_dtype
        )
        tmp = np.empty(buf.shape, np.float32)
        for i in range(0, n, self.batch):
            part = scaled[i : i + self.batch]
            m = len(part)
            size = self.batch if m == self.batch else _tail_size(m, self.batch)
            if size != self._n:  # a short batch runs at a smaller size instead of padding
                self._resize(size)
            self._quantize_into(part, buf[:m], tmp[:m])
            if m < size:
                buf[m:size] = 0
            t0 = time.perf_counter()
            interp.set_tensor(idx_in, buf[:size])
            interp.invoke()
            y = interp.get_tensor(idx_out)
            if timings is not None:
                timings.append((time.perf_counter() - t0) / m)
            out[i : i + m] = self._dequantize(y[:m])
        return out


def _tail_size(m: int, batch: int) -> int:
    """Input size for a batch of ``m < batch`` windows: the next power of two (few distinct sizes, little padding)."""
    return min(batch, 1 << max(0, (m - 1).bit_length()))

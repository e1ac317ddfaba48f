"""A verified model folder, ready to predict.

``load_model`` refuses a folder unless every check passes: the manifest is
valid, ``model.tflite`` and ``golden.npz`` have the sha256 the manifest names,
the runtime loads the model, its input and output agree with the manifest, and
(when asked) the golden windows reproduce their recorded outputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from har_edge.agent.errors import ModelValidationError
from har_edge.agent.manifest import MODEL_FILE, Manifest, read_manifest, verify_files
from har_edge.agent.preprocess import apply_scaler
from har_edge.agent.runtime import TFLiteRunner

log = logging.getLogger(__name__)

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


@dataclass
class LoadedModel:
    folder: Path
    manifest: Manifest
    runner: TFLiteRunner
    channel_map: Any = field(default=None)

    def __post_init__(self) -> None:
        if self.channel_map is None:
            self.channel_map = self.manifest.channel_map

    @property
    def label(self) -> str:
        return f"{self.manifest.name} {self.manifest.version}"

    def input_range(self) -> tuple[float, float] | None:
        """The scaled values the int8 input can represent (None for a float input)."""
        return self.runner.input_range

    def predict(
        self, raw_windows: np.ndarray, timings: list[float] | None = None, outside: np.ndarray | None = None
    ) -> np.ndarray:
        """Probabilities for stream windows (SI units, stream order): converted to the model's channels here.

        ``outside`` (float64, one per model channel), when given, is increased by the
        number of scaled values beyond the int8 input range (they are clipped).
        """
        return self.predict_scaled(self.scale(raw_windows), timings, outside)

    def scale(self, raw_windows: np.ndarray) -> np.ndarray:
        """Stream windows (SI units, stream order) as the model takes them: its channels, units, then its scaler."""
        return self.scale_model_units(self.channel_map.to_model(raw_windows))

    def scale_model_units(self, raw: np.ndarray) -> np.ndarray:
        """Raw windows already in the manifest's channels and units, with the scaler applied."""
        m = self.manifest
        return apply_scaler(raw, m.scaler.mean, m.scaler.scale)

    def predict_model_units(
        self, raw: np.ndarray, timings: list[float] | None = None, outside: np.ndarray | None = None
    ) -> np.ndarray:
        """Probabilities for raw windows already in the manifest's channels and units (the scaler applied here)."""
        return self.predict_scaled(self.scale_model_units(raw), timings, outside)

    def predict_scaled(
        self, scaled: np.ndarray, timings: list[float] | None = None, outside: np.ndarray | None = None
    ) -> np.ndarray:
        """Probabilities for windows already scaled (see :meth:`scale`); ``outside`` as in :meth:`predict`."""
        if outside is not None:
            rng = self.input_range()
            if rng is not None:
                outside += ((scaled < rng[0]) | (scaled > rng[1])).sum(axis=(0, 1))
        return self.runner.predict(scaled, timings)


def check_golden(model: LoadedModel) -> float:
    """Run the golden windows; return the largest deviation or raise if beyond the tolerance."""
    g = model.manifest.golden
    path = model.folder / g.file
    try:
        with np.load(path, allow_pickle=False) as data:
            windows, expected = data["windows"], data["probs"]
    except FileNotFoundError:
        raise ModelValidationError(
            f"{path} is missing: a model folder needs its golden windows; regenerate them with `har-train golden`"
        ) from None
    except (OSError, KeyError, ValueError) as exc:
        raise ModelValidationError(f"{path} is not a golden file with 'windows' and 'probs': {exc}") from None
    if len(windows) != g.count or expected.shape != (g.count, len(model.manifest.labels)):
        raise ModelValidationError(
            f"{path} holds {len(windows)} windows / outputs {expected.shape}, "
            f"the manifest says {g.count} windows of {len(model.manifest.labels)} labels"
        )
    got = model.predict_model_units(windows)
    dev = float(np.abs(got - expected).max())
    flips = int((got.argmax(1) != expected.argmax(1)).sum())
    if dev > g.atol or flips:
        raise ModelValidationError(
            f"{model.label} does not reproduce its golden windows in {model.runner.runtime} "
            f"(largest deviation {dev:.4f} > {g.atol}, {flips} of {g.count} labels differ): refusing it"
        )
    return dev


def load_model(
    folder: Path, *, threads: int | str = 1, batch: int = 64, check_golden_windows: bool = True
) -> LoadedModel:
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    runner = TFLiteRunner(folder / MODEL_FILE, threads=threads, batch=batch)
    problems = []
    if (runner.window, runner.channels) != (manifest.window, manifest.n_channels):
        problems.append(
            f"input takes windows of {runner.window}x{runner.channels}, "
            f"the manifest says {manifest.window}x{manifest.n_channels}"
        )
    if runner.output_size != len(manifest.labels):
        problems.append(f"output has {runner.output_size} classes, the manifest lists {len(manifest.labels)} labels")
    if runner.input_dtype.name != manifest.input_dtype:
        problems.append(f"input is {runner.input_dtype.name}, the manifest says {manifest.input_dtype}")
    if runner.output_dtype.name != manifest.output_dtype:
        problems.append(f"output is {runner.output_dtype.name}, the manifest says {manifest.output_dtype}")
    if problems:
        raise ModelValidationError(f"{folder}: " + "; ".join(problems))
    model = LoadedModel(folder, manifest, runner)
    if check_golden_windows:
        dev = check_golden(model)
        log.debug("golden windows of %s reproduce (largest deviation %.4f)", model.label, dev)
    return model

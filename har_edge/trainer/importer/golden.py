"""Golden windows: raw windows in the manifest's channels and units with the model's own outputs.

``golden.npz`` holds ``windows`` float32 (n, window, channels), raw values in
the manifest's channel order and units (before the scaler), and ``probs``
float32 (n, labels): the dequantized outputs the released ``model.tflite``
gave for them in the edge runtime. The agent reruns them at every load and
refuses the model when a probability moves by more than ``golden.atol`` or a
label changes. ``har-train golden FOLDER`` regenerates them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from har_edge.agent.manifest import GOLDEN_FILE, MODEL_FILE, Manifest, read_manifest, write_manifest
from har_edge.agent.preprocess import apply_scaler
from har_edge.agent.runtime import TFLiteRunner
from har_edge.common.hashing import sha256_file
from har_edge.trainer.errors import ImportRefused
from har_edge.trainer.export import choose_golden
from har_edge.trainer.npzio import save_npz

log = logging.getLogger(__name__)


def golden_outputs(model_path: Path, raw: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return TFLiteRunner(model_path, threads=1, batch=64).predict(apply_scaler(raw, mean, scale))


def pick(model_path: Path, raw: np.ndarray, mean: np.ndarray, scale: np.ndarray, per_class: int) -> np.ndarray:
    """The golden windows among ``raw``: per predicted class, the widest top-1/top-2 margins."""
    probs = golden_outputs(model_path, raw, mean, scale)
    return raw[choose_golden(probs, per_class)]


def write(folder: Path, raw: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> tuple[str, int]:
    """Write ``golden.npz`` for ``raw`` into ``folder``; return (sha256, count)."""
    folder = Path(folder)
    probs = golden_outputs(folder / MODEL_FILE, raw, mean, scale)
    save_npz(folder / GOLDEN_FILE, {"windows": raw.astype(np.float32), "probs": probs.astype(np.float32)})
    return sha256_file(folder / GOLDEN_FILE), len(raw)


def regenerate(folder: Path, raw: np.ndarray | None = None, per_class: int = 2) -> Manifest:
    """Rewrite the golden file (from its own windows, or ``raw``) and the manifest's golden entry."""
    folder = Path(folder)
    m = read_manifest(folder)
    if raw is None:
        path = folder / m.golden.file
        try:
            with np.load(path, allow_pickle=False) as data:
                raw = np.asarray(data["windows"], np.float32)
        except (OSError, KeyError, ValueError):
            raise ImportRefused(
                f"{path} is missing or unreadable: pass --data EXPORTS to draw golden windows from recordings"
            ) from None
        chosen = raw
    else:
        chosen = pick(folder / MODEL_FILE, raw, np.asarray(m.scaler.mean), np.asarray(m.scaler.scale), per_class)
    if chosen.shape[1:] != (m.window, m.n_channels):
        raise ImportRefused(
            f"golden windows of shape {chosen.shape[1:]}, the manifest says ({m.window}, {m.n_channels})"
        )
    sha, count = write(folder, chosen, np.asarray(m.scaler.mean), np.asarray(m.scaler.scale))
    golden = m.golden.model_copy(update={"sha256": sha, "count": count, "file": GOLDEN_FILE})
    new = m.model_copy(update={"golden": golden})
    write_manifest(folder, new)
    log.info("golden windows of %s %s regenerated: %d windows", m.name, m.version, count)
    return new

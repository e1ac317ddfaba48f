"""The training reference of a model (``Manifest.reference``): what the edge monitors against.

:func:`build_reference` is the one entry point (the export and ``har-train import
--data`` call it). Pure numpy; the temperature is fitted by minimising the
negative log-likelihood over a log-spaced grid, then refined.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from har_edge.agent.manifest import CHANNELS, MANIFEST_FILE, Manifest, read_manifest
from har_edge.agent.monitor.features import (
    CONFIDENCE_EDGES,
    SAMPLE_STRIDE,
    BinSet,
    bin_counts,
    calibrate,
    channel_samples,
    entropy,
    feature_names,
    uniform_edges,
    window_features,
)
from har_edge.agent.monitor.reference import (
    ConfidenceSummary,
    FeatureSummary,
    Histogram,
    InputSummary,
    MeasuredOn,
    Prior,
    Reference,
    Temperature,
    Temporal,
)

log = logging.getLogger(__name__)

CHANNEL_BINS = 20
FEATURE_BINS = 10
#: int8 input range in scaled units when the model's own is not given (TFLite converters pick about this)
DEFAULT_INPUT_RANGE = (-8.0, 8.0)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of top-1 confidence (equal-width bins)."""
    conf = probs.max(axis=1)
    hit = (probs.argmax(axis=1) == labels).astype(np.float64)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(hit[m].mean() - conf[m].mean())
    return float(total / max(1, len(conf)))


def _nll(probs: np.ndarray, labels: np.ndarray, t: float) -> float:
    q = calibrate(probs, t)
    return float(-np.log(np.clip(q[np.arange(len(labels)), labels], 1e-12, 1)).mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising NLL of ``softmax(log p / T)`` on labelled windows."""
    grid = np.exp(np.linspace(np.log(0.2), np.log(10.0), 60))
    losses = [_nll(probs, labels, t) for t in grid]
    i = int(np.argmin(losses))
    lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    for _ in range(30):  # golden-section refinement between the neighbours
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if _nll(probs, labels, a) < _nll(probs, labels, b):
            hi = b
        else:
            lo = a
    return float((lo + hi) / 2)


def _histograms(values: np.ndarray, names: list[str], bins: int) -> dict[str, Histogram]:
    """One histogram per column of ``values``, counted as the edge counts (:class:`BinSet`)."""
    edges = [uniform_edges(values[:, i], bins) for i in range(values.shape[1])]
    b = BinSet(edges)
    counts = b.split(b.counts(values))
    return {
        n: Histogram(edges=e, share=(c / max(1, c.sum())).tolist())
        for n, e, c in zip(names, edges, counts, strict=True)
    }


#: held-out windows are cut into blocks of this many consecutive windows of one group (about a short file)
BLOCK_WINDOWS = 90
#: the typical PSI of a histogram: this quantile of its PSI over the blocks
TYPICAL_QUANTILE = 0.95


def _with_typical_psi(
    inp: InputSummary, feats: FeatureSummary, held_out: np.ndarray, groups: np.ndarray, names: list[str]
) -> tuple[InputSummary, FeatureSummary]:
    """The summaries with ``typical_psi``: what blocks of held-out windows (a short file each) reach.

    Blocks of BLOCK_WINDOWS consecutive windows of one group hold one activity mix each, as a
    real file does; the verdict reads a file's PSI relative to their TYPICAL_QUANTILE.
    """
    from har_edge.agent.monitor.accumulate import DRIFT_STRIDE

    fnames = feature_names(names)
    ch_vals: dict[str, list[float]] = {n: [] for n in names}
    ft_vals: dict[str, list[float]] = {n: [] for n in fnames}
    ch_b = BinSet([inp.channels[n].edges for n in names])
    ch_share = np.concatenate([inp.channels[n].share for n in names])
    ft_b = BinSet([feats.features[n].edges for n in fnames])
    ft_share = np.concatenate([feats.features[n].share for n in fnames])
    for g in np.unique(groups):
        gw = held_out[groups == g]
        for a in range(0, len(gw) - BLOCK_WINDOWS + 1, BLOCK_WINDOWS):
            w = gw[a : a + BLOCK_WINDOWS : DRIFT_STRIDE]
            for n, v in zip(names, ch_b.psi(ch_b.counts(channel_samples(w)), ch_share).tolist(), strict=True):
                ch_vals[n].append(v)
            for n, v in zip(fnames, ft_b.psi(ft_b.counts(window_features(w)), ft_share).tolist(), strict=True):
                ft_vals[n].append(v)
    ch_typ = {n: float(np.quantile(v, TYPICAL_QUANTILE)) for n, v in ch_vals.items() if v}
    ft_typ = {n: float(np.quantile(v, TYPICAL_QUANTILE)) for n, v in ft_vals.items() if v}
    if not ch_typ:
        return inp, feats
    chans = {n: h.model_copy(update={"typical_psi": round(ch_typ[n], 4)}) for n, h in inp.channels.items()}
    fts = {n: h.model_copy(update={"typical_psi": round(ft_typ[n], 4)}) for n, h in feats.features.items()}
    return inp.model_copy(update={"channels": chans}), feats.model_copy(update={"features": fts})


def _flip_rate(pred: np.ndarray) -> tuple[float, float]:
    if len(pred) < 2:
        return 0.0, float(len(pred))
    flips = int((pred[1:] != pred[:-1]).sum())
    return flips / (len(pred) - 1), len(pred) / (flips + 1)


def build_reference(
    scaled_windows: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray | None = None,
    measured_on: MeasuredOn = "labelled",
    *,
    channel_names: Sequence[str] | None = None,
    input_windows: np.ndarray | None = None,
    input_measured_on: MeasuredOn | None = None,
    temperature_probs: np.ndarray | None = None,
    temperature_labels: np.ndarray | None = None,
    input_range: tuple[float, float] = DEFAULT_INPUT_RANGE,
    low_confidence: float = 0.6,
    source: str = "",
    groups: np.ndarray | None = None,
) -> Reference:
    """The reference of a model from held-out windows and the model's outputs for them.

    ``scaled_windows`` (n, window, channels) are scaled as the model is fed, in time order
    per recording (the flip rate is read from consecutive windows); ``probs`` (n, classes)
    are the model's outputs for them; ``labels`` (n,) the true classes, or None.
    ``measured_on`` says what the windows are. Optional: ``input_windows`` (e.g. the
    training windows) for the input and feature histograms, and labelled validation
    outputs to fit the temperature on (default: ``probs``/``labels`` themselves).
    Without labels the temperature stays 1 (``uncalibrated``) and the prior is the
    predicted one. ``groups`` (n,): the recording or subject of each held-out window;
    with it every histogram records ``typical_psi``, the largest PSI one held-out
    group (of at least MIN_GROUP_WINDOWS windows) reaches against it.
    """
    x = np.asarray(scaled_windows, dtype=np.float32)
    p = np.asarray(probs, dtype=np.float32)
    if x.ndim != 3 or len(x) != len(p) or len(x) == 0:
        raise ValueError(f"{len(x)} windows of shape {x.shape[1:]} and {len(p)} outputs: need n > 0 of each")
    names = list(channel_names) if channel_names is not None else [n for n, _ in CHANNELS][: x.shape[2]]
    inp = x if input_windows is None else np.asarray(input_windows, dtype=np.float32)
    inp_on: MeasuredOn = input_measured_on or measured_on
    samples = channel_samples(inp)
    lo, hi = input_range
    saturation = float(((samples < lo) | (samples > hi)).mean())
    input_summary = InputSummary(
        measured_on=inp_on,
        windows=len(inp),
        sample_stride=SAMPLE_STRIDE,
        channels=_histograms(samples, names, CHANNEL_BINS),
        saturation_share=saturation,
    )
    feats = window_features(inp)
    feature_summary = FeatureSummary(
        measured_on=inp_on,
        windows=len(inp),
        features=_histograms(feats, feature_names(names), FEATURE_BINS),
    )
    if groups is not None:
        input_summary, feature_summary = _with_typical_psi(input_summary, feature_summary, x, np.asarray(groups), names)
    k = p.shape[1]
    y = None if labels is None else np.asarray(labels, dtype=np.int64)
    if y is not None:
        prior = Prior(measured_on=measured_on, kind="true", share=(np.bincount(y, minlength=k) / len(y)).tolist())
        tp = p if temperature_probs is None else np.asarray(temperature_probs, dtype=np.float32)
        ty = y if temperature_labels is None else np.asarray(temperature_labels, dtype=np.int64)
        t = fit_temperature(tp, ty)
        temperature = Temperature(
            measured_on=measured_on,
            value=round(t, 4),
            status="fitted",
            windows=len(ty),
            ece_before=round(ece(tp, ty), 5),
            ece_after=round(ece(calibrate(tp, t), ty), 5),
        )
        log.info(
            "temperature %.3f fitted on %d windows: ECE %.4f -> %.4f",
            t,
            len(ty),
            temperature.ece_before,
            temperature.ece_after,
        )
    else:
        pred = p.argmax(axis=1)
        prior = Prior(
            measured_on=measured_on, kind="predicted", share=(np.bincount(pred, minlength=k) / len(p)).tolist()
        )
        temperature = Temperature(measured_on=measured_on, value=1.0, status="uncalibrated")
    q = calibrate(p, temperature.value)
    conf = q.max(axis=1)
    counts = bin_counts(conf, list(CONFIDENCE_EDGES))
    confidence = ConfidenceSummary(
        measured_on=measured_on,
        windows=len(p),
        histogram=Histogram(edges=list(CONFIDENCE_EDGES), share=(counts / counts.sum()).tolist()),
        mean=float(conf.mean()),
        low_share=float((conf < low_confidence).mean()),
        low_threshold=low_confidence,
        entropy_mean=float(entropy(q).mean()),
    )
    flip, dwell = _flip_rate(q.argmax(axis=1))
    temporal = Temporal(measured_on=measured_on, windows=len(p), flip_rate=flip, mean_dwell_windows=dwell)
    order = {"labelled": 0, "unlabelled": 1, "synthetic": 2}
    overall: MeasuredOn = max((measured_on, inp_on), key=order.__getitem__)
    return Reference(
        measured_on=overall,
        source=source,
        input=input_summary,
        features=feature_summary,
        prior=prior,
        temperature=temperature,
        confidence=confidence,
        temporal=temporal,
    )


def reference_from_prepared(prepared: Any, tflite_path: Path, *, low_confidence: float = 0.6) -> Reference:
    """The reference of an exported model over the trainer's prepared splits.

    Input and feature histograms: the training windows (the distribution the model
    learnt); temperature: the validation windows (the test windows when there are
    none); prior, confidence and flips: the held-out test windows.
    """
    from har_edge.agent.preprocess import apply_scaler
    from har_edge.agent.runtime import TFLiteRunner

    p = prepared
    runner = TFLiteRunner(Path(tflite_path), threads=1, batch=64)
    source = str(p.meta.get("source", ""))
    on: MeasuredOn = "synthetic" if source.startswith("synthetic") else "labelled"
    test = apply_scaler(p.x["test"], p.mean, p.scale)
    probs = runner.predict(test)
    t_probs = t_labels = None
    if len(p.x["val"]):
        t_probs = runner.predict(apply_scaler(p.x["val"], p.mean, p.scale))
        t_labels = p.y["val"]
    return build_reference(
        test,
        probs,
        p.y["test"],
        on,
        input_windows=apply_scaler(p.x["train"], p.mean, p.scale),
        temperature_probs=t_probs,
        temperature_labels=t_labels,
        input_range=runner.input_range or DEFAULT_INPUT_RANGE,
        low_confidence=low_confidence,
        groups=p.subjects["test"],
        source=f"{source}; input: train split, temperature: val split, confidence/prior/flips: test split",
    )


def attach_reference(folder: Path, reference: Reference) -> Manifest:
    """Rewrite ``folder/manifest.json`` with ``reference`` (model.tflite and golden.npz stay as they are)."""
    m = read_manifest(folder)
    new = m.model_copy(update={"reference": reference})
    new = Manifest.model_validate(new.model_dump())
    (Path(folder) / MANIFEST_FILE).write_text(new.to_json(), encoding="utf-8")
    return new

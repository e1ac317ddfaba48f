"""Per-file monitor state, fed by the inference loop one batch at a time, in bounded memory.

The state is a handful of histograms and sums (a few kB), whatever the file's
length; only when flagged windows are shared does it keep a bounded, evenly drawn
sample of scaled windows (``keep_windows`` of them, reservoir sampling).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from har_edge.agent.monitor.features import (
    BinSet,
    channel_samples,
    confidence_summary,
    feature_names,
    window_features,
)
from har_edge.agent.monitor.reference import Histogram, Reference

DRIFT_STRIDE = 4
#: outputs buffered before the figures are updated (bounded: ~12 kB of outputs, a quarter as many windows)
FLUSH_WINDOWS = 512
#: per-reference layouts kept (the histograms' edges and shares as arrays): a daemon serves one model at a time
_LAYOUTS_KEPT = 4


@dataclass
class MonitorStats:
    """What a file's windows added up to (the verdict's input)."""

    windows: int
    classes: int
    temperature: float
    confidence_mean: float
    low_confidence_share: float
    entropy_mean: float
    flip_rate: float
    mean_dwell_windows: float
    class_share: list[float]
    confidence_share: list[float]
    saturation_share: float
    #: PSI of each channel's value histogram and of each window feature's histogram against the reference
    channel_psi: dict[str, float] = field(default_factory=dict)
    feature_psi: dict[str, float] = field(default_factory=dict)


class MonitorAccumulator:
    """Feed it ``add(scaled_windows, probs)`` per batch in time order; ``stats()`` at the end."""

    def __init__(
        self,
        reference: Reference | None,
        *,
        classes: int,
        channels: list[str],
        low_confidence: float,
        input_range: tuple[float, float] | None = None,
        keep_windows: int = 0,
        seed: int = 0,
    ) -> None:
        self.reference = reference
        self.k = classes
        self.low = low_confidence
        self.t = reference.temperature.value if reference is not None else 1.0
        self.range = input_range
        self.n = 0
        self.sum_conf = 0.0
        self.sum_entropy = 0.0
        self.n_low = 0
        self.flips = 0
        self.pairs = 0
        self._last: int | None = None
        self.class_counts = np.zeros(classes, np.int64)
        self.conf_counts = np.zeros(10, np.int64)  # confidence in tenths (features.CONFIDENCE_EDGES)
        self.n_values = 0
        self.n_saturated = 0
        lay = _layout(reference, tuple(channels))
        self.channel_names = list(lay.channel_names)
        self.feature_names = list(lay.feature_names)
        self._ch_cols = lay.ch_cols
        self._ft_cols = lay.ft_cols
        self._ch_share = lay.ch_share
        self._ft_share = lay.ft_share
        self.ch_bins = lay.ch_bins
        self.ft_bins = lay.ft_bins
        self.ch_counts = np.zeros(self.ch_bins.total, np.int64)
        self.ft_counts = np.zeros(self.ft_bins.total, np.int64)
        #: drift statistics read every DRIFT_STRIDE-th window (at 50% overlap: each sample once)
        self._offset = 0
        self._probs: list[np.ndarray] = []
        #: the drift windows waiting for the next flush, copied into one reused buffer (its first ``_n_sub``)
        self._sub_buf: np.ndarray | None = None
        self._n_sub = 0
        self._buffered = 0
        self.keep = keep_windows
        self.kept: np.ndarray | None = None
        self.kept_idx: np.ndarray | None = None
        self._seed = seed
        self._rng: np.random.Generator | None = None  # made at the first reservoir draw (it costs ~40 us)

    def end_recording(self) -> None:
        """The next window starts another recording: no flip is counted across."""
        self._flush()
        self._last = None

    def add(self, scaled: np.ndarray, probs: np.ndarray) -> None:
        """Take a batch (in time order). Cheap: it only keeps the outputs and every DRIFT_STRIDE-th window;
        the figures are computed FLUSH_WINDOWS windows at a time (numpy's per-call cost, not the data, is
        what a batch of 64 small windows would pay)."""
        n = len(probs)
        if n == 0:
            return
        self._probs.append(np.asarray(probs, np.float32))
        first = (-self._offset) % DRIFT_STRIDE
        self._offset = (self._offset + n) % DRIFT_STRIDE
        if first < n and (self._ch_cols or self._ft_cols or self.range is not None):
            self._keep_drift_windows(scaled, first)
        if self.keep:
            self._reservoir(scaled)
        self.n += n
        self._buffered += n
        if self._buffered >= FLUSH_WINDOWS:
            self._flush()

    def _keep_drift_windows(self, scaled: np.ndarray, first: int) -> None:
        """Copy windows ``first, first + DRIFT_STRIDE, ...`` into the buffer (a copy: the caller may reuse its).

        A C-contiguous float32 batch is copied window by window through memoryviews: plain memcpy with the
        GIL held. numpy's copy would release the GIL (more than 500 values), and with the decode thread
        running the inference thread would then wait up to the switch interval (5 ms) to get it back:
        most of this step's wall time was that wait, not the copy.
        """
        n, rest = scaled.shape[0], scaled.shape[1:]
        m = len(range(first, n, DRIFT_STRIDE))
        buf = self._sub_buf
        if buf is None or buf.shape[1:] != rest or self._n_sub + m > len(buf):
            # a flush's worth at once: np.empty maps pages lazily, so a short file touches only what it fills
            cap = max(self._n_sub + m, FLUSH_WINDOWS // DRIFT_STRIDE + m)
            grown = np.empty((cap, *rest), np.float32)
            if buf is not None and self._n_sub:
                grown[: self._n_sub] = buf[: self._n_sub]
            self._sub_buf = buf = grown
        a = self._n_sub
        if scaled.dtype == np.float32 and scaled.flags.c_contiguous:
            size = scaled[0].nbytes
            src = scaled.data.cast("B")
            dst = buf.data.cast("B")
            at = a * size
            for j in range(first, n, DRIFT_STRIDE):
                dst[at : at + size] = src[j * size : (j + 1) * size]
                at += size
        else:
            buf[a : a + m] = scaled[first::DRIFT_STRIDE]
        self._n_sub = a + m

    def _flush(self) -> None:
        if not self._probs:
            return
        probs = np.concatenate(self._probs) if len(self._probs) > 1 else self._probs[0]
        self._probs = []
        self._buffered = 0
        pred, conf, ent = confidence_summary(probs, self.t)
        self.sum_conf += float(conf.sum())
        self.sum_entropy += float(ent.sum())
        self.n_low += int(np.count_nonzero(conf < self.low))
        self.class_counts += np.bincount(pred, minlength=self.k)
        self.conf_counts += np.bincount(np.minimum((conf * 10).astype(np.int64), 9), minlength=10)
        seq = pred if self._last is None else np.concatenate(([self._last], pred))
        self.flips += int(np.count_nonzero(seq[1:] != seq[:-1]))
        self.pairs += len(seq) - 1
        self._last = int(pred[-1])
        if not self._n_sub or self._sub_buf is None:
            return
        sub = self._sub_buf[: self._n_sub]
        self._n_sub = 0
        if self._ch_cols or self.range is not None:
            samples = np.ascontiguousarray(channel_samples(sub))  # read three times: contiguous is faster
            if self.range is not None:
                lo, hi = self.range
                self.n_saturated += int(np.count_nonzero(samples < lo)) + int(np.count_nonzero(samples > hi))
                self.n_values += samples.size
            if self._ch_cols:
                self.ch_counts += self.ch_bins.counts(_columns(samples, self._ch_cols))
        if self._ft_cols:
            self.ft_counts += self.ft_bins.counts(_columns(window_features(sub), self._ft_cols))

    def _reservoir(self, scaled: np.ndarray) -> None:
        """Algorithm R over windows: every window seen so far has the same chance to be kept."""
        for j in range(len(scaled)):
            seen = self.n + j
            if seen < self.keep:
                if self.kept is None:
                    self.kept = np.empty((self.keep, *scaled.shape[1:]), np.float32)
                    self.kept_idx = np.empty(self.keep, np.int64)
                self.kept[seen] = scaled[j]
                self.kept_idx[seen] = seen  # type: ignore[index]
            else:
                if self._rng is None:
                    self._rng = np.random.default_rng(self._seed)
                r = int(self._rng.integers(0, seen + 1))
                if r < self.keep:
                    self.kept[r] = scaled[j]  # type: ignore[index]
                    self.kept_idx[r] = seen  # type: ignore[index]

    def kept_windows(self) -> tuple[np.ndarray, np.ndarray]:
        """(window indices, scaled windows) of the kept sample, in file order."""
        if self.kept is None or self.kept_idx is None:
            return np.empty(0, np.int64), np.empty((0, 0, 0), np.float32)
        m = min(self.keep, self.n)
        order = np.argsort(self.kept_idx[:m])
        return self.kept_idx[:m][order], self.kept[:m][order]

    def _psi(self, names: list[str], bins: BinSet, counts: np.ndarray, share: str) -> dict[str, float]:
        if not names or self.n == 0:
            return {}
        return dict(zip(names, bins.psi(counts, getattr(self, share)).tolist(), strict=True))

    def stats(self) -> MonitorStats:
        self._flush()
        n = max(1, self.n)
        return MonitorStats(
            windows=self.n,
            classes=self.k,
            temperature=self.t,
            confidence_mean=self.sum_conf / n,
            low_confidence_share=self.n_low / n,
            entropy_mean=self.sum_entropy / n,
            flip_rate=self.flips / self.pairs if self.pairs else 0.0,
            mean_dwell_windows=self.n / (self.flips + 1) if self.n else 0.0,
            class_share=(self.class_counts / n).tolist(),
            confidence_share=(self.conf_counts / n).tolist(),
            saturation_share=self.n_saturated / self.n_values if self.n_values else 0.0,
            channel_psi=self._psi(self.channel_names, self.ch_bins, self.ch_counts, "_ch_share"),
            feature_psi=self._psi(self.feature_names, self.ft_bins, self.ft_counts, "_ft_share"),
        )


def _columns(values: np.ndarray, cols: list[int]) -> np.ndarray:
    """``values[:, cols]``; no copy when ``cols`` are all the columns in order (the usual case)."""
    if len(cols) == values.shape[1] and cols == list(range(len(cols))):
        return values
    return values[:, cols]


@dataclass(frozen=True)
class _Layout:
    """What a reference's histograms are, as the accumulator counts them (built once per reference)."""

    channel_names: list[str]
    feature_names: list[str]
    ch_cols: list[int]
    ft_cols: list[int]
    ch_share: np.ndarray
    ft_share: np.ndarray
    ch_bins: BinSet
    ft_bins: BinSet


#: id(reference), channels -> (the reference, kept alive so that its id is not reused; its layout)
_layouts: OrderedDict[tuple[int, tuple[str, ...]], tuple[Reference | None, _Layout]] = OrderedDict()


def _present(
    hists: Mapping[str, Histogram], names: list[str]
) -> tuple[list[str], list[int], list[list[float]], list[list[float]]]:
    """The ``names`` the reference has a histogram for: their names, columns, edges and shares."""
    kept: list[str] = []
    cols: list[int] = []
    edges: list[list[float]] = []
    share: list[list[float]] = []
    for i, name in enumerate(names):
        h = hists.get(name)
        if h is not None:
            kept.append(name)
            cols.append(i)
            edges.append(h.edges)
            share.append(h.share)
    return kept, cols, edges, share


def _layout(reference: Reference | None, channels: tuple[str, ...]) -> _Layout:
    key = (id(reference), channels)
    hit = _layouts.get(key)
    if hit is not None and hit[0] is reference:
        _layouts.move_to_end(key)
        return hit[1]
    ch_hists = reference.input.channels if reference is not None else {}
    ft_hists = reference.features.features if reference is not None else {}
    names, ch_cols, ch_edges, ch_share = _present(ch_hists, list(channels))
    ft_names, ft_cols, ft_edges, ft_share = _present(ft_hists, feature_names(list(channels)))
    lay = _Layout(
        names,
        ft_names,
        ch_cols,
        ft_cols,
        np.concatenate(ch_share) if ch_share else np.empty(0),
        np.concatenate(ft_share) if ft_share else np.empty(0),
        BinSet(ch_edges),
        BinSet(ft_edges),
    )
    _layouts[key] = (reference, lay)
    while len(_layouts) > _LAYOUTS_KEPT:
        _layouts.popitem(last=False)
    return lay

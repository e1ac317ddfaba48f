"""The monitor's accumulator as it was before its cost was cut, kept as the slow reference.

tests/test_monitor_equivalence.py feeds this copy and har_edge.agent.monitor the same real windows and
asserts the same figures, verdicts and reasons. Do not optimise this file: it is the definition the fast
code must reproduce. Only what the cut changed is copied (the accumulator and ``BinSet.counts``, verbatim
from har_edge/agent/monitor/{accumulate,features}.py before it); the features and the verdict it did not
change are imported from the product.
"""

# ruff: noqa
# mypy: ignore-errors
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from har_edge.agent.monitor import features as _features
from har_edge.agent.monitor.features import (  # noqa: F401 - what the cut left alone
    CONFIDENCE_EDGES,
    channel_samples,
    confidence_summary,
    feature_names,
    window_features,
)
from har_edge.agent.monitor.reference import Reference
from har_edge.agent.monitor.verdict import MonitorReport, judge  # noqa: F401 - unchanged by the cut
from har_edge.agent.outbox import MetricPoint
from har_edge.agent.settings import MonitorSettings


class BinSet(_features.BinSet):
    """The product's BinSet with its counts as they were before the cut."""

    def counts(self, values: np.ndarray) -> np.ndarray:
        """Flat counts (all histograms, in order) of ``values`` (m, histograms)."""
        b = (np.asarray(values, np.float32) - self.lo32) * self.inv_width32
        np.clip(b, -1.0, self.k - 1.0, out=b)
        b += 1.0
        idx = b.astype(np.int64) + self.starts  # truncation is floor here: b + 1 >= 0
        return np.bincount(idx.ravel(), minlength=self.total)


# -- accumulate.py -------------------------------------------------------------------------------


DRIFT_STRIDE = 4
#: outputs buffered before the figures are updated (bounded: ~12 kB of outputs, a quarter as many windows)
FLUSH_WINDOWS = 512


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
        self.channel_names: list[str] = []
        self.feature_names: list[str] = []
        self._ch_cols: list[int] = []
        self._ft_cols: list[int] = []
        ch_edges: list[list[float]] = []
        ft_edges: list[list[float]] = []
        if reference is not None:
            ch_share: list[list[float]] = []
            ft_share: list[list[float]] = []
            for i, name in enumerate(channels):
                h = reference.input.channels.get(name)
                if h is not None:
                    self.channel_names.append(name)
                    self._ch_cols.append(i)
                    ch_edges.append(h.edges)
                    ch_share.append(h.share)
            for i, name in enumerate(feature_names(channels)):
                h = reference.features.features.get(name)
                if h is not None:
                    self.feature_names.append(name)
                    self._ft_cols.append(i)
                    ft_edges.append(h.edges)
                    ft_share.append(h.share)
            self._ch_share = np.concatenate(ch_share) if ch_share else np.empty(0)
            self._ft_share = np.concatenate(ft_share) if ft_share else np.empty(0)
        self.ch_bins = BinSet(ch_edges)
        self.ft_bins = BinSet(ft_edges)
        self.ch_counts = np.zeros(self.ch_bins.total, np.int64)
        self.ft_counts = np.zeros(self.ft_bins.total, np.int64)
        #: drift statistics read every DRIFT_STRIDE-th window (at 50% overlap: each sample once)
        self._offset = 0
        self._probs: list[np.ndarray] = []
        self._subs: list[np.ndarray] = []
        self._buffered = 0
        self.keep = keep_windows
        self.kept: np.ndarray | None = None
        self.kept_idx: np.ndarray | None = None
        self._rng = np.random.default_rng(seed)

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
        sub = scaled[(-self._offset) % DRIFT_STRIDE :: DRIFT_STRIDE]
        self._offset = (self._offset + n) % DRIFT_STRIDE
        if len(sub):
            self._subs.append(np.array(sub, np.float32))  # a copy: the caller may reuse its buffer
        if self.keep:
            self._reservoir(scaled)
        self.n += n
        self._buffered += n
        if self._buffered >= FLUSH_WINDOWS:
            self._flush()

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
        if not self._subs:
            return
        sub = np.concatenate(self._subs) if len(self._subs) > 1 else self._subs[0]
        self._subs = []
        if self._ch_cols or self.range is not None:
            samples = channel_samples(sub)
            if self.range is not None:
                lo, hi = self.range
                self.n_saturated += int(np.count_nonzero(samples < lo)) + int(np.count_nonzero(samples > hi))
                self.n_values += samples.size
            if self._ch_cols:
                self.ch_counts += self.ch_bins.counts(samples[:, self._ch_cols])
        if self._ft_cols:
            self.ft_counts += self.ft_bins.counts(window_features(sub)[:, self._ft_cols])

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

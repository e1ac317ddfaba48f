"""The monitor as it was before its cost was cut (features, accumulator, verdict), kept as the slow reference.

tests/test_monitor_equivalence.py feeds this copy and har_edge.agent.monitor the same real windows and
asserts the same figures, verdicts and reasons. Do not optimise this file: it is the definition the fast
code must reproduce. Copied verbatim (imports merged) from har_edge/agent/monitor/{features,accumulate,verdict}.py.
"""

# ruff: noqa
# mypy: ignore-errors
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from har_edge.agent.monitor.reference import Reference
from har_edge.agent.outbox import MetricPoint
from har_edge.agent.settings import MonitorSettings

# -- features.py ---------------------------------------------------------------------------------


#: every SAMPLE_STRIDE-th sample of a window enters the per-channel value histograms
SAMPLE_STRIDE = 8
#: per-window statistics per channel (``<channel>.<stat>``)
FEATURE_STATS = ("mean", "std", "energy", "jerk")
#: clip bound of probabilities before the log (int8 outputs hold exact zeros)
PROB_FLOOR = 1.0 / 512
CONFIDENCE_EDGES = tuple(np.round(np.linspace(0.1, 0.9, 9), 6).tolist())  # 10 bins over [0, 1]


def feature_names(channels: list[str] | tuple[str, ...]) -> list[str]:
    return [f"{c}.{s}" for s in FEATURE_STATS for c in channels]


def window_features(scaled: np.ndarray) -> np.ndarray:
    """``(n, 4 * channels)`` per-window statistics of scaled windows ``(n, window, channels)``.

    Per channel: mean, standard deviation, energy (mean square) and jerk (mean absolute
    sample-to-sample difference, which a vibrating mount raises).
    """
    x = np.asarray(scaled, dtype=np.float32)
    n, w, c = x.shape
    flat = x.reshape(n, w * c)  # sums over time as one matrix product each: several times faster here
    mean = flat @ _time_mean(w, c)
    sq = np.square(flat) @ _time_mean(w, c)
    std = np.sqrt(np.maximum(sq - np.square(mean), 0.0))
    d = flat[:, c:] - flat[:, :-c]
    np.abs(d, out=d)
    jerk = d @ _time_mean(w - 1, c)
    return np.concatenate([mean, std, sq, jerk], axis=1)


@lru_cache(maxsize=8)
def _time_mean(w: int, c: int) -> np.ndarray:
    """``(w * c, c)`` matrix: a flattened (w, c) window times it is the per-channel mean over time."""
    return (np.kron(np.ones((w, 1), np.float32), np.eye(c, dtype=np.float32)) / max(1, w)).astype(np.float32)


def channel_samples(scaled: np.ndarray) -> np.ndarray:
    """``(m, channels)`` values of windows entering the channel histograms."""
    x = np.asarray(scaled, dtype=np.float32)
    return x[:, ::SAMPLE_STRIDE, :].reshape(-1, x.shape[-1])


def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities: ``softmax(log(p) / T)`` (the model gives probabilities, not logits)."""
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), PROB_FLOOR, 1.0)) / float(temperature)
    logp -= logp.max(axis=1, keepdims=True)
    e = np.exp(logp)
    out: np.ndarray = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


def confidence_summary(probs: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top-1 label, calibrated top-1 confidence, normalised entropy) per row, in a few float32 operations.

    With ``z = log(p) / T`` shifted so that its maximum is 0, the calibrated top-1 is ``1 / Z``
    (``Z = sum(exp z)``) and the entropy ``log Z - sum(exp(z) * z) / Z``.
    """
    p = np.asarray(probs, dtype=np.float32)
    z = np.log(np.maximum(p, np.float32(PROB_FLOOR)))
    if temperature != 1.0:
        z *= np.float32(1.0 / temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=1)
    ent = (np.log(total) - (e * z).sum(axis=1) / total) / np.float32(np.log(p.shape[1]))
    return p.argmax(axis=1), 1.0 / total, ent


def entropy(probs: np.ndarray) -> np.ndarray:
    """Normalised entropy (0: certain, 1: uniform) per row."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    out: np.ndarray = (-(p * np.log(p)).sum(axis=1) / np.log(p.shape[1])).astype(np.float32)
    return out


def quantile_edges(values: np.ndarray, bins: int) -> list[float]:
    """Interior bin edges at the quantiles of ``values`` (duplicates dropped: a constant channel has none)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return []
    qs = np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1])
    return [float(q) for q in np.unique(np.round(qs, 6))]


def bin_counts(values: np.ndarray, edges: np.ndarray | list[float]) -> np.ndarray:
    """Counts of ``values`` in the ``len(edges) + 1`` open-ended bins of ``edges``."""
    e = np.asarray(edges, dtype=np.float64)
    return np.bincount(np.searchsorted(e, values, side="right"), minlength=len(e) + 1)


def uniform_edges(values: np.ndarray, bins: int) -> list[float]:
    """``bins - 1`` equally spaced edges from the 0.5th to the 99.5th percentile of ``values`` (``bins`` bins
    counting the two open-ended tails). Equal spacing lets the edge find a value's bin by arithmetic."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = np.quantile(v, [0.005, 0.995]) if len(v) else (0.0, 1.0)
    if not hi - lo > 1e-6:
        lo, hi = lo - 0.5, hi + 0.5  # a constant channel (no gyroscope): one wide bin around it
    return [float(x) for x in np.round(np.linspace(lo, hi, bins - 1), 6)]


class BinSet:
    """Many histograms of equally spaced edges counted at once (a few array operations per batch).

    Every histogram has the same number of edges ``k`` (``k + 1`` bins: value < e[0] is bin 0,
    e[i-1] <= value < e[i] is bin i, value >= e[k-1] is bin k), as :func:`bin_counts` counts.
    """

    def __init__(self, edges: list[list[float]]) -> None:
        k = {len(e) for e in edges}
        if len(k) > 1 or 1 in k:
            raise ValueError("a BinSet takes histograms with the same number (>= 2) of edges")
        self.k = k.pop() if k else 2
        self.n = len(edges)
        e = np.asarray(edges, np.float64).reshape(self.n, self.k)
        self.lo = e[:, 0] if self.n else np.zeros(0)
        width = (e[:, -1] - e[:, 0]) / (self.k - 1) if self.n else np.ones(0)
        self.inv_width = 1.0 / np.maximum(width, 1e-9)
        self.lo32 = self.lo.astype(np.float32)
        self.inv_width32 = self.inv_width.astype(np.float32)
        self.sizes = np.full(self.n, self.k + 1, np.int64)
        self.starts = np.arange(self.n, dtype=np.int64) * (self.k + 1)
        self.total = self.n * (self.k + 1)

    def counts(self, values: np.ndarray) -> np.ndarray:
        """Flat counts (all histograms, in order) of ``values`` (m, histograms)."""
        b = (np.asarray(values, np.float32) - self.lo32) * self.inv_width32
        np.clip(b, -1.0, self.k - 1.0, out=b)
        b += 1.0
        idx = b.astype(np.int64) + self.starts  # truncation is floor here: b + 1 >= 0
        return np.bincount(idx.ravel(), minlength=self.total)

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        return [flat[a : a + n] for a, n in zip(self.starts, self.sizes, strict=True)]

    def psi(self, flat_counts: np.ndarray, flat_share: np.ndarray) -> np.ndarray:
        """PSI per histogram (as :func:`psi`), vectorised."""
        c = (np.asarray(flat_counts, np.float64) + 0.5).reshape(self.n, self.k + 1)
        p = c / c.sum(axis=1, keepdims=True)
        q = np.maximum(np.asarray(flat_share, np.float64).reshape(self.n, self.k + 1), 1e-4)
        q = q / q.sum(axis=1, keepdims=True)
        out: np.ndarray = ((p - q) * np.log(p / q)).sum(axis=1)
        return out


def psi(counts: np.ndarray, reference_share: np.ndarray | list[float]) -> float:
    """Population stability index of observed ``counts`` against a reference distribution.

    Half a count is added to each observed bin and the reference is floored at 1e-4, so
    an empty bin costs a bounded amount instead of infinity.
    """
    c = np.asarray(counts, dtype=np.float64) + 0.5
    p = c / c.sum()
    q = np.maximum(np.asarray(reference_share, dtype=np.float64), 1e-4)
    q = q / q.sum()
    return float(((p - q) * np.log(p / q)).sum())


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


# -- verdict.py ----------------------------------------------------------------------------------


STATUSES = ("ok", "warn", "alert", "too_short", "no_reference")
_RANK = {"ok": 0, "warn": 1, "alert": 2}


@dataclass
class MonitorReport:
    status: str
    reasons: list[str]
    windows: int
    metrics: dict[str, float] = field(default_factory=dict)
    channel_psi: dict[str, float] = field(default_factory=dict)
    feature_psi: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reasons": self.reasons,
            "windows": self.windows,
            "metrics": self.metrics,
            "channel_psi": self.channel_psi,
            "feature_psi": self.feature_psi,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def metric_points(self, timestamp_ms: int) -> list[MetricPoint]:
        """``monitor.*`` points of the file's run (the status as a code: ok 0, warn 1, alert 2)."""
        pts = [MetricPoint(f"monitor.{k}", float(v), timestamp_ms) for k, v in sorted(self.metrics.items())]
        pts += [MetricPoint(f"monitor.psi.{k}", v, timestamp_ms) for k, v in sorted(self.channel_psi.items())]
        if self.status in _RANK:
            pts.append(MetricPoint("monitor.status_code", float(_RANK[self.status]), timestamp_ms))
        return pts


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def judge(stats: MonitorStats, reference: Reference | None, cfg: MonitorSettings, labels: list[str]) -> MonitorReport:
    """The verdict of one file's stats against the reference, under the ``monitor`` settings."""
    m: dict[str, float] = {
        "windows": float(stats.windows),
        "confidence_mean": stats.confidence_mean,
        "low_confidence_share": stats.low_confidence_share,
        "entropy_mean": stats.entropy_mean,
        "flip_rate": stats.flip_rate,
        "mean_dwell_windows": stats.mean_dwell_windows,
        "saturation_share": stats.saturation_share,
        "temperature": stats.temperature,
        "top_class_share": max(stats.class_share) if stats.class_share else 0.0,
    }
    report = MonitorReport("ok", [], stats.windows, m)
    if reference is None:
        report.status = "no_reference"
        report.reasons = ["no reference: the model's manifest carries no training reference"]
        return report
    ch_psi = stats.channel_psi
    ft_psi = stats.feature_psi
    report.channel_psi = {k: round(v, 4) for k, v in ch_psi.items()}
    report.feature_psi = {k: round(v, 4) for k, v in ft_psi.items()}
    ch_typ = {k: reference.input.channels[k].typical_psi for k in ch_psi}
    ft_typ = {k: reference.features.features[k].typical_psi for k in ft_psi}
    floor = cfg.typical_psi_floor

    def rel(v: float, typical: float | None) -> float:
        return v / max(typical if typical is not None else cfg.typical_psi_default, floor)

    rels = [rel(v, ch_typ[k]) for k, v in ch_psi.items()] + [rel(v, ft_typ[k]) for k, v in ft_psi.items()]
    drift = sum(rels) / len(rels) if rels else 0.0
    m["drift_score"] = drift
    m["psi_max"] = max(ch_psi.values(), default=0.0)
    m["feature_psi_max"] = max(ft_psi.values(), default=0.0)
    m["psi_rel_max"] = max((rel(v, ch_typ[k]) for k, v in ch_psi.items()), default=0.0)
    if stats.windows < cfg.min_windows:
        report.status = "too_short"
        report.reasons = [f"too short to judge: {stats.windows} windows (monitor.min_windows = {cfg.min_windows})"]
        return report
    found: list[tuple[str, str]] = []  # (level, reason)
    # -- drift ------------------------------------------------------------------------------------

    def typical_note(t: float | None) -> str:
        return f"; held-out recordings reach {t:.2f}" if t is not None else ""

    if reference.gives_drift_verdicts:
        for name, v in sorted(ch_psi.items(), key=lambda kv: -kv[1]):
            r = rel(v, ch_typ[name])
            if r >= cfg.psi_alert_ratio and v >= cfg.psi_alert:
                found.append(("alert", f"{name} far from training (PSI {v:.1f}{typical_note(ch_typ[name])})"))
            elif r >= cfg.psi_warn_ratio and v >= cfg.psi_warn:
                found.append(("warn", f"{name} unlike training (PSI {v:.2f}{typical_note(ch_typ[name])})"))
        worst = sorted(((rel(v, ft_typ[k]), v, k) for k, v in ft_psi.items()), reverse=True)[:3]
        for r, v, name in worst:
            if r >= cfg.psi_alert_ratio and v >= cfg.feature_psi_alert:
                found.append(("alert", f"window {name} far from training (PSI {v:.1f}{typical_note(ft_typ[name])})"))
            elif r >= cfg.psi_warn_ratio and v >= cfg.feature_psi_warn:
                found.append(("warn", f"window {name} unlike training (PSI {v:.2f}{typical_note(ft_typ[name])})"))
        if drift >= cfg.drift_alert:
            found.append(("alert", f"combined drift score {drift:.2f} (alert at {cfg.drift_alert:g})"))
        elif drift >= cfg.drift_warn:
            found.append(("warn", f"combined drift score {drift:.2f} (warn at {cfg.drift_warn:g})"))
        sat = stats.saturation_share - reference.input.saturation_share
        if sat >= cfg.saturation_alert:
            found.append(("alert", f"{_pct(stats.saturation_share)} of input values beyond the model's int8 range"))
        elif sat >= cfg.saturation_warn:
            found.append(("warn", f"{_pct(stats.saturation_share)} of input values beyond the model's int8 range"))
    # -- confidence -------------------------------------------------------------------------------
    ref_c = reference.confidence
    if stats.confidence_mean < ref_c.mean - cfg.confidence_drop_warn:
        found.append(
            ("warn", f"mean confidence {stats.confidence_mean:.2f}, {ref_c.mean:.2f} on held-out training data")
        )
    if stats.low_confidence_share > ref_c.low_share + cfg.low_confidence_rise_warn:
        found.append(
            (
                "warn",
                f"{_pct(stats.low_confidence_share)} of windows low-confidence, "
                f"{_pct(ref_c.low_share)} on held-out data",
            )
        )
    top = max(range(len(stats.class_share)), key=stats.class_share.__getitem__) if stats.class_share else 0
    share = stats.class_share[top] if stats.class_share else 0.0
    prior = reference.prior.share[top] if top < len(reference.prior.share) else 0.0
    if (
        share >= cfg.one_class_share
        and stats.confidence_mean >= cfg.one_class_confidence
        and prior < cfg.one_class_prior_max
    ):
        name = labels[top] if top < len(labels) else str(top)
        found.append(
            (
                "warn",
                f"{_pct(share)} of windows one class ({name}) at {stats.confidence_mean:.2f}; "
                f"training prior {_pct(prior)} ({reference.prior.kind})",
            )
        )
    # -- temporal ---------------------------------------------------------------------------------
    ref_flip = reference.temporal.flip_rate
    limit = max(ref_flip * cfg.flip_rate_factor, ref_flip + cfg.flip_rate_margin)
    if stats.flip_rate > limit:
        found.append(("warn", f"label flips in {_pct(stats.flip_rate)} of windows, {_pct(ref_flip)} on held-out data"))
    if not reference.gives_drift_verdicts:
        found.append(("ok", "no drift verdict: the reference was drawn from synthetic windows"))
    level = max((lv for lv, _ in found), key=lambda lv: _RANK[lv], default="ok")
    report.status = level
    report.reasons = [r for lv, r in sorted(found, key=lambda f: -_RANK[f[0]])]
    return report

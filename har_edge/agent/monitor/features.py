"""The summaries both the trainer (reference) and the edge (per file) compute: one definition each."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

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
        b = np.subtract(np.asarray(values, np.float32), self.lo32)  # one new array, the rest in place
        np.multiply(b, self.inv_width32, out=b)
        np.clip(b, -1.0, self.k - 1.0, out=b)
        b += 1.0
        idx = b.astype(np.intp)  # truncation is floor here: b + 1 >= 0
        idx += self.starts
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

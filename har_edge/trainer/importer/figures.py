"""The import's gate figures: each measured, with what it was measured on, or recorded as not measured.

Figures (keys of ``manifest.measured``): ``agreement`` (int8/float argmax
agreement on the held-out check windows), ``agreement_margin`` (the same where
the float top-2 margin is >= 0.1), ``max_dp`` (largest |int8 - float|
probability), ``size_kb``, ``ms_per_window`` (LiteRT on the build host),
``int8_accuracy`` and ``int8_macro_f1`` (labelled check windows only, with the
worst subject's accuracy when subjects are known). A figure that could not be
measured has ``value`` None and says why; ``har-train release`` refuses it
unless the operator accepts it by name (``--accept-unmeasured``).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from har_edge.agent.runtime import TFLiteRunner

#: names an operator may give to --accept-unmeasured -> figure key
ACCEPT_NAMES = {
    "accuracy": "int8_accuracy",
    "int8_accuracy": "int8_accuracy",
    "macro_f1": "int8_macro_f1",
    "int8_macro_f1": "int8_macro_f1",
    "agreement": "agreement",
}

#: gate checks: figure key -> (threshold name, lower bound?)
GATE_CHECKS = {
    "agreement": ("min_agreement", True),
    "int8_accuracy": ("min_int8_accuracy", True),
    "int8_macro_f1": ("min_macro_f1", True),
    "size_kb": ("max_size_kb", False),
}


def figure(value: float | None, on: str) -> dict[str, Any]:
    return {"value": None if value is None else float(value), "on": on}


def macro_f1(y: np.ndarray, pred: np.ndarray, n: int) -> float:
    f1s = []
    for c in range(n):
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        if tp + fn == 0:
            continue  # a class absent from the check windows does not count
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(f1s)) if f1s else 0.0


def agreement_figures(int8_probs: np.ndarray, float_probs: np.ndarray | None, on: str, why_not: str) -> dict:
    if float_probs is None:
        return {k: figure(None, why_not) for k in ("agreement", "agreement_margin", "max_dp")}
    top2 = np.sort(float_probs, axis=1)[:, -2:]
    wide = (top2[:, 1] - top2[:, 0]) >= 0.1
    same = int8_probs.argmax(1) == float_probs.argmax(1)
    return {
        "agreement": figure(same.mean(), on),
        "agreement_margin": figure(
            same[wide].mean() if wide.any() else None,
            f"the {int(wide.sum())} of them whose float top-2 margin is >= 0.1" if wide.any() else "no wide margin",
        ),
        "max_dp": figure(float(np.abs(int8_probs - float_probs).max()), on),
    }


def accuracy_figures(probs: np.ndarray, labels: np.ndarray, subjects: np.ndarray, n: int, on: str) -> dict:
    known = labels >= 0
    if not known.any():
        why = "not measured: no labelled windows (import with --labelled and labels files)"
        return {"int8_accuracy": figure(None, why), "int8_macro_f1": figure(None, why)}
    y, pred = labels[known], probs[known].argmax(1)
    out = {
        "int8_accuracy": figure((pred == y).mean(), f"{int(known.sum())} labelled {on}"),
        "int8_macro_f1": figure(macro_f1(y, pred, n), f"{int(known.sum())} labelled {on}"),
    }
    subs = subjects[known]
    if len(set(subs.tolist())) > 1:
        accs = {s: float((pred[subs == s] == y[subs == s]).mean()) for s in sorted(set(subs.tolist()))}
        worst = min(accs, key=accs.__getitem__)
        out["int8_accuracy_worst_subject"] = figure(accs[worst], f"subject {worst} of {len(accs)} (subject-wise)")
    return out


def speed_figure(model_path: Path, scaled: np.ndarray, runs: int = 3) -> dict:
    """ms per window in LiteRT, 1 thread, batches of 64 (as the agent runs), best of ``runs``."""
    runner = TFLiteRunner(model_path, threads=1, batch=64)
    x = scaled[:256] if len(scaled) >= 64 else np.resize(scaled, (64, *scaled.shape[1:]))
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        runner.predict(x)
        best = min(best, (time.perf_counter() - t0) / len(x))
    host = f"{platform.node()} ({platform.machine()}, {platform.processor() or platform.system()})"
    return {
        "ms_per_window": figure(
            best * 1000, f"measured on the build host {host}: {runner.runtime}, 1 thread, batch 64, best of {runs}"
        )
    }


def gate(measured: dict[str, dict], thresholds: dict[str, float]) -> dict[str, Any]:
    """The gate block: measured figures against thresholds; unmeasured ones listed, never invented."""
    failures, figures, unmeasured = [], {}, []
    for key, (attr, lower) in GATE_CHECKS.items():
        if attr not in thresholds:
            continue
        value = measured.get(key, {}).get("value")
        if value is None:
            unmeasured.append(key)
            continue
        figures[key] = value
        limit = thresholds[attr]
        if (lower and value < limit) or (not lower and value > limit):
            failures.append(f"{key} {value:.4f} {'<' if lower else '>'} {limit} ({attr})")
    return {
        "passed": not failures,
        "thresholds": dict(thresholds),
        "figures": figures,
        "failures": failures,
        "unmeasured": unmeasured,
    }

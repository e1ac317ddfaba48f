"""Section ``monitoring``: what the per-file monitor costs, how often it cries wolf, and what it catches.

Real components end to end: held-out HAPT recordings (the test subjects of
params.yaml, never trained on) are written as FIT exports, whole (no windows
stitched), and processed by the agent's pipeline with the bundled model. Two
folds: the reference's held-out part (prior, confidence, flips) is drawn from one
half of the test subjects and the other half is replayed (the input histograms
come from the training split either way). Shifted files: those recordings with
axes swapped, a gyroscope in rad/s stored as deg/s, a gyroscope at 10x; and
recordings of their own: a vibrating fixed mount (10 min), a sensor lying still
(1 h). Needs the HAPT sdist (``har-train prepare`` fetches it).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, SCRATCH, Report

log = logging.getLogger("bench.monitoring")


def _shifts():
    import importlib.util
    import sys

    path = ROOT / "tests" / "shifts.py"
    spec = importlib.util.spec_from_file_location("har_edge_shifts", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def held_out_recordings() -> tuple[Any, list[Any]]:
    """(prepared splits, HAPT recordings of the test subjects)."""
    from har_edge.trainer.data import hapt
    from har_edge.trainer.prepare import load_prepared, prepare
    from har_edge.trainer.settings import load_settings

    settings = load_settings(ROOT / "params.yaml")
    try:
        p = load_prepared(settings)
    except Exception:  # not prepared here yet
        prepare(settings)
        p = load_prepared(settings)
    recs = hapt.load_sdist(hapt.fetch_sdist(settings.cache_dir), settings.data.labels)
    test = {str(s) for s in settings.split.test_subjects}
    return p, [r for r in recs if r.subject in test]


def fold_reference(p: Any, tflite: Path, subjects: set[str]):
    """The reference with its held-out part drawn from the test windows of ``subjects`` only."""
    from har_edge.agent.preprocess import apply_scaler
    from har_edge.agent.runtime import TFLiteRunner
    from har_edge.trainer.reference import DEFAULT_INPUT_RANGE, build_reference

    runner = TFLiteRunner(tflite)
    keep = np.isin(p.subjects["test"], sorted(subjects))
    test = apply_scaler(p.x["test"][keep], p.mean, p.scale)
    val = apply_scaler(p.x["val"], p.mean, p.scale)
    return build_reference(
        test,
        runner.predict(test),
        p.y["test"][keep],
        "labelled",
        input_windows=apply_scaler(p.x["train"], p.mean, p.scale),
        temperature_probs=runner.predict(val),
        temperature_labels=p.y["val"],
        input_range=runner.input_range or DEFAULT_INPUT_RANGE,  # as har-train builds it (float model: None)
        groups=p.subjects["test"][keep],
    )


def replay(files: list[tuple[str, str, Path]], model: Any, work: Path, monitor: Any = None) -> list[dict]:
    """Process each (kind, name, path) with a fresh outbox; the monitor report and stage times of each."""
    from har_edge.agent.outbox import Outbox
    from har_edge.agent.pipeline import Processor
    from har_edge.agent.settings import AgentSettings

    out: list[dict[str, Any]] = []
    with Outbox(work / "outbox.sqlite") as ob:
        proc = Processor(AgentSettings(), ob, work / "scratch", monitor=monitor)
        for kind, name, path in files:
            o = proc.process([path], model, name=name)
            rep = proc.last_monitor
            if o.status != "processed" or rep is None:
                out.append({"kind": kind, "name": name, "status": o.status})
                continue
            out.append(
                {
                    "kind": kind,
                    "name": name,
                    "verdict": rep.status,
                    "reasons": rep.reasons,
                    "windows": rep.windows,
                    "metrics": rep.metrics,
                    "channel_psi": rep.channel_psi,
                    "monitor_s": rep.metrics["seconds"],
                    # its CPU: the monitor stage's thread time plus the verdict (timed after inference, alone)
                    "monitor_cpu_s": proc.last_stages["cpu_s"].get("monitor", 0.0)
                    + rep.metrics["seconds"]
                    - proc.last_stages["wall_s"].get("monitor", 0.0),
                    "inference_s": proc.last_stages["wall_s"]["inference"],
                }
            )
    return out


def measure(monitor: Any = None, limit: int | None = None) -> dict[str, Any]:
    from har_edge.agent.model import BUNDLED_MODEL_DIR, load_model

    sh = _shifts()
    p, recs = held_out_recordings()
    recs = recs[:limit] if limit else recs
    subjects = sorted({r.subject for r in recs}, key=int)
    folds = [set(subjects[0::2]), set(subjects[1::2])]
    fixtures = SCRATCH / "monitoring"
    fixtures.mkdir(parents=True, exist_ok=True)
    base = load_model(BUNDLED_MODEL_DIR)
    results: list[dict] = []
    for f, held in enumerate(folds):
        ref = fold_reference(p, BUNDLED_MODEL_DIR / "model.tflite", folds[1 - f])
        model = dataclasses.replace(base, manifest=base.manifest.model_copy(update={"reference": ref}))
        files = []
        for i, r in enumerate(x for x in recs if x.subject in held):
            path = sh.write_samples_fit(fixtures / f"{r.name}.fit", r.samples, start=sh.start_of(i))
            files.append(("in_distribution", r.name, path))
            half = len(r.samples) // 2  # each half too: shorter files of the same recording (cut, not stitched)
            for tag, part in (("a", r.samples[:half]), ("b", r.samples[half:])):
                sp = fixtures / f"{r.name}-{tag}.fit"
                files.append(("in_distribution", sp.stem, sh.write_samples_fit(sp, part, start=sh.start_of(i))))
            for kind, fn in sh.RECORDING_SHIFTS.items():
                sp = fixtures / f"{r.name}-{kind}.fit"
                files.append((kind, sp.stem, sh.write_samples_fit(sp, fn(r.samples), start=sh.start_of(i))))
        for kind, (make, seconds) in sh.SOURCE_SHIFTS.items():
            for seed in range(3):
                sp = fixtures / f"{kind}-{f}-{seed}.fit"
                files.append(
                    (kind, sp.stem, sh.write_samples_fit(sp, make(seconds, 10 * f + seed), start=sh.start_of(seed)))
                )
        work = SCRATCH / f"monitoring-fold{f}"
        shutil.rmtree(work, ignore_errors=True)  # a fresh outbox: no file is a duplicate of an earlier run's
        results += replay(files, model, work, monitor)
        log.info("fold %d: %d files", f, len(files))
    return {"files": results}


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    by: dict[str, list[dict]] = {}
    short: dict[str, int] = {}
    timed: list[dict] = []
    for r in raw["files"]:
        if "verdict" not in r:
            continue
        timed.append(r)
        if r["verdict"] in ("ok", "warn", "alert"):
            by.setdefault(r["kind"], []).append(r)
        else:  # too_short: not judged, not counted in the rates
            short[r["kind"]] = short.get(r["kind"], 0) + 1
    out: dict[str, Any] = {}
    for kind, rs in by.items():
        n = len(rs)
        out[kind] = {
            "files": n,
            "too_short": short.get(kind, 0),
            "alert": sum(r["verdict"] == "alert" for r in rs) / n,
            "warn_or_alert": sum(r["verdict"] in ("warn", "alert") for r in rs) / n,
            "minutes_median": statistics.median(r["windows"] * 2 / 60 for r in rs),
        }
    all_rs = timed
    mon = sum(r["monitor_s"] for r in all_rs)
    inf = sum(r["inference_s"] for r in all_rs)
    out["cost_share"] = mon / inf if inf else 0.0
    out["cost_share_max"] = max(r["monitor_s"] / r["inference_s"] for r in all_rs if r["inference_s"] > 0)
    out["cpu_share"] = sum(r["monitor_cpu_s"] for r in all_rs) / inf if inf else 0.0
    return out


def run(report: Report, quick: bool = False) -> None:
    raw = measure(limit=8 if quick else None)
    s = summarise(raw)
    report.raw["monitoring"] = {"summary": s, "files": raw["files"]}
    ind = s.get("in_distribution", {})
    report.add(
        "monitoring",
        "monitor cost / inference time (all files)",
        f"{100 * s['cost_share']:.1f}%",
        target="<= 5%",
        ok=s["cost_share"] <= 0.05,
        note=f"largest single file {100 * s['cost_share_max']:.1f}%; the monitor's CPU alone "
        f"{100 * s['cpu_share']:.1f}% (the rest of its wall time: waiting for the GIL while the decode thread "
        "runs, or for a core)",
    )
    report.add(
        "monitoring",
        f"false alerts, held-out HAPT recordings ({ind.get('files', 0)} judged, {ind.get('too_short', 0)} too short)",
        f"{100 * ind.get('alert', 0):.1f}% alert, {100 * ind.get('warn_or_alert', 0):.1f}% warn+alert",
        target="<= 5% alert",
        ok=ind.get("alert", 1.0) <= 0.05,
    )
    for kind, v in s.items():
        if kind in ("in_distribution", "cost_share", "cost_share_max", "cpu_share"):
            continue
        report.add(
            "monitoring",
            f"detected: {kind} ({v['files']} judged, {v['too_short']} too short)",
            f"{100 * v['warn_or_alert']:.0f}% warn+alert, {100 * v['alert']:.0f}% alert",
        )

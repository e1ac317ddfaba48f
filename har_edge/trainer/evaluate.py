"""Stage ``evaluate``: held-out subjects, float Keras model vs its int8 TFLite conversion.

The int8 model is converted here (with real training windows as the
representative dataset) and run in the edge runtime, so the figures the gate
reads are those of the very bytes the export ships (``metrics.json`` names their
sha256). Output in ``build/trainer/eval/``: ``model_int8.tflite``, ``metrics.json``
(accuracy, macro F1 of both, int8/float agreement, size, latency),
``report.json`` (per-class precision/recall/F1, per-subject accuracy, confusion
matrices), ``confusion.png`` and ``predictions.npz``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from har_edge.agent.preprocess import apply_scaler
from har_edge.agent.runtime import TFLiteRunner
from har_edge.common.hashing import sha256_file
from har_edge.trainer import tracking
from har_edge.trainer.errors import TrainerError
from har_edge.trainer.export import convert_int8, representative_windows
from har_edge.trainer.npzio import save_npz
from har_edge.trainer.prepare import load_prepared
from har_edge.trainer.settings import Settings

log = logging.getLogger(__name__)

TFLITE_FILE = "model_int8.tflite"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.json"
CONFUSION_FILE = "confusion.png"
PREDICTIONS_FILE = "predictions.npz"


def classification_figures(y_true: np.ndarray, probs: np.ndarray, labels: tuple[str, ...]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    pred = probs.argmax(1)
    k = range(len(labels))
    return {
        "accuracy": float(accuracy_score(y_true, pred)),
        "macro_f1": float(f1_score(y_true, pred, labels=list(k), average="macro", zero_division=0)),
        "report": classification_report(
            y_true, pred, labels=list(k), target_names=list(labels), output_dict=True, zero_division=0
        ),
        "confusion": confusion_matrix(y_true, pred, labels=list(k)).tolist(),
    }


def plot_confusion(confusion: list[list[int]], labels: tuple[str, ...], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.0 * len(labels) + 2))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}\n{share[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[i, j] > 0.5 else "black",
            )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(settings: Settings) -> dict[str, float]:
    from har_edge.trainer.train import configure_tensorflow, load_keras_model, read_run

    p = load_prepared(settings)
    run = read_run(settings)
    configure_tensorflow(settings.train.threads, settings.train.seed)
    import tensorflow as tf

    model = load_keras_model(settings)
    x_test = apply_scaler(p.x["test"], p.mean, p.scale)
    y_test = p.y["test"]
    float_probs = np.asarray(model.predict(x_test, batch_size=256, verbose=0), dtype=np.float32)

    out = settings.eval_dir
    out.mkdir(parents=True, exist_ok=True)
    x_rep = representative_windows(
        apply_scaler(p.x["train"], p.mean, p.scale), settings.export.representative_windows, settings.train.seed
    )
    tflite = out / TFLITE_FILE
    tflite.write_bytes(convert_int8(model, x_rep))
    runner = TFLiteRunner(tflite, threads=1, batch=64)
    timings: list[float] = []
    int8_probs = runner.predict(x_test, timings)

    f = classification_figures(y_test, float_probs, p.labels)
    q = classification_figures(y_test, int8_probs, p.labels)
    agreement = float((float_probs.argmax(1) == int8_probs.argmax(1)).mean())
    size = tflite.stat().st_size
    metrics = {
        "float_accuracy": f["accuracy"],
        "float_macro_f1": f["macro_f1"],
        "int8_accuracy": q["accuracy"],
        "int8_macro_f1": q["macro_f1"],
        "agreement": agreement,
        "size_kb": round(size / 1024, 2),
        "test_windows": float(len(y_test)),
        "int8_ms_per_window": round(1000 * float(np.median(timings)), 4) if timings else 0.0,
    }
    per_subject = {
        str(s): float((int8_probs.argmax(1)[p.subjects["test"] == s] == y_test[p.subjects["test"] == s]).mean())
        for s in sorted(set(p.subjects["test"].tolist()), key=lambda s: (len(s), s))
    }
    report = {
        "labels": list(p.labels),
        "int8": {"report": q["report"], "confusion": q["confusion"]},
        "float": {"report": f["report"], "confusion": f["confusion"]},
        "int8_accuracy_per_subject": per_subject,
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    plot_confusion(
        q["confusion"],
        p.labels,
        out / CONFUSION_FILE,
        f"int8, held-out subjects: accuracy {q['accuracy']:.1%}, macro F1 {q['macro_f1']:.3f}",
    )
    save_npz(
        out / PREDICTIONS_FILE,
        {"y_true": y_test.astype(np.int16), "float_probs": float_probs, "int8_probs": int8_probs},
    )
    doc = {
        "metrics": metrics,
        "tflite_sha256": sha256_file(tflite),
        "representative_windows": len(x_rep),
        "tensorflow": tf.__version__,
        "runtime": runner.runtime,
    }
    (out / METRICS_FILE).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")

    run_id = run["run_id"]
    if tracking.run_exists(settings, run_id):
        tracking.log_metrics(settings, run_id, metrics)
        tracking.log_metrics(settings, run_id, {f"int8_accuracy.subject_{s}": v for s, v in per_subject.items()})
        tracking.log_metrics(
            settings, run_id, {f"int8_f1.{name}": float(q["report"][name]["f1-score"]) for name in p.labels}
        )
        tracking.log_artifacts(settings, run_id, [out / CONFUSION_FILE, out / REPORT_FILE, out / METRICS_FILE], "eval")
    else:
        log.warning("MLflow run %s is not in %s: evaluation figures are not tracked", run_id, settings.tracking_uri)
    log.info(
        "held-out: int8 accuracy %.4f (float %.4f), macro F1 %.4f, agreement %.4f, %.1f KB",
        metrics["int8_accuracy"],
        metrics["float_accuracy"],
        metrics["int8_macro_f1"],
        agreement,
        size / 1024,
    )
    return metrics


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    tflite_path: Path
    int8_probs: np.ndarray
    representative: int
    tensorflow_version: str


def load_evaluation(settings: Settings) -> Evaluation:
    out = settings.eval_dir
    path = out / METRICS_FILE
    if not path.is_file():
        raise TrainerError(f"{path} is missing: run `har-train evaluate` first")
    doc = json.loads(path.read_text(encoding="utf-8"))
    tflite = out / TFLITE_FILE
    if not tflite.is_file() or sha256_file(tflite) != doc["tflite_sha256"]:
        raise TrainerError(f"{tflite} is not the model {path} describes: run `har-train evaluate` again")
    with np.load(out / PREDICTIONS_FILE, allow_pickle=False) as z:
        int8_probs = z["int8_probs"]
    return Evaluation(doc["metrics"], tflite, int8_probs, int(doc["representative_windows"]), doc["tensorflow"])

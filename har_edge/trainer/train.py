"""Stage ``train``: prepared windows -> a Keras model, tracked as a new MLflow run.

Output in ``build/trainer/train/``: ``model.keras``, ``history.json`` (per-epoch
figures) and ``run.json`` (the MLflow run the later stages resume).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from har_edge.agent.manifest import CHANNELS
from har_edge.agent.preprocess import apply_scaler
from har_edge.trainer import tracking
from har_edge.trainer.errors import TrainerError
from har_edge.trainer.prepare import Prepared, load_prepared
from har_edge.trainer.settings import Settings

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
RUN_FILE = "run.json"
HISTORY_FILE = "history.json"


def configure_tensorflow(threads: int, seed: int) -> None:
    """Threads, seeds and deterministic ops (same data + params -> same weights on one machine)."""
    import keras
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised in this process (tests): keep what is set
        pass
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def data_tags(p: Prepared) -> dict[str, str]:
    return {
        "har.data_sha256": p.meta["sha256"],
        "har.data_dvc_md5": p.meta["dvc_md5"],
        "har.source_sha256": p.meta.get("source_sha256", ""),
        "har.data_source_detail": p.meta["source"],
    }


def scaler_params(p: Prepared) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, _unit), mean, scale in zip(CHANNELS, p.mean, p.scale, strict=False):
        out[f"scaler.mean.{name}"] = round(float(mean), 6)
        out[f"scaler.scale.{name}"] = round(float(scale), 6)
    return out


def read_run(settings: Settings) -> dict[str, Any]:
    path = settings.train_dir / RUN_FILE
    if not path.is_file():
        raise TrainerError(f"{path} is missing: run `har-train train` first")
    return json.loads(path.read_text(encoding="utf-8"))


def train(settings: Settings, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train, save and track the model; return a summary (run id, epochs, seconds, figures)."""
    cfg = settings.train
    p = load_prepared(settings)
    configure_tensorflow(cfg.threads, cfg.seed)
    import keras

    from har_edge.trainer.model import build_model, macs_per_window

    x_train = apply_scaler(p.x["train"], p.mean, p.scale)
    x_val = apply_scaler(p.x["val"], p.mean, p.scale)
    has_val = len(x_val) > 0
    classes = len(p.labels)
    model = build_model(cfg, window=x_train.shape[1], channels=x_train.shape[2], classes=classes)

    run_id = tracking.start_run(settings, extra_tags=data_tags(p))
    params = settings.params()
    params.update(scaler_params(p))
    params.update({f"data.windows.{k}": v for k, v in p.meta["windows"].items()})
    params.update({f"split.subjects.{k}": ",".join(v) for k, v in p.meta["subjects"].items()})
    params["model.parameters"] = model.count_params()
    params["model.macs_per_window"] = macs_per_window(model)
    tracking.log_params(settings, run_id, params)
    tracking.log_artifacts(settings, run_id, [settings.prepared_meta], "data")

    steps_per_epoch = int(np.ceil(len(x_train) / cfg.batch_size))
    lr: Any = cfg.learning_rate
    if cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, max(1, steps_per_epoch * cfg.epochs))
    optimizer = (
        keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay) if cfg.weight_decay else keras.optimizers.Adam(lr)
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=["accuracy"],
    )
    y_train = keras.utils.to_categorical(p.y["train"], classes)
    validation = (x_val, keras.utils.to_categorical(p.y["val"], classes)) if has_val else None
    cbs = [tracking.epoch_logger(settings, run_id), *(callbacks or [])]
    if cfg.patience and has_val:
        cbs.insert(
            0,
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy",
                patience=cfg.patience,
                restore_best_weights=True,
                start_from_epoch=cfg.min_epochs,
            ),
        )
    t0 = time.perf_counter()
    try:
        history = model.fit(
            x_train,
            y_train,
            validation_data=validation,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            shuffle=True,
            verbose=0,
            callbacks=cbs,
        )
    except BaseException:
        tracking.end_run(settings, run_id, "FAILED")
        raise
    seconds = time.perf_counter() - t0
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    epochs_run = len(hist.get("loss", []))
    val_acc = hist.get("val_accuracy", [])
    if cfg.patience and len(val_acc) > cfg.min_epochs:
        best_epoch = cfg.min_epochs + int(np.argmax(val_acc[cfg.min_epochs :]))  # EarlyStopping restored it
    else:
        best_epoch = epochs_run - 1  # the last epoch's weights are kept

    out = settings.train_dir
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / MODEL_FILE)
    (out / HISTORY_FILE).write_text(json.dumps(hist, indent=1) + "\n", encoding="utf-8")
    summary = {
        "run_id": run_id,
        "tracking_uri": settings.tracking_uri,
        "experiment": settings.mlflow.experiment,
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        "val_accuracy": float(val_acc[best_epoch]) if val_acc and best_epoch >= 0 else None,
        "train_seconds": round(seconds, 1),
        "parameters": int(model.count_params()),
        "macs_per_window": macs_per_window(model),
        "data_sha256": p.meta["sha256"],
    }
    (out / RUN_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    final = {"train_seconds": seconds, "epochs_run": epochs_run, "best_epoch": best_epoch}
    if summary["val_accuracy"] is not None:
        final["kept_val_accuracy"] = summary["val_accuracy"]
    tracking.log_metrics(settings, run_id, final)
    log.info(
        "trained %s in %.0f s (%d epochs, weights of epoch %d, val accuracy %s) -> %s",
        model.name,
        seconds,
        epochs_run,
        best_epoch,
        summary["val_accuracy"],
        out / MODEL_FILE,
    )
    return summary


def load_keras_model(settings: Settings) -> Any:
    import keras

    path = settings.train_dir / MODEL_FILE
    if not Path(path).is_file():
        raise TrainerError(f"{path} is missing: run `har-train train` first")
    return keras.models.load_model(path, compile=False)

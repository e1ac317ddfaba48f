"""``har-train``: the trainer's command line (``dvc.yaml`` calls one subcommand per stage).

    har-train [--params params.yaml] [--set section.key=value ...] <command>

    prepare             data source -> build/trainer/prepared.npz (+ .json)
    train               -> build/trainer/train/ (Keras model, MLflow run)
    evaluate            -> build/trainer/eval/ (int8 conversion, metrics, report, confusion.png)
    export [--out DIR]  gate, then build/trainer/model/ (model.tflite, manifest.json, golden.npz), verified
    all                 the four stages in a row (what `dvc repro` runs)
    release [--registry REPO] [--remote URL] FOLDER
                        dvc add + push, commit, tag <name>@v<version>, MLflow registry
    bundle FOLDER DEST  verify a model folder and copy it to DEST (agent/default_model)
    verify FOLDER       load a model folder as the edge does (sha256, shapes, golden windows)
    check-config        validate params.yaml (exit 0) or name each problem (exit 1)

Exit codes: 0 done, 1 invalid configuration, 2 failed (message on stderr),
3 the gate refused the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from har_edge.agent.errors import HarEdgeError
from har_edge.trainer.errors import ConfigError, GateFailed
from har_edge.trainer.settings import Settings, load_settings

log = logging.getLogger(__name__)

EXIT_OK, EXIT_CONFIG, EXIT_FAILED, EXIT_GATE = 0, 1, 2, 3


def _progress(desc: str, total: int | None = None):
    def wrap(items: Iterable[Any]) -> Iterable[Any]:
        from tqdm import tqdm

        return tqdm(items, desc=desc, total=total, unit="rec", disable=None, leave=False)

    return wrap


def _epoch_bar(total: int) -> Any:
    import keras
    from tqdm import tqdm

    class EpochBar(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:
            self.bar = tqdm(total=total, desc="train", unit="epoch", disable=None)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            self.bar.set_postfix(acc=f"{logs.get('accuracy', 0):.3f}", val=f"{logs.get('val_accuracy', 0):.3f}")
            self.bar.update(1)

        def on_train_end(self, logs: dict | None = None) -> None:
            self.bar.close()

    return EpochBar()


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    for name in ("tensorflow", "absl", "h5py", "matplotlib", "PIL", "urllib3", "git"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cmd_prepare(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.prepare import prepare

    meta = prepare(s, progress=_progress("windows"))
    print(f"prepared {meta['windows']} windows from {meta['source']} -> {s.prepared_file}")
    return EXIT_OK


def cmd_train(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.train import train

    summary = train(s, callbacks=[_epoch_bar(s.train.epochs)])
    print(
        f"trained: {summary['epochs_run']} epochs, {summary['train_seconds']} s, val accuracy "
        f"{summary['val_accuracy']}; MLflow run {summary['run_id']}"
    )
    return EXIT_OK


def cmd_evaluate(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.evaluate import evaluate

    m = evaluate(s)
    print(json.dumps(m, indent=2))
    return EXIT_OK


def cmd_export(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.export import export

    manifest, _gate = export(s, out=a.out)
    out = a.out or s.model_dir
    print(f"exported {manifest.name} {manifest.version} -> {out} (sha256 {manifest.sha256[:12]}…)")
    return EXIT_OK


def cmd_all(s: Settings, a: argparse.Namespace) -> int:
    a.out = None
    for step in (cmd_prepare, cmd_train, cmd_evaluate, cmd_export):
        step(s, a)
    return EXIT_OK


def cmd_release(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.release import release

    r = release(
        s,
        Path(a.folder),
        registry=a.registry or s.release.registry,
        remote=a.remote or s.release.remote,
        push_git=not a.no_git_push,
    )
    print(json.dumps(r.as_dict(), indent=2))
    return EXIT_OK


def cmd_bundle(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.release import bundle

    dest = bundle(Path(a.folder), Path(a.dest), s)
    print(f"bundled {a.folder} -> {dest}")
    return EXIT_OK


def cmd_verify(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.export import verify_folder

    runtimes = verify_folder(Path(a.folder))
    print(f"{a.folder}: verified in {', '.join(runtimes)}")
    return EXIT_OK


def cmd_check_config(s: Settings, a: argparse.Namespace) -> int:
    print(f"{a.params}: valid")
    return EXIT_OK


def cmd_adapt(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.adapt import adapt

    r = adapt(
        s,
        Path(a.folder),
        Path(a.out),
        data=a.data,
        from_mlflow=a.from_mlflow,
        float_path=a.float_path,
        version=a.version,
        pseudo_label=a.pseudo_label,
        max_accuracy_drop=a.max_accuracy_drop,
        target_only=a.target_only,
    )
    print(f"adapted {r.version} -> {r.folder}: {r.as_dict()}; release it with `har-train release {r.folder}`")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="har-train", description="Train, export and release har-edge models.")
    ap.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter, e.g. --set train.epochs=5 (repeatable)",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="data source -> windows split by subject + scaler")
    sub.add_parser("train", help="train the Keras model (a new MLflow run)")
    sub.add_parser("evaluate", help="held-out figures of the float and int8 models")
    p = sub.add_parser("export", help="gate, then write and verify the model folder")
    p.add_argument("--out", type=Path, default=None, help="model folder (default: build/trainer/model)")
    sub.add_parser("all", help="prepare, train, evaluate, export")
    p = sub.add_parser("release", help="publish a model folder through DVC + git tag + MLflow registry")
    p.add_argument("folder", help="the exported model folder")
    p.add_argument("--registry", default="", help="git working repository of the model registry")
    p.add_argument("--remote", default="", help="DVC remote URL (absolute path or URL)")
    p.add_argument("--no-git-push", action="store_true", help="do not push to the registry's git remote")
    p = sub.add_parser("bundle", help="verify a model folder and copy it (e.g. to agent/default_model)")
    p.add_argument("folder")
    p.add_argument("dest")
    p = sub.add_parser("verify", help="load a model folder as the edge does")
    p.add_argument("folder")
    sub.add_parser("check-config", help="validate the params file")
    p = sub.add_parser("adapt", help="AdaBN (+ pseudo-labels) on flagged data -> a new model folder to release")
    p.add_argument("folder", help="model folder (with float/model.keras, or give --float)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="folder of exports (or one export) from the target devices")
    src.add_argument("--from-mlflow", metavar="FILTER", help="MLflow run filter of device runs with shared windows")
    p.add_argument("--float", dest="float_path", type=Path, help="the float Keras model (default FOLDER/float)")
    p.add_argument("--out", required=True, help="the adapted model folder to write")
    p.add_argument("--version", help="version of the adapted model (default: the next patch version)")
    p.add_argument("--pseudo-label", action="store_true", help="fine-tune on confident target windows after AdaBN")
    p.add_argument("--max-accuracy-drop", type=float, default=0.02, help="allowed held-out test accuracy drop")
    p.add_argument("--target-only", action="store_true", help="BatchNorm statistics of the target alone (no mix)")
    return ap


COMMANDS = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "all": cmd_all,
    "release": cmd_release,
    "bundle": cmd_bundle,
    "verify": cmd_verify,
    "check-config": cmd_check_config,
    "adapt": cmd_adapt,
}


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _quiet_tensorflow()
    try:
        params = Path(a.params)
        settings = load_settings(params if params.is_file() or a.params != "params.yaml" else None, a.overrides)
    except ConfigError as exc:
        print(f"har-train: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return COMMANDS[a.command](settings, a)
    except GateFailed as exc:
        print(f"har-train: {exc}", file=sys.stderr)
        return EXIT_GATE
    except HarEdgeError as exc:
        print(f"har-train {a.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("har-train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

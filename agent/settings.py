"""One frozen, validated settings object per process.

Sources, later ones winning: built-in defaults, a TOML file (``--config``,
``HAR_EDGE_CONFIG``, or ``<data_dir>/har-edge.toml`` when it exists), and
``HAR_EDGE_*`` environment variables (``HAR_EDGE_DATA_DIR``,
``HAR_EDGE_AGENT__SETTLE_S``: a double underscore enters a section). Unknown
keys and wrong values are refused with one message listing each of them.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.errors import ConfigError

ENV_PREFIX = "HAR_EDGE_"
CONFIG_NAME = "har-edge.toml"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AgentSettings(_Section):
    settle_s: float = Field(2.0, ge=0, description="a file must keep its size and mtime this long before it is taken")
    scan_interval_s: float = Field(1.0, gt=0, description="how often the inbox is re-checked besides file events")
    archive: bool = Field(True, description="keep processed files in archive/ (false: delete them)")
    model_dir: Path | None = Field(None, description="use this model folder instead of models/current or the bundled one")
    threads: int = Field(1, ge=1, le=64, description="TFLite interpreter threads")
    batch: int = Field(64, ge=1, le=4096, description="windows per inference call")
    max_gap_s: float = Field(1.0, gt=0, description="a longer gap between samples splits the recording")
    low_confidence: float = Field(0.6, ge=0, le=1, description="windows under this confidence count as low-confidence")
    outbox_max_mb: float = Field(1024.0, gt=0, description="ingestion pauses while the outbox is larger than this")
    max_archive_mb: float = Field(512.0, gt=0, description="a zip expanding beyond this is refused")
    max_file_mb: float = Field(2048.0, gt=0, description="a dropped file larger than this is refused")


class SyncSettings(_Section):
    tracking_uri: str | None = Field(None, description="MLflow server; default MLFLOW_TRACKING_URI or a local store under data_dir")
    experiment: str = Field("har-edge", min_length=1)
    username: str | None = None
    password: str | None = Field(None, repr=False)
    token: str | None = Field(None, repr=False)
    server_cert_path: Path | None = None
    request_timeout_s: float = Field(5.0, gt=0)
    push_interval_s: float = Field(30.0, gt=0)
    pull_interval_s: float = Field(300.0, gt=0)
    jitter_s: float = Field(5.0, ge=0)
    backoff_max_s: float = Field(600.0, gt=0)
    registry: str | None = Field(None, description="model registry git repository (URL or path)")
    model_name: str = Field("har-cnn", min_length=1)
    pin: str | None = Field(None, description="deploy exactly this version instead of the newest")
    command_timeout_s: float = Field(120.0, gt=0, description="bound on each git/dvc call")
    health_files: int = Field(3, ge=1, description="files a new model must process before it is trusted")
    health_max_failed_share: float = Field(0.5, ge=0, le=1)
    health_min_confidence_ratio: float = Field(0.7, gt=0, le=1)


class Settings(_Section):
    data_dir: Path = Field(Path("var"), description="holds inbox, archive, quarantine, outbox, models, logs")
    device_id: str = Field("", description="default: the host name")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = False
    agent: AgentSettings = AgentSettings()
    sync: SyncSettings = SyncSettings()

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    # -- folders -----------------------------------------------------------

    @property
    def inbox(self) -> Path:
        return self.data_dir / "inbox"

    @property
    def work(self) -> Path:
        return self.data_dir / "work"

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"

    @property
    def quarantine(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def outbox_path(self) -> Path:
        return self.data_dir / "outbox.sqlite"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def device(self) -> str:
        return self.device_id or os.uname().nodename


def _env_layer(env: Mapping[str, str]) -> dict:
    """Nested dict from HAR_EDGE_* variables (``__`` enters a section)."""
    out: dict = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        if name == "HAR_EDGE_TFLITE_RUNTIME":
            continue  # read by agent.runtime (test and benchmark switch)
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {part} is a value, not a section")
        node[path[-1]] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_settings(config: Path | None = None, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build the settings of this process, or raise ConfigError naming every problem."""
    env = os.environ if env is None else env
    env_values = _env_layer(env)
    if config is None and env.get(ENV_PREFIX + "CONFIG"):
        config = Path(env[ENV_PREFIX + "CONFIG"])
    if config is None:
        data_dir = Path(env_values.get("data_dir", overrides.get("data_dir", "var")))
        candidate = data_dir / CONFIG_NAME
        config = candidate if candidate.is_file() else None
    file_values: dict = {}
    if config is not None:
        try:
            file_values = tomllib.loads(Path(config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {config} does not exist") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {config} is not valid TOML: {exc}") from None
    values = _merge(_merge(file_values, env_values), overrides)
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        where = f" (from {config} and HAR_EDGE_* variables)" if config else " (from HAR_EDGE_* variables)"
        lines = []
        for e in exc.errors():
            key = ".".join(str(p) for p in e["loc"])
            msg = "unknown setting" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"  {key}: {msg}")
        raise ConfigError("invalid settings" + where + ":\n" + "\n".join(lines)) from None

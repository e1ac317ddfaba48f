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

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from har_edge.agent.errors import ConfigError

ENV_PREFIX = "HAR_EDGE_"
CONFIG_NAME = "har-edge.toml"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AgentSettings(_Section):
    settle_s: float = Field(2.0, ge=0, description="a file must keep its size and mtime this long before it is taken")
    scan_interval_s: float = Field(1.0, gt=0, description="how often the inbox is re-checked besides file events")
    archive: bool = Field(True, description="keep processed files in archive/ (false: delete them)")
    model_dir: Path | None = Field(
        None, description="use this model folder instead of models/current or the bundled one"
    )
    threads: int | Literal["auto"] = Field(
        "auto",
        description="TFLite interpreter threads; auto: the cores this process may use (CPU affinity, capped by a "
        "cgroup CPU quota)",
    )
    decode_ahead: int = Field(
        2,
        ge=0,
        le=16,
        description="chunks (~3 min of data each) a decode thread prepares while the model runs on the last ones; "
        "0 decodes in turn with inference",
    )
    batch: int = Field(64, ge=1, le=4096, description="windows per inference call")
    max_gap_s: float = Field(1.0, gt=0, description="a longer gap between samples splits the recording")
    low_confidence: float = Field(0.6, ge=0, le=1, description="windows under this confidence count as low-confidence")
    outbox_max_mb: float = Field(1024.0, gt=0, description="ingestion pauses while the outbox is larger than this")
    max_archive_mb: float = Field(512.0, gt=0, description="a zip expanding beyond this is refused")
    max_file_mb: float = Field(2048.0, gt=0, description="a dropped file larger than this is refused")
    max_attempts: int = Field(
        3,
        ge=1,
        description="a file whose processing died this many times at the same point (found in work/ at start) "
        "is quarantined as internal",
    )
    disk_full_retry_s: float = Field(
        30.0, gt=0, description="while the disk is full, how often the waiting file is tried again"
    )

    # -- retention (har_edge.agent.retention): the data dir stays inside a disk budget --------------
    archive_max_age_days: float = Field(
        30.0, ge=0, description="delete archived exports older than this once the server has their results; 0: no limit"
    )
    archive_max_mb: float = Field(
        20480.0, ge=0, description="keep archive/ under this size, deleting delivered exports oldest first; 0: no limit"
    )
    quarantine_max_age_days: float = Field(
        90.0, ge=0, description="delete quarantined files older than this once their reason is recorded; 0: no limit"
    )
    quarantine_max_mb: float = Field(
        2048.0, ge=0, description="keep quarantine/ under this size, oldest first; 0: no limit"
    )
    min_free_mb: float = Field(
        512.0, ge=0, description="ingestion pauses while the data dir's file system has less free space than this"
    )
    retention_interval_s: float = Field(60.0, gt=0, description="how often archive/ and quarantine/ are pruned")

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise ValueError("must be auto or a whole number of threads from 1 to 64") from None
        if isinstance(v, bool) or (isinstance(v, float) and v != n) or not 1 <= n <= 64:
            raise ValueError("must be auto or a whole number of threads from 1 to 64")
        return n


class MonitorSettings(_Section):
    """Per-file monitoring against the model's training reference, and the device-level retraining trigger.

    Defaults were measured on held-out HAPT recordings (docs/monitoring.md): at most 5% false alerts.
    """

    enabled: bool = Field(True, description="compute a monitor verdict for every processed file")
    min_windows: int = Field(
        100, ge=1, description="below this many windows (200 s at a 2 s step) a file is 'too short to judge'"
    )
    psi_warn: float = Field(1.0, gt=0, description="a histogram warns only with PSI >= this ...")
    psi_alert: float = Field(3.0, gt=0, description="... and alerts only with PSI >= this ...")
    psi_warn_ratio: float = Field(
        2.0, gt=0, description="... and PSI >= this times what held-out recordings reach (reference typical_psi)"
    )
    psi_alert_ratio: float = Field(3.0, gt=0, description="alert: PSI >= this times the held-out typical PSI")
    feature_psi_warn: float = Field(2.0, gt=0, description="as psi_warn, for per-window features")
    feature_psi_alert: float = Field(3.5, gt=0, description="as psi_alert, for per-window features")
    typical_psi_default: float = Field(
        0.5, gt=0, description="typical PSI assumed where the reference measured none (no held-out groups)"
    )
    typical_psi_floor: float = Field(0.1, gt=0, description="a typical PSI is never taken below this")
    drift_warn: float = Field(1.5, gt=0, description="warn when the mean relative PSI (PSI / typical) >= this")
    drift_alert: float = Field(2.5, gt=0, description="alert when the mean relative PSI >= this")
    saturation_warn: float = Field(
        0.01, ge=0, le=1, description="warn when this share of input values (above training's) is beyond the int8 range"
    )
    saturation_alert: float = Field(0.05, ge=0, le=1, description="alert at this share of saturated input values")
    confidence_drop_warn: float = Field(
        0.2, ge=0, le=1, description="warn when mean calibrated confidence is this far below held-out data's"
    )
    low_confidence_rise_warn: float = Field(
        0.3, ge=0, le=1, description="warn when the low-confidence share exceeds held-out data's by this"
    )
    one_class_share: float = Field(0.95, gt=0, le=1, description="a file this much one class ...")
    one_class_confidence: float = Field(0.9, gt=0, le=1, description="... at this mean confidence ...")
    one_class_prior_max: float = Field(0.5, gt=0, le=1, description="... of a class under this training prior warns")
    flip_rate_factor: float = Field(3.0, ge=1, description="warn when the flip rate exceeds held-out's times this ...")
    flip_rate_margin: float = Field(0.15, ge=0, description="... and held-out's plus this")
    trigger_files: int = Field(10, ge=1, description="the retraining trigger looks at the last this many files")
    trigger_alerts: int = Field(3, ge=1, description="a retraining request is raised when this many of them alert")
    flagged_windows_per_file: int = Field(
        64, ge=0, le=4096, description="windows of an alerting file kept for sync.share_flagged_windows"
    )


class SyncSettings(_Section):
    """The sync daemon: outbox -> MLflow, model registry -> models/current."""

    # -- MLflow ---------------------------------------------------------------
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking server (http[s]://...); default MLFLOW_TRACKING_URI, "
        "else a local store sqlite:///<data_dir>/mlflow/mlflow.db (no server needed)",
    )
    experiment: str = Field("har-edge", min_length=1, description="MLflow experiment holding the runs of this device")
    username: str | None = Field(None, repr=False, description="overrides MLFLOW_TRACKING_USERNAME (basic auth)")
    password: str | None = Field(None, repr=False, description="overrides MLFLOW_TRACKING_PASSWORD (basic auth)")
    token: str | None = Field(None, repr=False, description="overrides MLFLOW_TRACKING_TOKEN (bearer auth)")
    server_cert_path: Path | None = Field(None, description="overrides MLFLOW_TRACKING_SERVER_CERT_PATH (CA bundle)")
    request_timeout_s: float = Field(
        5.0, gt=0, description="time-out of one HTTP request to MLflow (MLFLOW_HTTP_REQUEST_TIMEOUT, whole seconds)"
    )
    http_max_retries: int = Field(
        0,
        ge=0,
        le=10,
        description="MLflow's own HTTP retries per request (MLFLOW_HTTP_REQUEST_MAX_RETRIES); keep it small: "
        "the daemon backs off itself, and MLflow's default makes a refused connection take minutes",
    )
    batch_size: int = Field(
        1000, ge=1, le=1000, description="metric points per log_batch request (MLflow caps it at 1000)"
    )
    reclaim_after_days: float = Field(
        7.0,
        ge=0,
        description="delete per-window rows (their CSV is on the server) and device points delivered this long "
        "ago; 0 keeps them",
    )
    # -- schedule -------------------------------------------------------------
    push_interval_s: float = Field(30.0, gt=0, description="how often the outbox is pushed")
    pull_interval_s: float = Field(300.0, gt=0, description="how often the registry is asked for a newer model")
    health_interval_s: float = Field(30.0, gt=0, description="how often a newly activated model is checked")
    heartbeat_interval_s: float = Field(
        300.0, gt=0, description="device heartbeat points (backlog, oldest item, disk free, model) at most this often"
    )
    jitter_s: float = Field(5.0, ge=0, description="random delay added to each scheduled pass (spreads a fleet's load)")
    backoff_initial_s: float = Field(10.0, gt=0, description="wait after the first failed pass; doubles per failure")
    backoff_max_s: float = Field(600.0, gt=0, description="longest wait between failed passes")
    # -- model registry ---------------------------------------------------------
    registry: str | None = Field(
        None, description="model registry git repository (URL or absolute path) as `har-train release` writes it"
    )
    registry_remote_url: str | None = Field(
        None, description="DVC storage URL to use instead of the registry's default remote (dvc get --remote-config)"
    )
    dvc_remote_endpoint: str | None = Field(
        None,
        description="endpoint of an S3-compatible store (http[s]://host:port) holding an s3:// DVC remote, "
        "given to dvc get as AWS_ENDPOINT_URL_S3 (an endpointurl in the registry's committed DVC config wins); "
        "keys come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS credentials file, never this URL",
    )
    model_name: str = Field(
        "har-cnn",
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="released model name: tags <name>@v<version>, folder models/<name> in the registry",
    )
    pin: str | None = Field(
        None, description="deploy exactly this version instead of the newest (`har-edge models pin` overrides it)"
    )
    allow_prerelease: bool = Field(False, description="consider versions like 2.0.0-rc1 when looking for the newest")
    command_timeout_s: float = Field(120.0, gt=0, description="bound on each git/dvc call")
    trusted_keys: tuple[str, ...] = Field(
        (),
        description="ed25519 public keys releases must be signed with: files (.pub or PEM; relative to the data "
        "folder) or inline (base64 or PEM); several at once for a rotation (comma-separated in "
        "HAR_EDGE_SYNC__TRUSTED_KEYS); empty: releases are not checked (a warning per release)",
    )
    revoked_keys: tuple[str, ...] = Field(
        (),
        description="key ids (16 hex digits) whose signatures are refused, even when the key is still trusted; "
        "kept here on the device, never in the registry",
    )
    pages: bool = Field(
        True,
        description="draw and upload each file run's timeline and activity table and the daily runs "
        "(a matplotlib child process); off: runs get their description and span only",
    )
    share_flagged_windows: bool = Field(
        False,
        description="upload the windows of alerting files with a retraining request (.npz); off: raw data stays here",
    )
    # -- raw custody (har_edge.sync.custody): archived raw exports -> the study's store -----------------
    raw_store: str | None = Field(
        None,
        description="copy every archived raw export here, checksummed and resumable, before retention may delete "
        "it: s3://bucket[/prefix] (also a DVC remote's s3 URL) or an absolute folder / file:// URL (a DVC local "
        "remote); unset: no custody",
    )
    raw_store_endpoint_url: str | None = Field(
        None, description="S3 endpoint of raw_store (MinIO, SeaweedFS, ...); default AWS_ENDPOINT_URL, else AWS"
    )
    raw_store_region: str | None = Field(None, description="S3 region of raw_store; default AWS_REGION, else us-east-1")
    raw_store_access_key_id: str | None = Field(
        None, repr=False, description="S3 access key of raw_store; default AWS_ACCESS_KEY_ID / the AWS config"
    )
    raw_store_secret_access_key: str | None = Field(
        None, repr=False, description="S3 secret key of raw_store; default AWS_SECRET_ACCESS_KEY / the AWS config"
    )
    raw_store_part_mb: float = Field(
        8.0, ge=5, le=512, description="S3 multipart part size (held in memory); an export up to it goes in one request"
    )
    raw_store_pass_s: float = Field(
        120.0, gt=0, description="a custody pass starts no new part or file after this long (the rest waits)"
    )
    raw_store_interval_s: float = Field(60.0, gt=0, description="how often a custody pass runs")
    # -- health gate ------------------------------------------------------------
    health_files: int = Field(3, ge=1, description="files a new model must process before it is trusted")
    health_max_failed_share: float = Field(
        0.5, ge=0, le=1, description="roll back when more than this share of those files failed"
    )
    health_min_confidence_ratio: float = Field(
        0.7,
        gt=0,
        le=1,
        description="roll back when their mean confidence is below this ratio of the previous model's recent files",
    )
    health_max_input_outside_share: float = Field(
        0.05,
        ge=0,
        le=1,
        description="roll back when more than this share of the scaled inputs lies beyond the int8 input range",
    )
    health_ignored_error_kinds: tuple[str, ...] = Field(
        ("unknown_format", "corrupt", "no_imu_data", "unsafe_archive"),
        description="file failures that cannot be the model's fault and do not count against it "
        "(comma-separated in HAR_EDGE_SYNC__HEALTH_IGNORED_ERROR_KINDS)",
    )

    @field_validator("dvc_remote_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(v.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an http:// or https:// URL (the S3 endpoint, e.g. http://10.0.0.5:8333)")
        if parts.username is not None or parts.password is not None:
            raise ValueError("carries credentials: give the keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead")
        return v.strip()

    @field_validator("raw_store")
    @classmethod
    def _store_url(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        v = v.strip()
        if v.startswith("s3://"):
            if not v[5:].split("/", 1)[0]:
                raise ValueError("an s3:// store needs a bucket: s3://bucket[/prefix]")
            return v.rstrip("/")
        path = v[7:] if v.startswith("file://") else v
        if "://" in path or not path.startswith("/"):
            raise ValueError("give s3://bucket[/prefix], an absolute folder or a file:// URL")
        return v

    @field_validator("health_ignored_error_kinds", "trusted_keys", "revoked_keys", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        return tuple(x.strip() for x in v.split(",") if x.strip()) if isinstance(v, str) else v

    @field_validator("trusted_keys")
    @classmethod
    def _keys(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from har_edge.agent.signing import is_inline_key, parse_public_key

        for n, entry in enumerate(v):
            if is_inline_key(entry):
                try:
                    parse_public_key(entry, source=f"inline key #{n + 1}")
                except ConfigError as exc:
                    raise ValueError(str(exc)) from None
        return tuple(e.strip() for e in v)

    @field_validator("revoked_keys")
    @classmethod
    def _key_ids(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        import re

        from har_edge.agent.signing import KEY_ID_PATTERN

        out = tuple(k.strip().lower() for k in v)
        bad = [k for k in out if not re.fullmatch(KEY_ID_PATTERN, k)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: a key id is 16 hex digits (`har-train keygen` prints it)")
        return out


class HttpSettings(_Section):
    """The agent's HTTP endpoints: /metrics (Prometheus), /healthz, /readyz (docs/observe.md)."""

    address: str = Field(
        "127.0.0.1:9464", description="host:port served by `har-edge agent run`; empty turns the endpoints off"
    )

    @field_validator("address")
    @classmethod
    def _host_port(cls, v: str) -> str:
        from har_edge.agent.http import parse_address  # one parser for the setting and the server

        parse_address(v.strip())
        return v.strip()


class FleetSettings(_Section):
    """``har-edge fleet status``: the central view of many devices (run against the central MLflow)."""

    silent_after_s: float = Field(
        3600.0, gt=0, description="a device whose newest heartbeat is older than this is reported silent (exit 1)"
    )
    recent_files: int = Field(10, ge=1, le=1000, description="monitor verdicts are counted over this many newest files")


class ParticipantSettings(_Section):
    """Who wore the watch: a study mapping, participant folders in the inbox, keyed pseudonyms (docs/privacy.md)."""

    mapping: Path | None = Field(
        None,
        description="the study's serial -> participant table: CSV (columns serial,participant) or TOML "
        '([serials] "3391234567" = "P01"); relative to data_dir',
    )
    folders: bool = Field(True, description="inbox/<participant>/<file> assigns that participant (one level)")
    secret_file: Path | None = Field(
        None,
        description="file holding the study's pseudonym secret; relative to data_dir; default "
        "<data_dir>/pseudonym.secret, generated (mode 0600) when neither it nor `secret` is given",
    )
    secret: SecretStr | None = Field(
        None, repr=False, description="the pseudonym secret itself (HAR_EDGE_PARTICIPANTS__SECRET); wins over the file"
    )
    share_serial: bool = Field(
        False, description="also send the raw watch serial to MLflow (tag har.watch_serial); off: only its pseudonym"
    )


class Settings(_Section):
    data_dir: Path = Field(Path("var"), description="holds inbox, archive, quarantine, outbox, models, logs")
    device_id: str = Field("", description="default: the host name")
    timezone: str = Field(
        "UTC",
        description="IANA time zone of the device's wearer (e.g. Europe/Berlin): local times on the MLflow pages "
        "of exports that state no UTC offset themselves",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = False
    # -- log file (har_edge.agent.logs): `agent run` and `sync run` also log to a rotated file -------------
    log_file: Path | None = Field(
        None,
        description="`agent run` and `sync run` also log to this file, rotated by size; relative to <data_dir>/logs; "
        "`{command}` in the name becomes agent or sync (without it, sync logs to <stem>-sync<suffix>)",
    )
    log_max_mb: float = Field(10.0, gt=0, description="rotate the log file when it reaches this size")
    log_backups: int = Field(5, ge=1, le=100, description="rotated log files kept (<name>.1 ... <name>.N)")
    agent: AgentSettings = AgentSettings()
    sync: SyncSettings = SyncSettings()
    http: HttpSettings = HttpSettings()
    monitor: MonitorSettings = MonitorSettings()
    fleet: FleetSettings = FleetSettings()
    participants: ParticipantSettings = ParticipantSettings()

    @model_validator(mode="after")
    def _custody_needs_archive(self) -> Settings:
        if self.sync.raw_store is not None and not self.agent.archive:
            raise ValueError(
                "sync.raw_store needs agent.archive = true: raw custody uploads the exports kept in archive/"
            )
        return self

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}: use an IANA name such as Europe/Berlin or UTC") from None
        return v

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

    def in_data_dir(self, path: Path) -> Path:
        """``path`` as a setting means it: absolute as given, else relative to the data folder."""
        return path if path.is_absolute() else self.data_dir / path


def _env_layer(env: Mapping[str, str]) -> dict[str, Any]:
    """Nested dict from HAR_EDGE_* variables (``__`` enters a section)."""
    out: dict[str, Any] = {}
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


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
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
    file_values: dict[str, Any] = {}
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
            key = ".".join(str(p) for p in e["loc"]) or "settings"
            msg = "unknown setting" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"  {key}: {msg}")
        raise ConfigError("invalid settings" + where + ":\n" + "\n".join(lines)) from None

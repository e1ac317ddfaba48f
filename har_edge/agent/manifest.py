"""The model folder contract between the trainer and the edge: the one owner of ``manifest.json``.

A model folder holds ``model.tflite``, ``manifest.json`` and ``golden.npz``
(a few raw windows with the outputs the exported model gave for them). The
manifest says everything the edge needs to feed the model and to prove that the
bytes it holds are the bytes that were released.

Versions. ``schema_version`` names the layout. :func:`read_manifest` reads every
older version: a raw document is lifted one version at a time by the functions
in :data:`UPGRADES` (``UPGRADES[n]`` turns version ``n`` into ``n + 1``) and then
validated as the current :class:`Manifest`. A newer version than this code knows
is refused with both versions named. Every field is added here, in this module,
with the upgrade that gives old manifests its value; nothing writes a manifest
field beside this owner. The schema is documented in ``docs/manifest.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from har_edge.agent.channels import STREAM
from har_edge.agent.errors import ChecksumMismatch, ManifestError
from har_edge.agent.monitor.reference import Reference
from har_edge.common.hashing import sha256_file

SCHEMA_VERSION = 2
MODEL_FILE = "model.tflite"
MANIFEST_FILE = "manifest.json"
GOLDEN_FILE = "golden.npz"

#: Channel order every har-edge model is fed in, with the units of the raw values: the agent's stream.
CHANNELS = STREAM


class Channel(BaseModel):
    """One input channel: a common spelling of its name and its unit (see ``har_edge.agent.channels``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    unit: str

    @model_validator(mode="after")
    def _known(self) -> Channel:
        from har_edge.agent.channels import canonical_unit

        try:
            canonical_unit(self.name, self.unit)
        except ManifestError as exc:
            raise ValueError(str(exc)) from None
        return self


class Measurement(BaseModel):
    """A gate figure with what it was measured on; ``value`` None: not measured (``on`` says why)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    value: float | None
    on: str


class Scaler(BaseModel):
    """StandardScaler parameters: ``scaled = (raw - mean) / scale`` per channel."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    mean: list[float]
    scale: list[float]

    @model_validator(mode="after")
    def _positive(self) -> Scaler:
        if len(self.mean) != len(self.scale):
            raise ValueError("scaler mean and scale differ in length")
        if any(not s > 0 for s in self.scale):
            raise ValueError("scaler scale must be > 0 for every channel")
        return self


class Golden(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    file: str = GOLDEN_FILE
    sha256: str
    count: int = Field(gt=0)
    #: largest allowed absolute difference of a probability (int8 runtimes may
    #: differ by a quantum or two between builds).
    atol: float = Field(default=0.02, ge=0, le=1)


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    labels: list[str] = Field(min_length=2)
    sample_rate_hz: float = Field(gt=0)
    window: int = Field(gt=0)
    step: int = Field(gt=0)
    channels: list[Channel]
    scaler: Scaler
    input_dtype: str = "int8"
    output_dtype: str = "int8"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    golden: Golden
    data_hash: str = ""
    mlflow_run_id: str = ""
    created: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    #: v2: every gate figure with what it was measured on (``har-train import`` writes it)
    measured: dict[str, Measurement] = Field(default_factory=dict)
    #: v2: unmeasured figures the operator accepted by name at release (``--accept-unmeasured``)
    accepted_unmeasured: list[str] = Field(default_factory=list)
    #: v2: where calibration and check windows came from (source, counts, warning)
    calibration: dict[str, Any] = Field(default_factory=dict)
    #: v2: float source files kept beside model.tflite (the original model, its unrolled rebuild)
    source_files: list[str] = Field(default_factory=list)
    #: v2: the training reference the edge monitors against (optional: older manifests have none)
    reference: Reference | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {self.schema_version} is not {SCHEMA_VERSION}: read it with read_manifest"
            )
        if len(self.channels) != len(self.scaler.mean):
            raise ValueError(f"scaler has {len(self.scaler.mean)} channels, channels lists {len(self.channels)}")
        if self.step > self.window:
            raise ValueError("step must not exceed window")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        from har_edge.agent.channels import ChannelMap

        try:
            ChannelMap.from_channels([(c.name, c.unit) for c in self.channels])
        except ManifestError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def channel_map(self) -> Any:
        """The :class:`har_edge.agent.channels.ChannelMap` from the agent's stream to this model's input."""
        from har_edge.agent.channels import ChannelMap

        return ChannelMap.from_channels([(c.name, c.unit) for c in self.channels])

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=2, sort_keys=True) + "\n"


#: ``UPGRADES[n](doc)`` lifts a version-``n`` document to version ``n + 1`` (pure: returns a new dict).
def _v1_to_v2(doc: dict[str, Any]) -> dict[str, Any]:
    """v2 adds measured, accepted_unmeasured, calibration, source_files and reference (empty for a v1 model)."""
    out = dict(doc)
    out.update(schema_version=2, measured={}, accepted_unmeasured=[], calibration={}, source_files=[])
    out.setdefault("reference", None)
    return out


UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2}


def upgrade(raw: Any, *, source: str = "manifest") -> Any:
    """``raw`` lifted to :data:`SCHEMA_VERSION`; a newer or unknown version raises ManifestError."""
    if not isinstance(raw, dict):
        return raw  # validation names the problem
    version = raw.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{source}: schema_version {version!r} is not a manifest version (1..{SCHEMA_VERSION})")
    if version > SCHEMA_VERSION:
        raise ManifestError(
            f"{source} has schema_version {version}; this har-edge reads versions 1 to {SCHEMA_VERSION}: "
            "upgrade har-edge"
        )
    doc = dict(raw)
    while doc["schema_version"] < SCHEMA_VERSION:
        step = UPGRADES[doc["schema_version"]]
        doc = step(doc)
    return doc


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(
            f"no {MANIFEST_FILE} in {folder}: a model folder needs model.tflite + manifest.json"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not readable JSON: {exc}") from None
    try:
        return Manifest.model_validate(upgrade(raw, source=str(path)))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in exc.errors())
        raise ManifestError(f"{path} is not a valid har-edge manifest: {problems}") from None


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` into ``folder`` (the one writer of the file)."""
    path = Path(folder) / MANIFEST_FILE
    path.write_text(manifest.to_json(), encoding="utf-8")
    return path


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Check that model.tflite and the golden file are the bytes the manifest names."""
    folder = Path(folder)
    for name, expected in ((MODEL_FILE, manifest.sha256), (manifest.golden.file, manifest.golden.sha256)):
        path = folder / name
        if not path.is_file():
            raise ChecksumMismatch(f"{path} is missing: the model folder is incomplete")
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumMismatch(
                f"{path} has sha256 {actual[:12]}…, the manifest says {expected[:12]}…: "
                "the file is corrupted or belongs to another model; fetch the release again"
            )

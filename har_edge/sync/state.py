"""What sync remembers about models, in ``models/sync-state.json`` (written atomically).

- ``refused``: versions that failed verification, validation or the health
  gate, with the release commit and model sha256 they had, so the same
  release is not fetched again; a re-release (the tag moved to another commit)
  is tried again, and ``har-edge models pin`` clears the entry.
- ``pin``: the version ``har-edge models pin`` fixed (overrides ``har_edge.sync.pin``).
- ``probation``: the version activated last, until the health gate passed it.
- ``installed``: release commit and sha256 of each folder under ``models/``.
- ``known``: manifests of every model this device ran (by model sha256), so
  a run's params (window, step, rate) are known after its folder was pruned.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from har_edge.agent.errors import ModelError
from har_edge.agent.manifest import Manifest, read_manifest
from har_edge.agent.model import BUNDLED_MODEL_DIR

log = logging.getLogger(__name__)

STATE_FILE = "sync-state.json"


class _Rec(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Refusal(_Rec):
    version: str
    commit: str = ""
    sha256: str = ""
    reason: str
    time_ms: int
    #: a refusal for its signature: the trusted/revoked keys it was judged under (other keys: judged again)
    trust: str = ""


class Probation(_Rec):
    folder: str
    version: str
    sha256: str
    since_ms: int
    previous_folder: str | None = None  # None: the bundled model
    previous_version: str | None = None
    previous_sha256: str | None = None


class Installed(_Rec):
    version: str
    commit: str = ""
    sha256: str
    time_ms: int


class KnownModel(_Rec):
    name: str
    version: str
    window: int
    step: int
    sample_rate_hz: float

    @classmethod
    def of(cls, m: Manifest) -> KnownModel:
        return cls(name=m.name, version=m.version, window=m.window, step=m.step, sample_rate_hz=m.sample_rate_hz)


class ModelState(_Rec):
    refused: dict[str, Refusal] = Field(default_factory=dict)
    pin: str | None = None
    probation: Probation | None = None
    installed: dict[str, Installed] = Field(default_factory=dict)
    known: dict[str, KnownModel] = Field(default_factory=dict)

    @classmethod
    def load(cls, models_dir: Path) -> ModelState:
        path = Path(models_dir) / STATE_FILE
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, ValidationError, ValueError) as exc:
            # losing it costs at most one re-fetch of a refused version: say so and go on
            log.error("%s is unreadable (%s): starting from an empty model state", path, exc)
            return cls()

    def save(self, models_dir: Path) -> None:
        models_dir = Path(models_dir)
        models_dir.mkdir(parents=True, exist_ok=True)
        path = models_dir / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def remember(self, m: Manifest) -> None:
        self.known[m.sha256] = KnownModel.of(m)


def known_models(models_dir: Path) -> dict[str, KnownModel]:
    """Every model manifest this device can still name, by model sha256 (state, folders, the bundled one)."""
    out = dict(ModelState.load(models_dir).known)
    folders = [BUNDLED_MODEL_DIR]
    if Path(models_dir).is_dir():
        folders += [p for p in Path(models_dir).iterdir() if p.is_dir() and not p.name.startswith(".")]
    for folder in folders:
        try:
            m = read_manifest(folder)
        except ModelError:
            continue
        out.setdefault(m.sha256, KnownModel.of(m))
    return out


def active_folder(models_dir: Path, explicit: Path | None = None) -> Path:
    """The folder the agent runs: ``har_edge.agent.model_dir``, else ``models/current``, else the bundled model."""
    from har_edge.agent.modelstore import choose_model

    return choose_model(models_dir, explicit).folder


def active_manifest(models_dir: Path, explicit: Path | None = None) -> Manifest | None:
    try:
        return read_manifest(active_folder(models_dir, explicit))
    except ModelError:
        return None

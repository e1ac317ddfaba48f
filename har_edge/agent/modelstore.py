"""Which model the agent runs: ``models/current`` -> ``models/<version>/``, or the bundled one.

The pointer is a symlink switched atomically (a new link renamed over the old
one), so a reader sees either the old or the new target, never half of one.
The agent looks at the pointer between files only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from har_edge.agent.errors import ModelError
from har_edge.agent.model import BUNDLED_MODEL_DIR, LoadedModel, load_model

log = logging.getLogger(__name__)

CURRENT = "current"
PREVIOUS = "previous"


def read_pointer(models_dir: Path, name: str = CURRENT) -> str | None:
    try:
        return os.readlink(Path(models_dir) / name)
    except (FileNotFoundError, OSError):
        return None


@dataclass(frozen=True)
class ModelChoice:
    """Which model folder the agent runs: the one rule, used by the agent, health, doctor and sync."""

    folder: Path
    #: ``agent.model_dir`` | ``models/current`` | ``bundled``
    source: str
    #: the version ``models/current`` names (None without a pointer, or when ``agent.model_dir`` decides)
    pointer: str | None


def choose_model(models_dir: Path, explicit: Path | None = None) -> ModelChoice:
    """``agent.model_dir`` when set, else ``models/current``, else the model bundled with har-edge."""
    if explicit is not None:
        return ModelChoice(Path(explicit), "agent.model_dir", None)
    pointer = read_pointer(models_dir)
    if pointer is not None:
        return ModelChoice(Path(models_dir) / pointer, "models/current", pointer)
    return ModelChoice(BUNDLED_MODEL_DIR, "bundled", None)


def folder_of(models_dir: Path, pointer: str | None) -> Path:
    """The folder a pointer value names: ``models/<version>``, or the bundled model for none."""
    return Path(models_dir) / pointer if pointer else BUNDLED_MODEL_DIR


def running_other_than_chosen(models_dir: Path, explicit: Path | None, running: LoadedModel) -> bool:
    """True when ``models/current`` names a version other than the one that loaded (it failed to load)."""
    choice = choose_model(models_dir, explicit)
    return choice.pointer is not None and running.folder.name != choice.pointer


def set_pointer(models_dir: Path, target: str | None, name: str = CURRENT) -> None:
    """Point ``models/<name>`` at ``models/<target>`` atomically (None removes the pointer)."""
    models_dir = Path(models_dir)
    link = models_dir / name
    if target is None:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        return
    if "/" in target or target in ("", ".", ".."):
        raise ValueError(f"model version {target!r} is not a folder name")
    tmp = models_dir / f".{name}.tmp.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(models_dir)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new link in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ActiveModel:
    """Holds the loaded model and reloads it when the pointer moved (call ``refresh`` between files)."""

    def __init__(
        self,
        models_dir: Path,
        *,
        explicit: Path | None = None,
        threads: int | str = 1,
        batch: int = 64,
        on_load_failure: Callable[[str | None, ModelError], None] | None = None,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.explicit = Path(explicit) if explicit else None
        self.threads, self.batch = threads, batch
        self.on_load_failure = on_load_failure
        self.model: LoadedModel | None = None
        self._pointer: str | None = "<unset>"
        self._failed: str | None = None  # the pointer value that last failed to load

    def _wanted(self) -> tuple[str | None, Path]:
        choice = choose_model(self.models_dir, self.explicit)
        return (str(self.explicit) if self.explicit is not None else choice.pointer), choice.folder

    def refresh(self) -> LoadedModel:
        pointer, folder = self._wanted()
        if self.model is not None and pointer == self._pointer:
            self._failed = None  # back on the loaded model: a failed version may be tried again later
            return self.model
        if pointer == self._failed and self.model is not None:
            return self.model  # tried once; tried again when the pointer moves
        try:
            model = load_model(folder, threads=self.threads, batch=self.batch)
        except ModelError as exc:
            self._failed = pointer
            log.error("cannot load model %s: %s", folder, exc)
            if self.on_load_failure is not None:
                self.on_load_failure(pointer, exc)
            if self.model is not None:
                log.warning("keeping %s", self.model.label)
                return self.model
            if folder != BUNDLED_MODEL_DIR and self.explicit is None:
                log.warning("falling back to the bundled model")
                self.model = load_model(BUNDLED_MODEL_DIR, threads=self.threads, batch=self.batch)
                self._pointer = pointer
                return self.model
            raise
        if self.model is not None:
            log.info("model switched: %s -> %s", self.model.label, model.label)
        else:
            log.info("model %s loaded from %s (%s)", model.label, folder, model.runner.runtime)
        self.model, self._pointer = model, pointer
        self._failed = None
        return model

"""The stack's generated passwords: one file each under ``<root>/secrets/``, mode 0600, never logged."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRETS_DIR = "secrets"


def secret(root: Path, name: str, nbytes: int = 24) -> str:
    """The secret ``name`` of the stack at ``root``, generated (URL-safe) the first time it is asked for."""
    folder = Path(root) / SECRETS_DIR
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / name
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    value = secrets.token_urlsafe(nbytes)
    write_secret(path, value)
    return value


def write_secret(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` readable by its owner only (created so, never widened afterwards)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    os.replace(tmp, path)

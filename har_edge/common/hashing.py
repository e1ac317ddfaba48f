"""sha256 of files: the one implementation behind model checksums, export identity and data hashes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_BLOCK = 1 << 20


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes."""
    return file_digest(path, "sha256")


def file_digest(path: Path | str, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (``md5`` serves DVC's own checksums), read a megabyte at a time."""
    h = hashlib.new(algorithm)
    view = memoryview(bytearray(_BLOCK))
    with open(path, "rb", buffering=0) as f:
        while got := f.readinto(view):
            h.update(view[:got])
    return h.hexdigest()


def export_sha256(paths: Iterable[Path]) -> str:
    """Identity of an export: a file's sha256; of a group (a table pair), sha256 over the sorted member hashes."""
    hashes = [sha256_file(p) for p in paths]
    if len(hashes) == 1:
        return hashes[0]
    return hashlib.sha256("".join(sorted(hashes)).encode()).hexdigest()


def manifest_of_files(folder: Path, names: Iterable[str]) -> str:
    """sha256 over ``"<name> <sha256>\\n"`` lines of the named files in ``folder``, in the given order."""
    h = hashlib.sha256()
    for name in names:
        h.update(f"{name} {sha256_file(Path(folder) / name)}\n".encode())
    return h.hexdigest()

"""The release tag format, shared by ``har-train release`` (writer) and sync (reader).

A release of model ``<name>`` version ``<version>`` is the git tag ``<name>@v<version>``
(e.g. ``har-cnn@v1.0.0``) on a commit whose ``models/<name>/`` folder holds the model.
"""

from __future__ import annotations

import re

#: what a model name and a version may contain (the manifest validates the same patterns)
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
VERSION_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+-]*"
_TAG = re.compile(rf"({NAME_PATTERN})@v({VERSION_PATTERN})")


def tag_name(name: str, version: str) -> str:
    return f"{name}@v{version}"


def tag_prefix(name: str) -> str:
    """The ref prefix under which every release of ``name`` is found: ``refs/tags/<name>@v``."""
    return f"refs/tags/{name}@v"


def parse_tag(tag: str) -> tuple[str, str] | None:
    """``(name, version)`` of a release tag, None for other tags."""
    m = _TAG.fullmatch(tag)
    return (m.group(1), m.group(2)) if m else None


def model_path(name: str) -> str:
    """Where a release keeps the model folder inside the registry repository."""
    return f"models/{name}"

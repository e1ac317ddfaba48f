"""Keyed pseudonyms of watch serials: HMAC-SHA256 under the study's secret, which is never logged.

The secret comes from ``participants.secret`` (``HAR_EDGE_PARTICIPANTS__SECRET``), else the file
``participants.secret_file``, else ``<data_dir>/pseudonym.secret``, which is generated (32 random
bytes, hex, mode 0600) the first time it is needed. One secret gives every serial the same pseudonym
on every run; another secret gives unrelated ones, so two studies cannot join their data by pseudonym.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from har_edge.agent.errors import ConfigError
from har_edge.agent.settings import Settings

log = logging.getLogger(__name__)

#: the generated secret's file in the data dir (when no secret is configured)
SECRET_NAME = "pseudonym.secret"
MIN_SECRET_BYTES = 16
#: hex digits of the HMAC kept in a pseudonym (64 bits: no collision among a study's watches)
DIGITS = 16


def secret_path(settings: Settings) -> Path:
    p = settings.participants.secret_file
    if p is None:
        return settings.data_dir / SECRET_NAME
    return settings.in_data_dir(p)


def _generate(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_bytes().strip()
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    log.warning(
        "no pseudonym secret configured: generated one in %s (mode 0600); keep a copy with the study's records, "
        "pseudonyms change if it is lost (docs/privacy.md)",
        path,
    )
    return value.encode()


def load_secret(settings: Settings) -> bytes:
    """The study's secret (generated in the data dir when none is configured); ConfigError if too short."""
    p = settings.participants
    where: str
    if p.secret is not None:
        raw, where = p.secret.get_secret_value().encode(), "participants.secret"
    else:
        path = secret_path(settings)
        where = str(path)
        try:
            raw = path.read_bytes().strip()
        except FileNotFoundError:
            if p.secret_file is not None:
                raise ConfigError(
                    f"participants.secret_file {path} does not exist: create it with the study's secret "
                    "(e.g. `openssl rand -hex 32 > FILE; chmod 600 FILE`) or unset it to have one generated"
                ) from None
            raw = _generate(path)
        except OSError as exc:
            raise ConfigError(f"pseudonym secret {path} cannot be read ({exc.strerror}): fix its permissions") from None
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the pseudonym secret in {where} has {len(raw)} bytes, fewer than {MIN_SECRET_BYTES}: use a longer one "
            "(e.g. `openssl rand -hex 32`)"
        )
    return raw


def _mac(secret: bytes, purpose: str, serial: str) -> str:
    return hmac.new(secret, f"har-edge {purpose}\0{serial}".encode(), hashlib.sha256).hexdigest()[:DIGITS]


def watch_pseudonym(secret: bytes, serial: str) -> str:
    """``w-`` and 16 hex digits: the watch as it is named outside the device."""
    return "w-" + _mac(secret, "watch", serial)


def participant_pseudonym(secret: bytes, serial: str) -> str:
    """``p-`` and 16 hex digits: the participant id of a watch the study did not map."""
    return "p-" + _mac(secret, "participant", serial)

"""Which participant an export belongs to: its inbox folder, the study's mapping of serials, else a pseudonym.

Precedence: ``inbox/<participant>/…`` (``participants.folders``), then the study's mapping
(``participants.mapping``: CSV ``serial,participant`` or TOML ``[serials] "<serial>" = "<id>"``,
re-read when the file changes), then ``p-<hmac>`` of the watch serial
(:mod:`har_edge.agent.pseudonym`). An export without a known watch, folder or mapping has none.
Participant ids are 1-64 letters, digits, ``.``, ``_`` or ``-``, not starting with ``.`` or ``-``
(they name folders and MLflow tags).
"""

from __future__ import annotations

import csv
import logging
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from har_edge.agent.errors import ConfigError
from har_edge.agent.pseudonym import load_secret, participant_pseudonym, watch_pseudonym
from har_edge.agent.settings import Settings
from har_edge.agent.watch import Watch

log = logging.getLogger(__name__)

PARTICIPANT_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
_SERIAL_COLUMNS = ("serial", "serial_number", "watch_serial")
_PARTICIPANT_COLUMNS = ("participant", "participant_id", "subject", "subject_id")


def valid_participant_id(value: str) -> bool:
    return bool(PARTICIPANT_ID.match(value))


@dataclass(frozen=True)
class Assignment:
    """An export's participant (None: unknown), where it came from, and its watch's pseudonym."""

    participant: str | None = None
    #: folder | mapping | pseudonym (None when there is no participant)
    source: str | None = None
    watch_pseudonym: str | None = None


def _read_csv(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    header = [h.strip().lower() for h in rows[0]]
    s_col = next((header.index(c) for c in _SERIAL_COLUMNS if c in header), None)
    p_col = next((header.index(c) for c in _PARTICIPANT_COLUMNS if c in header), None)
    if s_col is None or p_col is None:
        raise ConfigError(
            f"participants.mapping {path}: the header {rows[0]!r} needs a serial column "
            f"({', '.join(_SERIAL_COLUMNS)}) and a participant column ({', '.join(_PARTICIPANT_COLUMNS)})"
        )
    out: dict[str, str] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        cells = row + [""] * (max(s_col, p_col) + 1 - len(row))
        out[_check(path, f"row {n}", cells[s_col], cells[p_col], out)] = cells[p_col].strip()
    return out


def _read_toml(path: Path) -> dict[str, str]:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"participants.mapping {path} is not valid TOML: {exc}") from None
    table = doc.get("serials", doc)
    if not isinstance(table, dict):
        raise ConfigError(f'participants.mapping {path}: [serials] must be a table of "serial" = "participant"')
    out: dict[str, str] = {}
    for serial, participant in table.items():
        if not isinstance(participant, (str, int)) or isinstance(participant, bool):
            raise ConfigError(f"participants.mapping {path}: {serial} = {participant!r} is not a participant id")
        out[_check(path, f"key {serial}", str(serial), str(participant), out)] = str(participant).strip()
    return out


def _check(path: Path, where: str, serial: str, participant: str, seen: dict[str, str]) -> str:
    serial, participant = serial.strip(), participant.strip()
    if not serial:
        raise ConfigError(f"participants.mapping {path}: {where} has no serial")
    if not valid_participant_id(participant):
        raise ConfigError(
            f"participants.mapping {path}: {where}: participant id {participant!r} must be 1-64 letters, digits, "
            "'.', '_' or '-' (not starting with '.' or '-')"
        )
    if serial in seen and seen[serial] != participant:
        raise ConfigError(f"participants.mapping {path}: {where}: the serial is mapped twice, to two participants")
    return serial


def read_mapping(path: Path) -> dict[str, str]:
    """serial -> participant id of a study mapping (CSV, or TOML by its .toml suffix); ConfigError names the row."""
    try:
        return _read_toml(path) if path.suffix.lower() == ".toml" else _read_csv(path)
    except FileNotFoundError:
        raise ConfigError(f"participants.mapping {path} does not exist: give the study's mapping or unset it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"participants.mapping {path} cannot be read: {exc}") from None


class Identities:
    """Assigns participants and watch pseudonyms for one data dir's settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.p = settings.participants
        self._secret: bytes | None = None
        self._mapping: dict[str, str] = {}
        self._mapping_key: tuple[int, int] | None = None

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            self._secret = load_secret(self.settings)
        return self._secret

    def mapping_path(self) -> Path | None:
        m = self.p.mapping
        if m is None:
            return None
        return self.settings.in_data_dir(m)

    def mapping(self) -> dict[str, str]:
        """The study's mapping, re-read when its file changed."""
        path = self.mapping_path()
        if path is None:
            return {}
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ConfigError(
                f"participants.mapping {path} does not exist: give the study's mapping or unset it"
            ) from None
        key = (st.st_mtime_ns, st.st_size)
        if key != self._mapping_key:
            try:
                self._mapping = read_mapping(path)
            except ConfigError as exc:
                if self._mapping_key is None:
                    raise
                log.error("%s; the mapping read before is used until the file is fixed", exc)
                return self._mapping
            self._mapping_key = key
            log.info("participants: read %d serial(s) from the study mapping %s", len(self._mapping), path)
        return self._mapping

    def check(self) -> None:
        """Read the secret and the mapping now: a ConfigError at start instead of at the first file."""
        _ = self.secret
        self.mapping()

    def assign(self, watch: Watch | None, folder: str | None = None) -> Assignment:
        serial = watch.serial if watch is not None else None
        pseudo = watch_pseudonym(self.secret, serial) if serial else None
        if folder and self.p.folders and valid_participant_id(folder):
            return Assignment(folder, "folder", pseudo)
        if serial:
            mapped = self.mapping().get(serial)
            if mapped is not None:
                return Assignment(mapped, "mapping", pseudo)
            return Assignment(participant_pseudonym(self.secret, serial), "pseudonym", pseudo)
        return Assignment(None, None, None)

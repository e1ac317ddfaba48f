"""Which releases a device trusts: signatures under ``sync.trusted_keys``, revocation, no substitution, no downgrade.

With keys configured, a fetched folder must carry a ``manifest.sig`` made by one
of them (its key id not in ``sync.revoked_keys``), over exactly the files it holds,
naming the release tag's model and version; anything else is refused before
the model is loaded. Without keys, every release is accepted and each is named
in a warning, once. The revocation list is only ever read from the device's
settings: whoever can write to the registry could delete a list kept there.

Independently of keys, an automatic pull never installs a lower version of the
followed model than the active one; a person does that with ``models pin`` or
``models rollback``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from har_edge.agent.errors import ConfigError, SignatureError
from har_edge.agent.manifest import Manifest
from har_edge.agent.settings import Settings
from har_edge.agent.signing import (
    SIGNATURE_FILE,
    check_files,
    check_signature,
    is_inline_key,
    key_id,
    parse_public_key,
    read_signature,
)
from har_edge.common.versions import parse_version
from har_edge.sync.errors import ModelRefused

log = logging.getLogger(__name__)

#: signature states ``models verify`` shows
TRUSTED = "trusted"  # signed by a trusted key, files and release as signed
UNSIGNED = "unsigned"  # no manifest.sig
UNCHECKED = "unchecked"  # signed, but the device has no trusted keys to check it with
UNTRUSTED = "untrusted"  # signed by a key the device does not hold
REVOKED = "revoked"  # signed by a key id in sync.revoked_keys
INVALID = "invalid"  # a signature that does not verify, or files / release that differ from the signed ones
BUNDLED = "bundled"  # the model shipped inside har-edge (not a release: nothing to check)


@dataclass(frozen=True)
class Verdict:
    state: str
    key_id: str | None
    detail: str
    #: the signed model name and version (a signature that verified), else None
    signed: tuple[str, str] | None = None

    def describe(self) -> str:
        key = f" (key {self.key_id})" if self.key_id else ""
        return f"{self.state}{key}: {self.detail}" if self.detail else f"{self.state}{key}"


class TrustStore:
    """The device's trusted public keys (by key id) and revoked key ids."""

    def __init__(self, keys: dict[str, Ed25519PublicKey], revoked: frozenset[str]) -> None:
        self.keys = keys
        self.revoked = revoked
        self._warned: set[str] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> TrustStore:
        """Keys from ``sync.trusted_keys`` (relative files under the data folder); ConfigError names a bad entry."""
        keys: dict[str, Ed25519PublicKey] = {}
        for entry in settings.sync.trusted_keys:
            if is_inline_key(entry):
                key = parse_public_key(entry, source="sync.trusted_keys (inline key)")
            else:
                path = settings.in_data_dir(Path(entry).expanduser())
                try:
                    text = path.read_bytes()
                except OSError as exc:
                    raise ConfigError(
                        f"sync.trusted_keys: {path} cannot be read ({exc.strerror}): copy the .pub file "
                        "`har-train keygen` wrote there, or give the key inline"
                    ) from None
                key = parse_public_key(text, source=f"sync.trusted_keys: {path}")
            keys[key_id(key)] = key
        store = cls(keys, frozenset(settings.sync.revoked_keys))
        if keys:
            active = sorted(set(keys) - store.revoked)
            log.debug("trusted release keys: %s; revoked: %s", ", ".join(active) or "none", sorted(store.revoked))
            if not active:
                log.warning("every key in sync.trusted_keys is revoked: no release can be accepted")
        return store

    @property
    def fingerprint(self) -> str:
        """Short digest of the trusted and revoked key ids: a refusal for a signature is retried when it changes."""
        text = ",".join(sorted(self.keys)) + ";" + ",".join(sorted(self.revoked))
        return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]

    @property
    def enforced(self) -> bool:
        """True when releases must be signed (at least one trusted key configured)."""
        return bool(self.keys)

    def examine(self, folder: Path, release: tuple[str, str] | None = None) -> Verdict:
        """The signature state of a folder (as release ``(name, version)`` when given); never raises."""
        try:
            sig = read_signature(folder)
        except SignatureError as exc:
            return Verdict(INVALID, None, str(exc))
        if sig is None:
            return Verdict(UNSIGNED, None, f"no {SIGNATURE_FILE}")
        if sig.key_id in self.revoked:
            return Verdict(REVOKED, sig.key_id, f"key {sig.key_id} is in sync.revoked_keys")
        key = self.keys.get(sig.key_id)
        if key is None:
            if not self.enforced:
                return Verdict(UNCHECKED, sig.key_id, "no sync.trusted_keys to check it with")
            return Verdict(UNTRUSTED, sig.key_id, f"key {sig.key_id} is not in sync.trusted_keys")
        try:
            check_signature(sig, key)
        except SignatureError as exc:
            return Verdict(INVALID, sig.key_id, str(exc))
        signed = (sig.name, sig.version)
        if release is not None and signed != release:
            return Verdict(
                INVALID,
                sig.key_id,
                f"signed as {sig.name} {sig.version}, released as {release[0]} {release[1]}: "
                "a signed model under another tag is refused",
                signed,
            )
        try:
            check_files(sig, folder)
        except SignatureError as exc:
            return Verdict(INVALID, sig.key_id, str(exc), signed)
        return Verdict(TRUSTED, sig.key_id, f"signed as {sig.name} {sig.version}", signed)

    def check(self, folder: Path, release: tuple[str, str] | None, what: str | None) -> Verdict:
        """The verdict, or SignatureError when keys are configured and it is not trusted.

        Without keys an unchecked release is accepted with a warning naming ``what``, once per ``what``
        (None: no warning, for a folder already installed).
        """
        v = self.examine(folder, release)
        if v.state == TRUSTED:
            return v
        if v.state == REVOKED or self.enforced:
            raise SignatureError(f"signature {v.describe()}: refusing it (sync.trusted_keys is set)")
        if what is not None and what not in self._warned:
            self._warned.add(what)
            log.warning(
                "%s is accepted without a checked signature (%s): set sync.trusted_keys so that only signed "
                "releases are installed",
                what,
                v.describe(),
            )
        return v


def check_manifest(verdict: Verdict, manifest: Manifest) -> None:
    """A verified signature must name the manifest's model and version (one is the signed manifest.json)."""
    if verdict.signed is not None and verdict.signed != (manifest.name, manifest.version):
        raise SignatureError(
            f"signed as {verdict.signed[0]} {verdict.signed[1]}, the manifest says {manifest.name} "
            f"{manifest.version}: re-release it"
        )


def check_not_downgrade(new: Manifest, active: Manifest | None) -> None:
    """ModelRefused when ``new`` is a lower version of the active model (a pin or a rollback may do that)."""
    if active is None or active.name != new.name:
        return
    new_key, active_key = parse_version(new.version), parse_version(active.version)
    if new_key is not None and active_key is not None and new_key < active_key:
        raise ModelRefused(
            f"{new.name} {new.version} is older than the active {active.version}: a pull never downgrades; "
            f"run `har-edge models pin {new.version}` (or `models rollback`) to go back on purpose"
        )

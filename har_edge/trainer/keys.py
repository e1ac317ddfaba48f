"""Release signing keys: ``har-train keygen`` makes a pair; a release finds the private key in a file or a variable.

The private key is an unencrypted PKCS#8 PEM written with mode 0600, never inside
a git working tree (where a ``git add -A`` would commit it). It reaches a release
as a file (``--signing-key`` / ``release.signing_key``) or as the value of
``HAR_TRAIN_SIGNING_KEY`` (the PEM itself or base64 of its 32-byte seed: a CI
secret). Nothing here logs or prints any of its bytes; messages name the file
or the variable. The public key goes beside it as ``<name>.pub`` (one line of
base64: copy it to the devices' ``sync.trusted_keys``).
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from har_edge.agent.manifest import Manifest
from har_edge.agent.signing import key_id, parse_private_key, public_text, sign_folder, write_private_key
from har_edge.trainer.errors import ReleaseError

log = logging.getLogger(__name__)

ENV_KEY = "HAR_TRAIN_SIGNING_KEY"


@dataclass(frozen=True)
class KeyPair:
    key_id: str
    private_path: Path
    public_path: Path
    public: str  # base64 of the raw public key


def _git_tree(path: Path) -> Path | None:
    """The git working tree holding ``path``, if any."""
    for parent in [path, *path.parents]:
        if (parent / ".git").exists():
            return parent
    return None


def keygen(private_path: Path) -> KeyPair:
    """A new ed25519 pair: ``private_path`` (0600) and ``private_path`` + ``.pub``; never overwrites either."""
    private_path = Path(private_path).expanduser().absolute()
    public_path = private_path.with_name(private_path.name + ".pub")
    for p in (private_path, public_path):
        if p.exists():
            raise ReleaseError(f"{p} exists: a key is never overwritten; choose another name (or delete it knowingly)")
    tree = _git_tree(private_path.parent)
    if tree is not None:
        raise ReleaseError(
            f"{private_path} is inside the git working tree {tree}: keep the private key outside any repository "
            "(e.g. ~/.config/har-train/release.key) so that it is never committed"
        )
    private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = Ed25519PrivateKey.generate()
    write_private_key(private_path, private)
    public = public_text(private.public_key())
    public_path.write_text(public + "\n", encoding="ascii")
    kid = key_id(private.public_key())
    log.info("made signing key %s: private %s, public %s", kid, private_path, public_path)
    return KeyPair(kid, private_path, public_path, public)


def load_signing_key(
    path: str | Path | None, env: Mapping[str, str], *, registry: str | Path | None = None
) -> Ed25519PrivateKey | None:
    """The private key from ``path`` (when given), else from ``HAR_TRAIN_SIGNING_KEY``; None when neither is set."""
    if path:
        p = Path(path).expanduser().absolute()
        if registry:
            repo = Path(registry).expanduser().absolute()
            if p == repo or repo in p.parents:
                raise ReleaseError(f"signing key {p} lies inside the registry {repo}: move it out of the repository")
        try:
            data = p.read_bytes()
            mode = p.stat().st_mode
        except OSError as exc:
            raise ReleaseError(f"signing key {p} cannot be read ({exc.strerror}): check --signing-key") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("signing key %s is readable by others (mode %o): chmod 600 it", p, stat.S_IMODE(mode))
        return parse_private_key(data, source=f"signing key {p}")
    value = env.get(ENV_KEY, "")
    if value.strip():
        return parse_private_key(value, source=f"${ENV_KEY}")
    return None


def sign_release(folder: Path, manifest: Manifest, key: Ed25519PrivateKey | None) -> str | None:
    """Write ``manifest.sig`` into the release copy ``folder``; the key id, or None (unsigned, with a warning)."""
    if key is None:
        log.warning(
            "releasing %s %s unsigned: devices with sync.trusted_keys refuse it; make a key with `har-train keygen` "
            "and pass --signing-key (or set %s)",
            manifest.name,
            manifest.version,
            ENV_KEY,
        )
        return None
    sig = sign_folder(folder, key, name=manifest.name, version=manifest.version)
    log.info("signed %s %s with key %s (%d files)", manifest.name, manifest.version, sig.key_id, len(sig.files))
    return sig.key_id

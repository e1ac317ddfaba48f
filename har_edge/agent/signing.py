"""Signed model releases: the signed payload, its canonical bytes, ed25519 keys and key ids.

One definition, used by ``har-train release`` (the signer) and by sync (the verifier).

The payload names the release and every file of the model folder::

    {"files": {"golden.npz": "<sha256>", "manifest.json": "<sha256>", "model.tflite": "<sha256>", ...},
     "format": "har-edge-release/1", "name": "har-cnn", "version": "1.2.0"}

``manifest.json`` is one of the files, so every field of the manifest (labels, scaler,
windows, the sha256 of the other files) is covered: a manifest edited in any way
no longer matches. Its canonical bytes are the JSON with sorted keys, no spaces and
ASCII only (:func:`canonical`). The signature is ed25519 over those bytes.

``manifest.sig`` beside ``manifest.json`` holds the payload, the signature (base64)
and the key id: the first 16 hex digits of the sha256 of the raw 32-byte public key.
The key id only says which key to try; a verifier checks with the key it trusts
under that id, never with anything the folder brings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # cryptography (7 MB resident) is imported only where keys are read or signatures checked
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from har_edge.agent.errors import ConfigError, SignatureError
from har_edge.common.hashing import sha256_file

SIGNATURE_FILE = "manifest.sig"
PAYLOAD_FORMAT = "har-edge-release/1"
ALGORITHM = "ed25519"
KEY_ID_PATTERN = r"[0-9a-f]{16}"
_KEY_ID = re.compile(KEY_ID_PATTERN)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_INLINE_RAW = re.compile(r"[A-Za-z0-9+/]{43}=")  # base64 of 32 bytes
_PEM_PUBLIC = "-----BEGIN PUBLIC KEY-----"
_PEM_PRIVATE = "-----BEGIN PRIVATE KEY-----"


# -- the payload ---------------------------------------------------------------------------


def canonical(payload: dict[str, Any]) -> bytes:
    """The bytes that are signed: JSON with sorted keys, no whitespace, ASCII only."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def folder_files(folder: Path) -> dict[str, str]:
    """sha256 of every file of a model folder (paths relative to it, ``/``-separated), ``manifest.sig`` aside."""
    folder = Path(folder)
    out: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel == SIGNATURE_FILE or path.is_dir():
            continue
        out[rel] = sha256_file(path)
    return out


def make_payload(name: str, version: str, files: dict[str, str]) -> dict[str, Any]:
    return {"format": PAYLOAD_FORMAT, "name": name, "version": version, "files": dict(sorted(files.items()))}


# -- keys ------------------------------------------------------------------------------------


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw public key."""
    return hashlib.sha256(raw_public(public)).hexdigest()[:16]


def raw_public(public: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_text(public: Ed25519PublicKey) -> str:
    """The public key as one line of base64 (the inline form ``sync.trusted_keys`` takes)."""
    return base64.b64encode(raw_public(public)).decode("ascii")


def public_pem(public: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_pem(private: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def is_inline_key(text: str) -> bool:
    """True for a key written out in a setting (PEM, or base64 of 32 bytes), False for a file path."""
    text = text.strip()
    return text.startswith("-----BEGIN") or _INLINE_RAW.fullmatch(text) is not None


def parse_public_key(text: str | bytes, *, source: str = "public key") -> Ed25519PublicKey:
    """An ed25519 public key from PEM (SubjectPublicKeyInfo) or base64 of its 32 raw bytes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    data = data.strip()
    try:
        if data.startswith(_PEM_PUBLIC.encode()):
            key = serialization.load_pem_public_key(data)
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(
                    f"{source}: a {type(key).__name__}, not an ed25519 key: make one with `har-train keygen`"
                )
            return key
        raw = base64.b64decode(data, validate=True)
        if len(raw) != 32:
            raise ValueError(f"{len(raw)} bytes, an ed25519 public key has 32")
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ConfigError(
            f"{source} is not an ed25519 public key (PEM, or base64 of 32 bytes as `har-train keygen` "
            f"writes it in the .pub file): {exc}"
        ) from None


def parse_private_key(data: str | bytes, *, source: str) -> Ed25519PrivateKey:
    """An ed25519 private key from unencrypted PKCS#8 PEM or base64 of its 32-byte seed.

    Errors name ``source`` (a file or a variable), never any of the key's bytes.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    raw = data.encode("ascii", "replace") if isinstance(data, str) else bytes(data)
    raw = raw.strip()
    try:
        if raw.startswith(_PEM_PRIVATE.encode()):
            key = serialization.load_pem_private_key(raw, password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigError(f"{source} holds a {type(key).__name__}, not an ed25519 key")
            return key
        seed = base64.b64decode(raw, validate=True)
        if len(seed) != 32:
            raise ValueError("not 32 bytes")
        return Ed25519PrivateKey.from_private_bytes(seed)
    except (ValueError, TypeError, binascii.Error):
        raise ConfigError(
            f"{source} is not an unencrypted ed25519 private key (PKCS#8 PEM as `har-train keygen` writes it, "
            "or base64 of the 32-byte seed)"
        ) from None


def write_private_key(path: Path, private: Ed25519PrivateKey) -> None:
    """Write the PEM with mode 0600 from the start (never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem(private))


# -- signing and reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """What ``manifest.sig`` holds (not yet checked against any key)."""

    key_id: str
    payload: dict[str, Any]
    signature: bytes

    @property
    def name(self) -> str:
        return str(self.payload["name"])

    @property
    def version(self) -> str:
        return str(self.payload["version"])

    @property
    def files(self) -> dict[str, str]:
        return dict(self.payload["files"])

    def to_json(self) -> str:
        doc = {
            "algorithm": ALGORITHM,
            "key_id": self.key_id,
            "payload": self.payload,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def sign_folder(folder: Path, private: Ed25519PrivateKey, *, name: str, version: str) -> Signature:
    """Sign every file of ``folder`` as release ``name`` ``version``; write ``manifest.sig`` into it."""
    payload = make_payload(name, version, folder_files(folder))
    sig = Signature(key_id(private.public_key()), payload, private.sign(canonical(payload)))
    (Path(folder) / SIGNATURE_FILE).write_text(sig.to_json(), encoding="utf-8")
    return sig


def read_signature(folder: Path) -> Signature | None:
    """``manifest.sig`` of a folder; None when it has none; SignatureError when it is not one."""
    path = Path(folder) / SIGNATURE_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SignatureError(f"{SIGNATURE_FILE} is not readable JSON ({exc}): the release is damaged") from None
    problem = _shape_problem(doc)
    if problem:
        raise SignatureError(f"{SIGNATURE_FILE} is not a har-edge signature: {problem}")
    return Signature(doc["key_id"], doc["payload"], base64.b64decode(doc["signature"]))


def _shape_problem(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "not a JSON object"
    if doc.get("algorithm") != ALGORITHM:
        return f"algorithm {doc.get('algorithm')!r}, this har-edge checks {ALGORITHM}"
    if not isinstance(doc.get("key_id"), str) or not _KEY_ID.fullmatch(doc["key_id"]):
        return "key_id is not 16 hex digits"
    try:
        raw = base64.b64decode(str(doc.get("signature", "")), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 64:
        return "signature is not base64 of 64 bytes"
    p = doc.get("payload")
    if not isinstance(p, dict) or p.get("format") != PAYLOAD_FORMAT:
        return f"payload format is not {PAYLOAD_FORMAT}"
    if set(p) != {"format", "name", "version", "files"}:
        return f"payload fields are {sorted(p)}"
    if not isinstance(p["name"], str) or not isinstance(p["version"], str):
        return "payload name and version must be strings"
    files = p["files"]
    if not isinstance(files, dict) or not files:
        return "payload lists no files"
    if not all(isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v) for k, v in files.items()):
        return "payload files must map names to sha256 hex"
    return ""


def check_signature(sig: Signature, public: Ed25519PublicKey) -> None:
    """SignatureError unless ``sig`` is ``public``'s signature over its payload."""
    from cryptography.exceptions import InvalidSignature

    try:
        public.verify(sig.signature, canonical(sig.payload))
    except InvalidSignature:
        raise SignatureError(
            f"the signature does not match its payload under key {sig.key_id}: "
            f"{SIGNATURE_FILE} was altered or made by another key"
        ) from None


def check_files(sig: Signature, folder: Path) -> None:
    """SignatureError unless ``folder`` holds exactly the signed files with the signed bytes."""
    actual = folder_files(folder)
    signed = sig.files
    problems = []
    for name in sorted(set(signed) | set(actual)):
        if name not in actual:
            problems.append(f"{name} is signed but missing")
        elif name not in signed:
            problems.append(f"{name} is not covered by the signature")
        elif actual[name] != signed[name]:
            problems.append(f"{name} has sha256 {actual[name][:12]}…, the signed one {signed[name][:12]}…")
    if problems:
        raise SignatureError("files differ from the signed release (tampered?): " + "; ".join(problems))

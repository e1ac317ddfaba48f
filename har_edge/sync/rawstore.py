"""Where raw custody puts archived exports: the store interface, its folder form, and the object layout.

Content-addressed by the file's sha256, the same layout in every store::

    <store>/har-edge/raw/sha256/<first two hex digits>/<sha256>

An S3 object carries metadata ``sha256``, ``name`` (URL-quoted) and ``device``; in a folder a sidecar
``<sha256>.json`` holds the same. Two devices (or two names) with the same bytes share one object.

A store's :meth:`RawStore.upload` is resumable: it reports its progress through the ``save`` callback
(the caller stores it in the outbox), takes that state back on the next call, and returns ``None`` when
the pass expired first. It returns what it verified once the object is complete and the
store's own checksums matched the file's, and raises :class:`CustodyMismatch` when they did not.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from har_edge.agent.modelstore import fsync_dir
from har_edge.agent.settings import Settings
from har_edge.common.hashing import sha256_file
from har_edge.sync.errors import CustodyMismatch, ServerAccessDenied

log = logging.getLogger(__name__)

LAYOUT = "har-edge/raw/sha256"
CHUNK = 1 << 20


def object_key(sha256: str) -> str:
    return f"{LAYOUT}/{sha256[:2]}/{sha256}"


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


@dataclass
class Item:
    """One archived file on its way into the store, with the upload state the outbox keeps for it."""

    path: Path  # the file in archive/
    rel: str  # its path relative to archive/ (its name in the outbox)
    size: int
    sha256: str  # hex, computed when the file was found
    device: str
    key: str = ""
    upload_id: str | None = None  # S3 multipart upload under way
    part_size: int | None = None
    #: parts the store acknowledged: [number, etag, sha256 of the part (base64)]
    parts: list[list[object]] = field(default_factory=list)
    bytes_done: int = 0
    #: bytes actually sent by this call (a resume sends only what is missing)
    sent: int = 0
    parts_sent: int = 0


SaveFn = Callable[[Item], None]
#: True once the pass must stop starting requests (its time is up, or the daemon is stopping)
Expired = Callable[[], bool]


class RawStore(Protocol):
    url: str

    @property
    def display(self) -> str: ...

    def present(self, item: Item) -> str | None:
        """What verified an object already in the store for this content; None when it is absent or differs."""
        ...

    def upload(self, item: Item, expired: Expired, save: SaveFn) -> str | None:
        """Send the rest of ``item``; the verification on completion, or None once ``expired()`` (progress saved)."""
        ...

    def discard(self, item: Item) -> None:
        """Drop a partial upload (after a mismatch, or when the file is gone); never raises."""
        ...

    def erase(self, sha256: str) -> bool:
        """Delete the stored export with this content (an erasure request); False when it was not there."""
        ...


def read_parts(path: Path, part_size: int) -> Iterator[bytes]:
    """The file in parts of ``part_size`` bytes (the last one shorter; an empty file gives one empty part)."""
    with open(path, "rb") as f:
        first = True
        while True:
            b = f.read(part_size)
            if not b and not first:
                return
            first = False
            yield b
            if len(b) < part_size:
                return


def display_url(url: str) -> str:
    """A store URL without any user:password part (never logged or shown)."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return parts._replace(netloc=host).geturl()
    return url


def open_store(settings: Settings) -> RawStore | None:
    """The configured raw store (``sync.raw_store``); None when custody is off."""
    url = settings.sync.raw_store
    if url is None:
        return None
    if url.startswith("s3://"):
        from har_edge.sync.rawstore_s3 import S3Store

        return S3Store(settings)
    return FolderStore(url)


class FolderStore:
    """A folder (a DVC local remote, a mounted share): a copy, resumed from its partial size, then read back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.root = Path(url[7:] if url.startswith("file://") else url)

    @property
    def display(self) -> str:
        return str(self.root)

    def _dest(self, item: Item) -> Path:
        return self.root / item.key

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise ServerAccessDenied(
                f"raw store {self.root} is not a folder that exists: create it (or mount the share), "
                "or correct sync.raw_store"
            )

    def present(self, item: Item) -> str | None:
        self._check_root()
        dest = self._dest(item)
        try:
            if dest.stat().st_size != item.size:
                return None
        except FileNotFoundError:
            return None
        if sha256_file(dest) != item.sha256:
            log.warning("raw store: %s holds other bytes than its name says; it is written again", dest)
            return None
        self._sidecar(item)
        return f"sha256 {item.sha256} read back from {dest.name}"

    def upload(self, item: Item, expired: Expired, save: SaveFn) -> str | None:
        self._check_root()
        dest = self._dest(item)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f"{dest.name}.partial-{_safe(item.device)}")
        if item.bytes_done and not partial.exists():  # renamed into place just before a kill?
            found = self.present(item)
            if found is not None:
                return found
        chunk = item.part_size or 8 * CHUNK
        with open(partial, "ab") as out, open(item.path, "rb") as src:
            done = out.tell()
            if done > item.size:  # not ours to trust: start over
                out.truncate(0)
                done = 0
            src.seek(done)
            while done < item.size:
                if expired():
                    item.bytes_done = done
                    save(item)
                    return None
                b = src.read(chunk)
                if not b:
                    break  # the file shrank: caught by the size check below
                out.write(b)
                out.flush()
                os.fsync(out.fileno())
                done += len(b)
                item.sent += len(b)
                item.parts_sent += 1
                item.bytes_done = done
                save(item)
        # the whole copy read back, prefix of an earlier pass included
        got = sha256_file(partial)
        if got != item.sha256 or partial.stat().st_size != item.size:
            partial.unlink(missing_ok=True)
            raise CustodyMismatch(
                f"raw store {self.root}: the copy of {item.rel} reads back as sha256 {got}, not {item.sha256} "
                "(the file changed, or the copy was damaged): it is copied again on the next pass"
            )
        os.replace(partial, dest)
        fsync_dir(dest.parent)
        self._sidecar(item)
        return f"sha256 {got} read back from {dest.name}"

    def _sidecar(self, item: Item) -> None:
        meta = self._dest(item).with_suffix(".json")
        if meta.exists():
            return
        tmp = meta.with_name(meta.name + f".tmp-{os.getpid()}")
        tmp.write_text(
            json.dumps({"sha256": item.sha256, "size": item.size, "name": item.path.name, "device": item.device}),
            encoding="utf-8",
        )
        os.replace(tmp, meta)

    def discard(self, item: Item) -> None:
        if item.key:
            self._dest(item).with_name(f"{self._dest(item).name}.partial-{_safe(item.device)}").unlink(missing_ok=True)

    def erase(self, sha256: str) -> bool:
        self._check_root()
        dest = self.root / object_key(sha256)
        for partial in dest.parent.glob(f"{dest.name}.partial-*"):
            partial.unlink(missing_ok=True)
        dest.with_suffix(".json").unlink(missing_ok=True)
        try:
            dest.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(dest.parent)
        return True


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s) or "device"

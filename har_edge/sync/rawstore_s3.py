"""Raw custody into S3 (AWS, MinIO, SeaweedFS; also a DVC remote's s3:// URL): resumable multipart uploads.

An export up to ``sync.raw_store_part_mb`` goes in one ``PutObject``; a larger one as a multipart upload
whose id and acknowledged parts the outbox keeps, so a killed sync resumes it: the next pass asks the store
for the parts it holds (``ListParts``), re-reads the file locally, and sends only the parts the store does
not hold with the same MD5. Every request carries ``Content-MD5`` and ``x-amz-checksum-sha256`` of its bytes
(the store refuses a part that arrived damaged: ``BadDigest``).

Verification after completion (``HeadObject`` with checksum mode): the size, the ``sha256`` metadata, the
ETag (MD5 of the part MD5s, ``-N``) and, where the store returns it, ``ChecksumSHA256`` (composite: SHA-256
of the part SHA-256s, ``-N``) must equal what was computed from the file while it was read. A store that
returns neither an MD5 ETag nor a checksum (e.g. SSE-KMS ETags) is verified by reading the object back.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from har_edge.agent.settings import Settings
from har_edge.sync.errors import CustodyMismatch, ServerAccessDenied, ServerUnreachable, SyncError
from har_edge.sync.rawstore import CHUNK, Expired, Item, SaveFn, b64, display_url, object_key, read_parts

log = logging.getLogger(__name__)

MIB = 1 << 20
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}(-\d+)?$")
#: error codes meaning "the store as configured refuses us": a person must act
ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "NoSuchBucket",
        "AllAccessDisabled",
        "InvalidBucketName",
        "AccountProblem",
        "InvalidToken",
        "ExpiredToken",
    }
)
#: the bytes arrived damaged: that request is discarded, the part is sent again
DIGEST_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum"})
TEMPORARY_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed", "Throttling"}
)


class S3Store:
    def __init__(self, settings: Settings, client: Any = None) -> None:
        s = settings.sync
        assert s.raw_store is not None and s.raw_store.startswith("s3://")
        self.url = s.raw_store
        bucket, _, prefix = s.raw_store[5:].partition("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = int(s.raw_store_part_mb * MIB)
        self.endpoint = s.raw_store_endpoint_url
        self._settings = settings
        self._client = client

    @property
    def display(self) -> str:
        where = f" at {display_url(self.endpoint)}" if self.endpoint else ""
        return f"{self.url}{where}"

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            s = self._settings.sync
            cfg = Config(
                connect_timeout=s.request_timeout_s,
                read_timeout=max(60.0, s.request_timeout_s),
                retries={"max_attempts": 3, "mode": "standard"},
                # our own Content-MD5 and SHA-256 on every request; no extra CRC some stores refuse
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path" if self.endpoint else "auto"},
            )
            kw: dict[str, Any] = {"config": cfg}
            if self.endpoint:
                kw["endpoint_url"] = self.endpoint
            if s.raw_store_region:
                kw["region_name"] = s.raw_store_region
            if s.raw_store_access_key_id and s.raw_store_secret_access_key:
                kw["aws_access_key_id"] = s.raw_store_access_key_id
                kw["aws_secret_access_key"] = s.raw_store_secret_access_key
            self._client = boto3.session.Session().client("s3", **kw)
        return self._client

    def _key(self, item: Item) -> str:
        return f"{self.prefix}/{item.key}" if self.prefix else item.key

    def _call(self, what: str, fn: Callable[..., Any], **kw: Any) -> Any:
        try:
            return fn(**kw)
        except Exception as exc:
            err = translate(exc, what, self.display)
            if err is None:
                raise
            raise err from exc

    # -- the store interface -----------------------------------------------------------------------

    def present(self, item: Item) -> str | None:
        head = self._head(item)
        if head is None:
            return None
        if int(head.get("ContentLength", -1)) != item.size or head.get("Metadata", {}).get("sha256") != item.sha256:
            return None
        etag, checksum = expected(item, self.part_size)
        try:
            return self._compare(item, head, etag, checksum)
        except CustodyMismatch as exc:
            log.warning("raw store: %s; it is uploaded again", exc)
            return None

    def upload(self, item: Item, expired: Expired, save: SaveFn) -> str | None:
        if item.size <= self.part_size:
            return self._put_single(item)
        ps = self.part_size
        if item.upload_id and item.part_size != ps:  # the part size setting changed: start over
            self.discard(item)
        held: dict[int, str] = {}
        if item.upload_id:
            listed = self._listed_parts(item)
            if listed is None:  # completed just before a kill (before the outbox knew), expired or aborted
                _reset(item)
                found = self.present(item)
                if found is not None:
                    return found
                log.info("raw store: the upload of %s expired or was aborted; starting it again", item.rel)
            else:
                held = listed
        if not item.upload_id:
            r = self._call(
                f"starting the upload of {item.rel}",
                self.client.create_multipart_upload,
                Bucket=self.bucket,
                Key=self._key(item),
                Metadata=_metadata(item),
                ChecksumAlgorithm="SHA256",
            )
            item.upload_id, item.part_size, item.parts, item.bytes_done = str(r["UploadId"]), ps, [], 0
            save(item)
        full = hashlib.sha256()
        md5s: list[bytes] = []
        shas: list[bytes] = []
        done: list[list[object]] = []
        offset = 0
        for n, b in enumerate(read_parts(item.path, ps), 1):
            full.update(b)
            md5, sha = hashlib.md5(b).digest(), hashlib.sha256(b).digest()
            if held.get(n) != md5.hex():
                if expired():
                    item.parts = done + [[k, e, ""] for k, e in sorted(held.items()) if k > n]
                    save(item)
                    return None
                r = self._call(
                    f"uploading part {n} of {item.rel}",
                    self.client.upload_part,
                    Bucket=self.bucket,
                    Key=self._key(item),
                    UploadId=item.upload_id,
                    PartNumber=n,
                    Body=b,
                    ContentMD5=b64(md5),
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=b64(sha),
                )
                got = str(r.get("ETag", "")).strip('"')
                if _MD5_ETAG.match(got) and got != md5.hex():
                    raise CustodyMismatch(
                        f"raw store {self.display}: part {n} of {item.rel} stored with ETag {got}, not its MD5 "
                        f"{md5.hex()}: the upload is sent again"
                    )
                item.sent += len(b)
                item.parts_sent += 1
            md5s.append(md5)
            shas.append(sha)
            offset += len(b)
            done.append([n, md5.hex(), b64(sha)])
            item.parts, item.bytes_done = done + [[k, e, ""] for k, e in sorted(held.items()) if k > n], offset
            save(item)
        if full.hexdigest() != item.sha256 or offset != item.size:
            self.discard(item)
            raise CustodyMismatch(
                f"{item.rel} changed since it was hashed (sha256 now {full.hexdigest()}, {offset} bytes): "
                "its upload was dropped; it is hashed and sent again on the next pass"
            )
        self._call(
            f"completing the upload of {item.rel}",
            self.client.complete_multipart_upload,
            Bucket=self.bucket,
            Key=self._key(item),
            UploadId=item.upload_id,
            MultipartUpload={
                "Parts": [{"PartNumber": int(str(n)), "ETag": f'"{e}"', "ChecksumSHA256": str(s)} for n, e, s in done]
            },
        )
        head = self._head(item)
        if head is None:
            raise CustodyMismatch(f"raw store {self.display}: {item.rel} is not there after its upload completed")
        etag = hashlib.md5(b"".join(md5s)).hexdigest() + f"-{len(md5s)}"
        checksum = b64(hashlib.sha256(b"".join(shas)).digest()) + f"-{len(shas)}"
        return self._compare(item, head, etag, checksum)

    def discard(self, item: Item) -> None:
        if item.upload_id:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(item), UploadId=item.upload_id)
            except Exception as exc:  # best effort: a lifecycle rule removes what is left
                log.info("raw store: could not abort the upload of %s: %s", item.rel, type(exc).__name__)
        _reset(item)

    def erase(self, sha256: str) -> bool:
        key = f"{self.prefix}/{object_key(sha256)}" if self.prefix else object_key(sha256)
        what = f"erasing {key} in the raw store {self.display}"
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _status(exc) == 404 or _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            err = translate(exc, what, self.display)
            if err is None:
                raise
            raise err from exc
        self._call(what, self.client.delete_object, Bucket=self.bucket, Key=key)
        return True

    # -- helpers ------------------------------------------------------------------------------------

    def _put_single(self, item: Item) -> str:
        data = item.path.read_bytes()
        sha = hashlib.sha256(data)
        if sha.hexdigest() != item.sha256 or len(data) != item.size:
            raise CustodyMismatch(
                f"{item.rel} changed since it was hashed (sha256 now {sha.hexdigest()}): it is hashed and sent "
                "again on the next pass"
            )
        md5 = hashlib.md5(data)
        self._call(
            f"uploading {item.rel}",
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._key(item),
            Body=data,
            Metadata=_metadata(item),
            ContentMD5=b64(md5.digest()),
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=b64(sha.digest()),
        )
        item.sent += len(data)
        item.parts_sent += 1
        head = self._head(item)
        if head is None:
            raise CustodyMismatch(f"raw store {self.display}: {item.rel} is not there after its upload")
        return self._compare(item, head, md5.hexdigest(), b64(sha.digest()))

    def _head(self, item: Item) -> dict[str, Any] | None:
        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=self._key(item), ChecksumMode="ENABLED"))
        except Exception as exc:
            if _status(exc) == 404 or _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            err = translate(exc, f"looking up {item.rel}", self.display)
            if err is None:
                raise
            raise err from exc

    def _listed_parts(self, item: Item) -> dict[int, str] | None:
        """Parts the store holds for the upload under way ({number: MD5 hex}); None when the upload is gone."""
        out: dict[int, str] = {}
        marker = 0
        while True:
            try:
                r = self.client.list_parts(
                    Bucket=self.bucket, Key=self._key(item), UploadId=item.upload_id, PartNumberMarker=marker
                )
            except Exception as exc:
                if _code(exc) == "NoSuchUpload" or _status(exc) == 404:
                    return None
                err = translate(exc, f"listing the parts of {item.rel}", self.display)
                if err is None:
                    raise
                raise err from exc
            for p in r.get("Parts", []):
                out[int(p["PartNumber"])] = str(p["ETag"]).strip('"')
            if not r.get("IsTruncated"):
                return out
            marker = int(r.get("NextPartNumberMarker", 0))

    def _compare(self, item: Item, head: dict[str, Any], etag: str, checksum: str) -> str:
        """What matched, or CustodyMismatch naming what differs."""
        where = f"raw store {self.display}: {self._key(item)} ({item.rel})"
        size = int(head.get("ContentLength", -1))
        meta = head.get("Metadata", {}).get("sha256")
        if size != item.size or meta != item.sha256:
            raise CustodyMismatch(f"{where} holds {size} bytes with sha256 {meta}, not {item.size} with {item.sha256}")
        checked = [f"size {size}", "sha256 metadata"]
        got_etag = str(head.get("ETag", "")).strip('"')
        if _MD5_ETAG.match(got_etag):
            if got_etag != etag:
                raise CustodyMismatch(f"{where} has ETag {got_etag}, the file's parts give {etag}")
            checked.append(f"ETag {got_etag}")
        got_sum = head.get("ChecksumSHA256")
        if got_sum:
            if str(got_sum) != checksum:
                raise CustodyMismatch(f"{where} has ChecksumSHA256 {got_sum}, the file's parts give {checksum}")
            checked.append(f"ChecksumSHA256 {got_sum}")
        if len(checked) == 2:  # no checksum of the bytes from the store: read them back
            got = self._read_back(item)
            if got != item.sha256:
                raise CustodyMismatch(f"{where} reads back as sha256 {got}, not {item.sha256}")
            checked.append("sha256 read back")
        return ", ".join(checked)

    def _read_back(self, item: Item) -> str:
        r = self._call(f"reading back {item.rel}", self.client.get_object, Bucket=self.bucket, Key=self._key(item))
        h = hashlib.sha256()
        body = r["Body"]
        while chunk := body.read(CHUNK):
            h.update(chunk)
        return h.hexdigest()


def expected(item: Item, part_size: int) -> tuple[str, str]:
    """(ETag, ChecksumSHA256) the store reports for this file uploaded in parts of ``part_size``."""
    md5s: list[bytes] = []
    shas: list[bytes] = []
    full_md5, full_sha = hashlib.md5(), hashlib.sha256()
    for b in read_parts(item.path, part_size):
        md5s.append(hashlib.md5(b).digest())
        shas.append(hashlib.sha256(b).digest())
        full_md5.update(b)
        full_sha.update(b)
    if item.size <= part_size:
        return full_md5.hexdigest(), b64(full_sha.digest())
    n = len(md5s)
    return hashlib.md5(b"".join(md5s)).hexdigest() + f"-{n}", b64(hashlib.sha256(b"".join(shas)).digest()) + f"-{n}"


def _metadata(item: Item) -> dict[str, str]:
    return {"sha256": item.sha256, "name": quote(item.path.name), "device": quote(item.device)}


def _reset(item: Item) -> None:
    item.upload_id, item.part_size, item.parts, item.bytes_done = None, None, [], 0


def _code(exc: BaseException) -> str | None:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        return str(resp.get("Error", {}).get("Code", "")) or None
    return None


def _status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        s = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(s) if s is not None else None
    return None


def translate(exc: BaseException, what: str, where: str) -> SyncError | None:
    """The SyncError for a boto3/botocore exception (None when it is not one: a bug). No credential is named."""
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - boto3 is in the edge extra
        return None
    if isinstance(exc, SyncError):
        return exc
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return ServerAccessDenied(
            f"raw store {where}: no credentials while {what}: set sync.raw_store_access_key_id and "
            "sync.raw_store_secret_access_key, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        )
    unreachable = (
        bx.EndpointConnectionError,
        bx.ConnectTimeoutError,
        bx.ReadTimeoutError,
        bx.ConnectionClosedError,
        bx.HTTPClientError,
        ConnectionError,
        TimeoutError,
    )
    if isinstance(exc, unreachable):
        return ServerUnreachable(
            f"raw store {where} could not be reached while {what} (will retry): {type(exc).__name__}"
        )
    code, status = _code(exc), _status(exc)
    if code is None and status is None:
        return None
    if code in ACCESS_CODES or status in (401, 403):
        return ServerAccessDenied(
            f"raw store {where} refused {what} ({code}): check sync.raw_store, the bucket and the credentials "
            "(sync.raw_store_access_key_id / secret or AWS_*)"
        )
    if code in DIGEST_CODES:
        return CustodyMismatch(f"raw store {where} received damaged bytes while {what} ({code}): sent again later")
    if code in TEMPORARY_CODES or (status is not None and status >= 500):
        return ServerUnreachable(f"raw store {where} answered {code or status} while {what} (will retry)")
    return SyncError(f"raw store {where} refused {what}: {code or status}: retried on the next pass")

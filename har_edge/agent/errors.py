"""The exception tree of har-edge.

Messages name the object and the fix. ``kind`` is a short stable word written to
quarantine reasons and logs, so a person (or a script) can group failures.
"""

from __future__ import annotations


class HarEdgeError(Exception):
    """Base of every error har-edge raises on purpose."""

    kind = "error"


class ConfigError(HarEdgeError):
    kind = "config"


# -- input -----------------------------------------------------------------


class InputError(HarEdgeError):
    """A file that cannot be turned into windows. It is quarantined, never retried."""

    kind = "bad_input"


class UnknownFormat(InputError):
    kind = "unknown_format"


class CorruptFile(InputError):
    """Truncated, bad CRC, undefined messages: the bytes are damaged."""

    kind = "corrupt"


class NoImuData(InputError):
    kind = "no_imu_data"


class UnsafeArchive(InputError):
    kind = "unsafe_archive"


class TooShort(InputError):
    kind = "too_short"


class TooLarge(InputError):
    kind = "too_large"


# -- models ----------------------------------------------------------------


class ModelError(HarEdgeError):
    """A model folder that must not be used."""

    kind = "model"


class ManifestError(ModelError):
    kind = "manifest"


class ChecksumMismatch(ModelError):
    kind = "checksum"


class ModelValidationError(ModelError):
    kind = "validation"


class RuntimeUnavailable(ModelError):
    kind = "runtime"


class SignatureError(ModelError):
    """A release whose signature is missing, invalid, or made by a key the device does not trust."""

    kind = "signature"


# -- storage ---------------------------------------------------------------


class OutboxError(HarEdgeError):
    kind = "outbox"


class SchemaVersionError(OutboxError):
    kind = "schema_version"


class OutboxFull(OutboxError):
    kind = "outbox_full"


class DiskFull(OutboxError):
    """The filesystem of the outbox (or of the data folder) has no space left. Nothing is lost: retried."""

    kind = "disk_full"


# -- bugs ------------------------------------------------------------------


class InternalError(HarEdgeError):
    """An unexpected exception while processing one file (a bug, or a crash loop): the file is quarantined."""

    kind = "internal"

    def __init__(self, message: str, *, stage: str | None = None, traceback: str = "") -> None:
        super().__init__(message)
        self.stage = stage
        self.traceback = traceback

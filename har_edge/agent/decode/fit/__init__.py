"""Garmin FIT files: IMU samples out, or an InputError a person can act on.

``decode_fit`` checks the file (header, size, CRC) and indexes its records in one
streaming pass (:mod:`.container`), plans which messages give the samples
(:mod:`.plan`), then hands back a lazy :class:`~har_edge.agent.decode.types.Recording`
whose chunks are read with numpy (:mod:`.chunks`). A layout the fast reader does
not support falls back to the official garmin-fit-sdk decoder (:mod:`.sdk`).
Both turn field values into samples with :mod:`.samples`.

``fit_file_verified`` is the readiness check: it returns a :class:`Verified` proof
that the caller may hand back to ``decode_fit``, which then skips the CRC pass as
long as the file is still the one checked (same device, inode, size and mtime).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from har_edge.agent.decode.fit import container
from har_edge.agent.decode.fit.chunks import guarded, iter_chunks
from har_edge.agent.decode.fit.container import FastPathUnsupported, FileIdentity, Verified
from har_edge.agent.decode.fit.meta import recording_meta
from har_edge.agent.decode.fit.plan import plan
from har_edge.agent.decode.fit.profile import MESG_ACTIVITY, MESG_DEVICE_INFO, MESG_DEVICE_SETTINGS, MESG_FILE_ID
from har_edge.agent.decode.fit.sdk import decode_sdk
from har_edge.agent.decode.types import Chunk, Recording
from har_edge.agent.errors import CorruptFile, InputError

log = logging.getLogger(__name__)

__all__ = ["ENGINES", "FastPathUnsupported", "Verified", "decode_fit", "fit_file_complete", "fit_file_verified"]

ENGINES = ("auto", "fast", "sdk")


def fit_file_verified(path: Path) -> Verified | None:
    """The proof that the file's header is valid, all its bytes are there and its CRC is right; else None.

    Cheap enough to poll while a file is being copied (~0.3 s for 100 MB).
    """
    try:
        return container.file_complete(Path(path))
    except OSError as exc:
        log.debug("cannot read %s yet: %s", path, exc)
        return None


def fit_file_complete(path: Path) -> bool:
    """True when the file's header is valid, all its bytes are there and its CRC is right."""
    return fit_file_verified(path) is not None


def _proof_for(path: Path, verified: Verified | Iterable[Verified] | None) -> Verified | None:
    """The proof among ``verified`` that names this file as it is now (None: check it again)."""
    if verified is None:
        return None
    proofs = [verified] if isinstance(verified, Verified) else list(verified)
    if not proofs:
        return None
    now = FileIdentity.of(path)
    return next((p for p in proofs if p.holds_for(now)), None)


def decode_fit(
    path: Path,
    name: str | None = None,
    *,
    engine: str = "auto",
    verified: Verified | Iterable[Verified] | None = None,
) -> Recording:
    """Open a FIT file holding IMU messages as a lazy Recording.

    Raises an :class:`~har_edge.agent.errors.InputError` subclass for anything wrong with the
    bytes: ``UnknownFormat`` (not FIT), ``CorruptFile`` (truncated, bad CRC,
    undefined messages, never finalized, fields that do not hold what the profile
    says), ``NoImuData`` (a valid FIT without accelerometer samples). ``engine`` is
    "auto" (fast reader, the SDK when the fast one does not apply), "fast" or "sdk".
    ``verified``: proofs from :func:`fit_file_verified` (of this file or others); the
    CRC is not computed again when one still names this file.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    path = Path(path)
    name = name or path.name
    proof = _proof_for(path, verified)
    if engine != "sdk":
        try:
            return _decode_fast(path, name, proof)
        except FastPathUnsupported as exc:
            if engine == "fast":
                raise
            log.info("%s: the fast FIT reader does not apply (%s); decoding with garmin-fit-sdk", name, exc)
        except (InputError, OSError):
            raise
        except Exception:  # a bug of ours must not lose the file: let the SDK decide
            if engine == "fast":
                raise
            log.exception("%s: the fast FIT reader failed; decoding with garmin-fit-sdk", name)
    try:
        return decode_sdk(path, name, proof)
    except (InputError, OSError):
        raise
    except Exception as exc:  # whatever the SDK path trips on, the file is refused, never the agent crashed
        log.exception("%s: decoding with garmin-fit-sdk failed", name)
        raise CorruptFile(f"{name} could not be decoded ({type(exc).__name__}: {exc}): the file is damaged") from exc


def _decode_fast(path: Path, name: str, verified: Verified | None) -> Recording:
    index = container.scan(path, name, verified=verified)
    imu = plan(index)
    meta = recording_meta(
        "fast",
        index.message_counts(),
        [v for _, v in index.small.get(MESG_FILE_ID, [])],
        [v for _, v in index.small.get(MESG_DEVICE_INFO, [])],
        imu.accel.source,
        imu.gyro.source if imu.gyro else None,
        imu.correlation_ms,
        imu.notes,
        device_settings=[v for _, v in index.small.get(MESG_DEVICE_SETTINGS, [])],
        activities=[v for _, v in index.small.get(MESG_ACTIVITY, [])],
    )
    meta["skipped_messages"] = imu.accel.skipped_records + (imu.gyro.skipped_records if imu.gyro else 0)
    if index.compressed_records:
        meta["compressed_timestamp_records"] = index.compressed_records

    def chunks() -> Iterator[Chunk]:  # bytes we indexed but cannot read: a damaged file, said so
        return guarded(name, iter_chunks(index, imu), "decoding IMU records")

    return Recording(
        name=name,
        format="fit",
        chunks=chunks,
        accel_unit=imu.accel.source.unit,
        has_gyro=imu.gyro is not None,
        meta=meta,
    )

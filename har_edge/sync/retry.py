"""Retry policy as data: which failures are temporary, and how long to wait after them.

MLflow raises ``MlflowException`` for everything. What tells them apart is the
error code (and whether the server answered at all: ``RestException`` carries
the answer's JSON). Measured: a refused or hung connection surfaces as a
plain ``MlflowException`` with INTERNAL_ERROR once the (bounded) HTTP retries
are spent; a server that answered 400 raises ``RestException``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from enum import Enum

from har_edge.sync.errors import ServerAccessDenied, ServerRejected, ServerUnreachable, SyncError


class Failure(Enum):
    UNREACHABLE = "unreachable"  # retry the whole pass later, keep everything
    ACCESS = "access"  # stop the pass; settings (credentials, URI) need a person
    REJECTED = "rejected"  # this item can never succeed as sent: record it, move on


#: MLflow error codes meaning "try again later" (5xx, 429, time-outs, database busy).
TEMPORARY_CODES = frozenset(
    {
        "INTERNAL_ERROR",
        "TEMPORARILY_UNAVAILABLE",
        "REQUEST_LIMIT_EXCEEDED",
        "DEADLINE_EXCEEDED",
        "ABORTED",
        "IO_ERROR",
        "BAD_REQUEST_TIMEOUT",
    }
)

#: Error codes meaning "the connection is configured wrong": nothing will pass until a person acts.
ACCESS_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "ENDPOINT_NOT_FOUND", "CUSTOMER_UNAUTHORIZED"})

#: Exception types that mean the server could not be reached at all (besides MLflow's own wrapping).
UNREACHABLE_TYPES: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, OSError)


def _unreachable_types() -> tuple[type[BaseException], ...]:
    try:
        import requests

        return (*UNREACHABLE_TYPES, requests.ConnectionError, requests.Timeout)
    except ImportError:  # pragma: no cover - requests comes with mlflow
        return UNREACHABLE_TYPES


def classify(exc: BaseException) -> Failure | None:
    """How to treat an exception from an MLflow call; None when it is not a server failure (a bug)."""
    if isinstance(exc, ServerUnreachable):
        return Failure.UNREACHABLE
    if isinstance(exc, ServerAccessDenied):
        return Failure.ACCESS
    if isinstance(exc, ServerRejected):
        return Failure.REJECTED
    code = _mlflow_error_code(exc)
    if code is not None:
        if code in ACCESS_CODES:
            return Failure.ACCESS
        if code in TEMPORARY_CODES:
            return Failure.UNREACHABLE
        return Failure.REJECTED
    try:
        from sqlalchemy.exc import OperationalError

        if isinstance(exc, OperationalError):  # the embedded store's database is busy or locked
            return Failure.UNREACHABLE
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, _unreachable_types()):
        return Failure.UNREACHABLE
    return None


def _mlflow_error_code(exc: BaseException) -> str | None:
    """The error code of an ``MlflowException`` (INTERNAL_ERROR when it has none); None for any other exception."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, MlflowException):
        return str(exc.error_code or "INTERNAL_ERROR")
    return None


_ERRNO = re.compile(r"\[Errno -?\d+\] [^\"')]+")


def short_cause(exc: BaseException) -> str:
    """The useful part of an exception text: urllib3 buries "[Errno 111] Connection refused" in 300 characters."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    if classify(exc) is Failure.UNREACHABLE:
        if m := _ERRNO.search(text):
            return m.group(0).strip()
        if "timed out" in text.lower() or "timeout" in text.lower():
            return "no answer within the time-out (sync.request_timeout_s)"
    return text.splitlines()[0][:300]


def translate(exc: BaseException, what: str, where: str) -> SyncError | None:
    """The SyncError for ``exc`` (None when it is not a server failure), its message naming the object."""
    kind = classify(exc)
    detail = short_cause(exc)
    if kind is Failure.UNREACHABLE:
        answered = type(exc).__name__ == "RestException"
        how = "answered with a temporary server error" if answered else "could not be reached"
        return ServerUnreachable(f"MLflow at {where} {how} while {what} (will retry): {detail}")
    if kind is Failure.ACCESS:
        return ServerAccessDenied(
            f"MLflow at {where} refused {what}: {detail}: check sync.tracking_uri and the credentials "
            "(MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN or sync.username/password/token)"
        )
    if kind is Failure.REJECTED:
        return ServerRejected(f"MLflow at {where} answered {what} with a permanent error (not retried): {detail}")
    return None


@dataclass
class Backoff:
    """Exponential back-off with jitter, as state one job keeps between passes.

    After the n-th consecutive failure the next attempt waits
    ``min(maximum, initial * 2**(n-1))`` scaled by a random factor in
    ``[1 - jitter, 1]`` ("equal jitter" keeps at least half the delay).
    """

    initial_s: float
    maximum_s: float
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0
    not_before: float = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.not_before

    def failed(self, now: float) -> float:
        """Record a failure at ``now``; return the delay until the next attempt."""
        self.failures += 1
        # 2.0 ** 1024 overflows (days of failures at the cap); the cap is reached long before 2 ** 1000
        delay = min(self.maximum_s, self.initial_s * 2.0 ** min(self.failures - 1, 1000))
        delay *= 1.0 - self.jitter * self.rng.random()
        self.not_before = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = 0.0

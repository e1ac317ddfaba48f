"""Errors the sync daemon raises on purpose; they extend the agent's tree (``har_edge.agent.errors``).

The split that matters for retries: a server or registry that could not be
*reached* (retry later, keep everything) versus one that *answered* with a
refusal (permanent for that item, or a configuration problem for the whole
connection). ``har_edge.sync.retry`` maps third-party exceptions onto these.
"""

from __future__ import annotations

from har_edge.agent.errors import ConfigError, HarEdgeError, ModelError

__all__ = [
    "ConfigError",
    "CustodyMismatch",
    "LockBusy",
    "ModelRefused",
    "RegistryError",
    "RegistryUnreachable",
    "ServerAccessDenied",
    "ServerRejected",
    "ServerUnreachable",
    "SyncError",
]


class SyncError(HarEdgeError):
    kind = "sync"


class ServerUnreachable(SyncError):
    """No answer (refused connection, time-out, 5xx): nothing is lost, the pass is retried later."""

    kind = "unreachable"


class ServerRejected(SyncError):
    """The server answered with a 4xx for one item: retrying the same request cannot succeed."""

    kind = "rejected"


class ServerAccessDenied(SyncError):
    """The server refuses the connection as configured (401/403, unknown endpoint): a person must fix settings."""

    kind = "access_denied"


class RegistryError(SyncError):
    """A git or dvc call against the model registry failed."""

    kind = "registry"


class RegistryUnreachable(RegistryError):
    """The registry (git remote or DVC storage) did not answer in time or could not be contacted."""

    kind = "registry_unreachable"


class ModelRefused(ModelError):
    """A released model that failed verification, validation or the health gate."""

    kind = "refused"


class LockBusy(SyncError):
    """Another sync process holds the lock of this data folder."""

    kind = "busy"


class CustodyMismatch(SyncError):
    """The raw store's checksum of an upload differs from the file's (or the file changed while it was read):
    that upload is discarded and sent again on a later pass."""

    kind = "custody_mismatch"

"""The states stored in the outbox and read by agent, sync and status, as string enums.

The values are the strings the outbox stores (a ``StrEnum`` compares equal to
its value, so rows written before these enums existed read the same). Renaming
a stored value needs an outbox migration.
"""

from __future__ import annotations

from enum import StrEnum


class FileStatus(StrEnum):
    """``files.status``: what became of an export."""

    PROCESSED = "processed"
    #: the export could not be used; it is in ``quarantine/`` with its reason (shown as "quarantined")
    FAILED = "failed"
    #: the same content as an export processed before; not processed again
    DUPLICATE = "duplicate"

    @property
    def shown(self) -> str:
        """The word a person reads in ``status``."""
        return "quarantined" if self is FileStatus.FAILED else self.value


class DeploymentOutcome(StrEnum):
    """``deployments.outcome``: what one model change on the device came to."""

    ACTIVATED = "activated"
    PINNED = "pinned"
    REFUSED = "refused"
    ROLLED_BACK = "rolled_back"
    LOAD_FAILED = "load_failed"
    #: the model passed the health gate (the criteria that applied are in the reason)
    HEALTHY = "healthy"

"""Each sync pass's outcome, written into the outbox for the agent's /metrics (:mod:`har_edge.agent.syncpasses`).

The sync daemon serves no port of its own: its figures
(``har_edge_sync_last_success_timestamp_seconds``, ``har_edge_sync_failures_total``)
travel through the outbox both processes share, and the agent exports them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, TypeVar

from har_edge.agent.errors import HarEdgeError
from har_edge.agent.outbox import Outbox
from har_edge.agent.syncpasses import record_pass

if TYPE_CHECKING:
    from har_edge.sync.custody import CustodyReport
    from har_edge.sync.daemon import JobResult
    from har_edge.sync.models import PullReport
    from har_edge.sync.push import PushReport

log = logging.getLogger(__name__)

R = TypeVar("R", "PushReport", "PullReport", "CustodyReport")


def record(outbox: Outbox, task: str, result: JobResult[R]) -> JobResult[R]:
    """Store how ``result`` went (a skipped pass stores nothing) and return it."""
    if not result.ran:  # waiting out a back-off, or another process holds the lock: neither success nor failure
        return result
    err = result.error
    kind = None if err is None else (err.kind if isinstance(err, HarEdgeError) else "unexpected")
    try:
        record_pass(outbox, task, error_kind=kind, error="" if err is None else str(err))
    except HarEdgeError as exc:  # the outbox itself is in trouble: the pass's own error says more
        log.warning("could not record the %s pass in the outbox: %s", task, exc)
    return result

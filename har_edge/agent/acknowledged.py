"""What the outbox knows the server has: the condition under which a raw export may be deleted.

A processed file is acknowledged once ``files.finished_ms`` is set: sync sets it only after the server
answered for every metric point and the predictions artifact and the run was set FINISHED (or, after a
4xx for the file, when its remaining results were given up and listed in ``sync_refusals``). A
duplicate's results are those of the processed file with the same sha256. A failed file's reason is
recorded once its ``failed`` row exists (failed rows are not sent to the server).
"""

from __future__ import annotations

from sqlalchemy import exists, select

from har_edge.agent.outbox import Outbox, files


def results_acknowledged(outbox: Outbox, sha256: str) -> bool:
    """True when the server acknowledged all results of the export with this content."""
    q = select(
        exists().where(files.c.sha256 == sha256, files.c.status == "processed", files.c.finished_ms.is_not(None))
    )
    with outbox.engine.connect() as conn:
        return bool(conn.execute(q).scalar())


def failure_recorded(outbox: Outbox, name: str) -> bool:
    """True when the outbox holds a ``failed`` row for an export of this name (its kind and message)."""
    q = select(exists().where(files.c.name == name, files.c.status == "failed"))
    with outbox.engine.connect() as conn:
        return bool(conn.execute(q).scalar())
